"""Selection: properties of the reference, a hand-worked example, and sharded/Ray == in-memory."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.distributed.executor import RayExecutor
from stages.core.stage import InProcess
from stages.data.shards import iter_raw_samples, write_shards
from stages.maths.alignment import align_in_memory, label_and_confidence, sharpen, teacher_probs
from stages.maths.selection import (
    CandidateMerger,
    SelectConfig,
    copy_keys,
    copy_order,
    per_class_budget,
    plan_selection,
    select_in_memory,
    shard_candidates,
    shard_copies,
    shard_histogram,
    share_fraction,
    training_order,
)
from stages.pseudo_label import SIDECAR_FORMAT, build_table
from stages.select import select_shards
from stages.storage.artifacts import write_table

# Few distinct confidences, so ties (broken by the key hash) are common.
CONFIDENCES = [0.05, 0.2, 0.3, 0.31, 0.5, 0.5001, 0.75, 0.9, 0.99, 1.0]


@st.composite
def selection_inputs(draw):
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(0, 120))
    labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    conf = np.array(draw(st.lists(st.sampled_from(CONFIDENCES), min_size=n, max_size=n)), dtype=np.float32)
    keys = np.array([f"k{i:05d}" for i in range(n)], dtype=object)
    mode = draw(st.sampled_from(["none", "topk", "balanced", "share"]))
    cfg = SelectConfig(
        mode=mode,
        floor=draw(st.sampled_from([0.0, 0.3, 0.5, 0.95])),
        per_class=0 if mode == "share" else draw(st.integers(0, 25)),
        per_class_factor=draw(st.sampled_from([0.5, 1.0, 2.0])),
        seed=draw(st.integers(0, 3)),
        bins=draw(st.sampled_from([16, 64, 2048])),
        share_start=draw(st.sampled_from([0.1, 0.5, 1.0])),
        share_step=draw(st.sampled_from([0.0, 0.25, 0.4])),
    )
    return keys, labels, conf, num_classes, cfg, draw(st.integers(1, 4))


def sharded(keys, labels, conf, num_classes, cfg, shards: int, seed: int = 0, student_round: int = 1) -> np.ndarray:
    """The three-pass path, in-process, over a random split of the rows into shards."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(keys)), shards)
    hist = np.zeros((num_classes, cfg.bins), dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    for p in parts:
        h, a = shard_histogram(labels[p], conf[p], num_classes, cfg)
        hist, above = hist + h, above + a
    plan = plan_selection(hist, above, cfg, student_round)
    merger = CandidateMerger(plan, compact_at=5)  # compacts between shards too
    for p in parts:
        merger.add(shard_candidates(keys[p], labels[p], conf[p], merger.plan, cfg))
    plan = merger.finalize()
    copies = np.zeros(len(keys), dtype=np.int64)
    for p in parts:
        copies[p] = shard_copies(keys[p], labels[p], conf[p], plan, cfg)
    return copies


@settings(max_examples=300, deadline=None)
@given(selection_inputs())
def test_reference_properties(inputs):
    keys, labels, conf, num_classes, cfg, student_round = inputs
    copies = select_in_memory(keys, labels, conf, num_classes, cfg, student_round)
    above = conf >= cfg.floor
    assert (copies >= 0).all() and len(copies) == len(keys)
    assert (conf[copies > 0] >= cfg.floor).all(), "a sample below the floor was kept"
    assert (copies[above] >= 1).all() if cfg.mode == "none" else True
    k = per_class_budget(np.bincount(labels[above], minlength=num_classes), cfg, student_round)
    if cfg.mode == "share":
        q = min(1.0, cfg.share_start + (student_round - 1) * cfg.share_step)
        assert k == max(1, math.ceil(q * int(above.sum()) / num_classes))
    for c in range(num_classes):
        mine = labels == c
        n_above = int((mine & above).sum())
        unique, total = int((copies[mine] > 0).sum()), int(copies[mine].sum())
        if cfg.mode == "none":
            assert unique == total == n_above
            continue
        assert unique == min(n_above, k), "no class exceeds K unique samples; none is dropped below K"
        if cfg.mode == "balanced" and n_above:
            assert total == k, "balanced: every non-empty class totals exactly K"
        else:
            assert total == unique, "topk never duplicates"
        if total > unique:
            assert n_above < k, "duplication only in scarce classes"
            assert copies[mine].max() - copies[mine & (copies > 0)].min() <= 1, "copies are floor(K/n) or ceil(K/n)"
        kept, dropped = mine & (copies > 0), mine & above & (copies == 0)
        if kept.any() and dropped.any():
            assert conf[kept].min() >= conf[dropped].max(), "the K most confident are kept"
    # Same seed, same output, whatever the row order.
    order = np.random.default_rng(0).permutation(len(keys))
    again = select_in_memory(keys[order], labels[order], conf[order], num_classes, cfg, student_round)
    np.testing.assert_array_equal(again, copies[order])


@settings(max_examples=300, deadline=None)
@given(selection_inputs(), st.integers(1, 7))
def test_sharded_three_pass_equals_reference(inputs, shards):
    keys, labels, conf, num_classes, cfg, student_round = inputs
    expected = select_in_memory(keys, labels, conf, num_classes, cfg, student_round)
    got = sharded(keys, labels, conf, num_classes, cfg, shards, student_round=student_round)
    np.testing.assert_array_equal(got, expected)


def test_seed_changes_only_tie_breaks_and_draws():
    keys = np.array([f"k{i}" for i in range(40)], dtype=object)
    labels = np.zeros(40, dtype=np.int64)
    conf = np.full(40, 0.8, dtype=np.float32)  # all tied: the seed decides which 10 are kept
    picks = {
        tuple(np.flatnonzero(select_in_memory(keys, labels, conf, 1, SelectConfig(per_class=10, seed=s))))
        for s in range(4)
    }
    assert len(picks) > 1


def test_golden_hand_worked_example():
    # class 0: a..d above the floor (4 > K=3): keep the three most confident a, b, c; e is below the floor.
    # class 1: f, g (2 < K=4): duplicated, 4 // 2 = 2 copies each, no remainder.
    # class 2: h below the floor: nothing. class 3: i, j, k tied at 0.6 with K=3: all kept once.
    keys = np.array(list("abcdefghijk"), dtype=object)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.95, 0.5, 0.29, 0.6, 0.6, 0.6], dtype=np.float32)
    expect = {
        "balanced": ([1, 1, 1, 0, 0, 2, 2, 0, 1, 1, 1], 4),
        "topk": ([1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1], 4),
        "none": ([1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], 4),
    }
    for mode, (copies, _) in expect.items():
        cfg = SelectConfig(mode=mode, floor=0.3, per_class=3 if mode != "balanced" else 3)
        got = select_in_memory(keys, labels, conf, 4, cfg)
        if mode == "balanced":  # K=3: class 1 has n=2 -> one of f, g gets the third copy
            assert got[:5].tolist() == [1, 1, 1, 0, 0] and sorted(got[5:7].tolist()) == [1, 2]
            got = select_in_memory(keys, labels, conf, 4, dataclasses.replace(cfg, per_class=4))
            # K=4: class 0 keeps all four above the floor, class 3 duplicates 3 rows to 4 (one gets 2).
            assert got[:5].tolist() == [1, 1, 1, 1, 0] and got[5:8].tolist() == [2, 2, 0]
            assert sorted(got[8:].tolist()) == [1, 1, 2]
            continue
        assert got.tolist() == copies, mode
    # Derived K: 9 rows above the floor over 4 classes, factor 1 -> ceil(9 / 4) = 3.
    assert per_class_budget(np.array([4, 2, 0, 3]), SelectConfig()) == 3


def test_golden_share_grows_per_round():
    # 12 rows above the floor over 3 classes: K = ceil(q * 12 / 3) = 2, 3, 4, 4 for q = 0.5, 0.75, 1.0, 1.0.
    # Class 0 has 6 rows (a..f, most confident first), class 1 four (g..j), class 2 two (k, l); m is below the floor.
    keys = np.array(list("abcdefghijklm"), dtype=object)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    conf = np.array([0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65, 0.9, 0.4, 0.1], dtype=np.float32)
    cfg = SelectConfig(mode="share", floor=0.3)
    assert [share_fraction(cfg, r) for r in (1, 2, 3, 4)] == [0.5, 0.75, 1.0, 1.0]
    expect = {
        1: [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0],
        2: [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0],
        3: [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0],  # class 2 (2 < K = 4) is never duplicated
        4: [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0],
    }
    for r, copies in expect.items():
        assert select_in_memory(keys, labels, conf, 3, cfg, r).tolist() == copies, r
        assert sharded(keys, labels, conf, 3, cfg, 3, student_round=r).tolist() == copies, r
    slow = SelectConfig(mode="share", floor=0.3, share_start=0.25, share_step=0.1)
    assert per_class_budget(np.array([6, 4, 2]), slow, 1) == 1 and per_class_budget(np.array([6, 4, 2]), slow, 3) == 2
    # topk/balanced ignore the round
    assert (
        per_class_budget(np.array([6, 4, 2]), SelectConfig(), 3)
        == 4
        == per_class_budget(np.array([6, 4, 2]), SelectConfig())
    )


def test_auto_is_share_aligned_to_the_labeled_prior_for_a_weak_teacher_and_the_paper_otherwise():
    auto = SelectConfig(mode="auto", align="auto", floor=0.3)
    weak, strong = auto.resolve(weak_teacher=True), auto.resolve(weak_teacher=False)
    assert (weak.mode, weak.align, strong.mode, strong.align) == ("share", "uniform", "balanced", "none")
    assert weak.floor == strong.floor == 0.3  # only the auto keys move
    given = SelectConfig(mode="topk", align="uniform")
    assert given.resolve(True) == given == given.resolve(False)  # a setting a person chose is kept
    keys, labels, conf = np.array(["a", "b"], dtype=object), np.array([0, 1]), np.array([0.9, 0.8], np.float32)
    with pytest.raises(ValueError, match="must be resolved"):  # never silently one of the modes
        select_in_memory(keys, labels, conf, 2, auto)
    with pytest.raises(ValueError, match="must be resolved"):
        select_shards([], "unused", 2, SelectConfig(align="auto"), "digest", InProcess(False))
    fixed_k = SelectConfig(mode="auto", per_class=5).resolve(True)  # share has no use for a fixed K
    assert (fixed_k.mode, fixed_k.per_class) == ("balanced", 5)


# ---- the training order -----------------------------------------------------------------------------------------


def test_copy_order_golden():
    # equal copies: plain passes, every row once, then every row again
    assert copy_order(np.array([2, 2, 2])).tolist() == [0, 1, 2, 0, 1, 2]
    assert copy_order(np.array([1, 1, 1])).tolist() == [0, 1, 2]
    # one duplicated row among single ones: its copies a third of the shard apart, not back to back at the end
    assert copy_order(np.array([3, 1, 1, 1])).tolist() == [0, 1, 0, 2, 0, 3]
    assert copy_order(np.array([1, 1, 1, 3])).tolist() == [0, 3, 1, 3, 2, 3]
    assert copy_order(np.array([0, 2, 0])).tolist() == [1, 1]  # unselected rows never appear
    assert copy_order(np.zeros(0, np.int64)).tolist() == []
    order, names = copy_keys(np.array(["a", "b", "c"], dtype=object), np.array([1, 3, 0]))
    assert order.tolist() == [1, 0, 1, 1] and names == ["b", "a", "b_copy1", "b_copy2"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60))
def test_copy_order_holds_every_copy_and_spreads_them(copies):
    copies = np.array(copies, dtype=np.int64)
    order = copy_order(copies)
    np.testing.assert_array_equal(np.bincount(order, minlength=len(copies)), copies)
    np.testing.assert_array_equal(order, copy_order(copies))  # pure: the writer and the reader agree
    # A row's copies are never adjacent while some other row holds at least as many copies as it does.
    for r in np.flatnonzero(copies > 1):
        if (np.delete(copies, r) >= copies[r]).any():
            assert not (np.diff(np.flatnonzero(order == r)) == 1).any(), (copies.tolist(), order.tolist())


def test_training_order_is_a_seeded_permutation_of_the_keys():
    keys = np.array([f"k{i}" for i in range(50)], dtype=object)
    order = training_order(keys, seed=3)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert (
        training_order(keys, seed=3).tolist() == order.tolist() and training_order(keys, 4).tolist() != order.tolist()
    )
    # by key, not by position: the same keys in another order come out in the same key order
    assert keys[order].tolist() == keys[::-1][training_order(keys[::-1], seed=3)].tolist()


def test_bad_config_values_are_refused():
    bad_values = (
        {"mode": "paper"},
        {"floor": 1.5},
        {"per_class": -1},
        {"label_type": "fuzzy"},
        {"bins": 4},
        {"share_start": 0.0},
        {"share_step": -0.1},
        {"align": "prior"},
        {"align_iterations": 0},
    )
    for bad in bad_values:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SelectConfig(**bad)
    with pytest.raises(ValueError, match="per_class: mode share derives"):
        SelectConfig(mode="share", per_class=10)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="outside"):
        shard_histogram(np.array([0, 7]), np.array([0.5, 0.5]), 3, SelectConfig())


# ---- through Ray, on sidecars -------------------------------------------------------------------------------


def write_random_sidecars(root, rows_per_shard, num_classes, seed, topk=0, temperature=1.0, truth=False):
    """Pseudo-label sidecars of random soft labels, each for a small unlabeled shard written beside them (a few
    bytes per sample, named by its key, so a compact shard's content can be checked against its selection)."""
    rng = np.random.default_rng(seed)
    paths, n = [], 0
    for s, rows in enumerate(rows_per_shard):
        logits = torch.tensor(rng.normal(0, 2.5, (rows, num_classes)), dtype=torch.float32)
        keys = [f"s{s}-{i:05d}" for i in range(rows)]
        n += rows
        samples = [{"__key__": k, "png": k.encode(), "txt": b"x" * (i % 7)} for i, k in enumerate(keys)]
        (shard,) = write_shards(samples, root / "unlabeled", f"shard-{s}", 1)
        # ``truth``: the unbiased argmax as the true label (a diagnostic .cls); the teacher over-predicts class 0,
        # so that alignment has something to correct
        true = logits.argmax(1).tolist() if truth else [-1] * rows
        logits[:, 0] += 1.5
        table = build_table(shard, keys, logits, true, topk, temperature)
        path = root / f"shard-{s}.parquet"
        write_table(table, path, format=SIDECAR_FORMAT, made_by="test", bad="[]")
        paths.append(str(path))
    return paths


def run_selection(sidecars, out, num_classes, cfg, executor, **kwargs):
    return select_shards(sidecars, out, num_classes, cfg, "labels", executor, **kwargs)


def read_all(paths):
    tables = [pq.read_table(p) for p in paths]
    keys = np.concatenate([t.column("key").to_numpy(zero_copy_only=False) for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    conf = np.concatenate([t.column("confidence").to_numpy() for t in tables])
    return keys, labels, conf


PRIOR = np.array([0.3, 0.1, 0.2, 0.2, 0.2])  # a labeled split's class frequencies, for align: labeled


@pytest.mark.parametrize(
    "cfg, inline, topk, student_round",
    [
        (SelectConfig(mode="balanced", floor=0.3, bins=16), False, 0, 1),
        (SelectConfig(mode="topk", floor=0.5, per_class=20, label_type="hard"), False, 0, 1),
        (SelectConfig(mode="none", floor=0.6, seed=3), False, 0, 1),
        (SelectConfig(mode="balanced", floor=0.3, bins=16), True, 0, 1),
        (SelectConfig(mode="share", floor=0.3, bins=16), False, 0, 2),
        (SelectConfig(mode="share", floor=0.3, align="labeled"), True, 0, 1),
        (SelectConfig(mode="share", floor=0.2, align="uniform", align_iterations=3, bins=16), False, 0, 3),
        (SelectConfig(mode="balanced", floor=0.3, align="uniform", bins=16), False, 3, 1),
        (SelectConfig(mode="topk", floor=0.0, per_class=15, align="labeled", label_type="hard"), True, 2, 1),
    ],
    ids=[
        "balanced",
        "topk-hard",
        "none",
        "balanced-in-process",
        "share-round-2",
        "share-align-labeled-in-process",
        "share-align-uniform-3-iterations-round-3",
        "balanced-align-uniform-top-3",
        "topk-align-labeled-top-2-hard-in-process",
    ],
)
def test_ray_stage_equals_reference(ray_session, tmp_path, cfg, inline, topk, student_round):
    temperature = 0.5
    sidecars = write_random_sidecars(tmp_path / "pl", [90, 0, 57, 130], 5, seed=1, topk=topk, temperature=temperature)
    prior = None if cfg.align == "none" else PRIOR if cfg.align == "labeled" else np.full(5, 0.2)
    executor = InProcess(False) if inline else RayExecutor(False)
    kwargs = {"student_round": student_round, "temperature": temperature, "prior": prior}
    summary = run_selection(sidecars, tmp_path / "sel", 5, cfg, executor, **kwargs)
    assert summary["ran_as"] == ("in-process" if inline else "ray")
    keys, labels, conf, soft = reference_labels(sidecars, cfg, temperature, prior)
    expected = dict(zip(keys, select_in_memory(keys, labels, conf, 5, cfg, student_round), strict=True))
    got = {}
    for s in sidecars:
        t = pq.read_table(tmp_path / "sel" / (s.rsplit("/", 1)[1]))
        assert ("probs" in t.column_names) == (cfg.label_type == "soft" and not topk)
        assert ("topk_prob" in t.column_names) == (cfg.label_type == "soft" and bool(topk))
        rows = np.searchsorted(keys, t.column("key").to_numpy(zero_copy_only=False))  # keys come sorted
        np.testing.assert_array_equal(t.column("label").to_numpy(), labels[rows])
        np.testing.assert_array_equal(t.column("confidence").to_numpy(), conf[rows])
        if cfg.label_type == "soft" and t.num_rows:
            column = "topk_prob" if topk else "probs"
            np.testing.assert_array_equal(matrix(t.column(column)), soft[rows])
        for k, c in zip(t.column("key").to_pylist(), t.column("copies").to_pylist(), strict=True):
            assert k not in got, "a key appears twice in the selection"
            got[k] = c
    assert got == {k: int(c) for k, c in expected.items() if c > 0}
    assert summary["copies_out"] == sum(got.values()) and summary["kept"] == len(got)
    check_compact_shards(tmp_path / "sel", sidecars, summary)
    assert summary["rows_in"] == len(keys)
    assert summary["dropped_by_floor"] == int((conf < cfg.floor).sum())
    assert sum(summary["per_class_after"]) == summary["copies_out"]
    assert summary["align"] == cfg.align and ("share" in summary) == (cfg.mode == "share")
    if cfg.mode == "share":
        k = max(1, math.ceil(share_fraction(cfg, student_round) * (conf >= cfg.floor).sum() / 5))
        assert summary["share"] == share_fraction(cfg, student_round) and summary["K"] == k
    if cfg.align != "none":
        record = summary["alignment"]
        raw = np.concatenate([pq.read_table(s).column("label").to_numpy() for s in sidecars])
        assert record["per_class_before"] == np.bincount(raw, minlength=5).tolist()
        assert record["per_class_after"] == np.bincount(labels, minlength=5).tolist() == summary["per_class_before"]
        assert record["prior"] == cfg.align and record["iterations"] == cfg.align_iterations
        assert len(record["weights"]) == 5 and record["per_class_after"] != record["per_class_before"]


def matrix(column) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=np.float16)


def reference_labels(sidecars, cfg, temperature, prior):
    """Every row's key, label, confidence and stored soft label (float16) as the stage must see them, from the
    whole pool at once (keys sorted): as stored, or aligned by the in-memory reference and sharpened back."""
    t = pa.concat_tables(pq.read_table(s) for s in sidecars)
    order = np.argsort(t.column("key").to_numpy(zero_copy_only=False))
    t = t.take(pa.array(order))
    keys = t.column("key").to_numpy(zero_copy_only=False)
    column = "probs" if "probs" in t.column_names else "topk_prob"
    if cfg.align == "none":
        return keys, t.column("label").to_numpy(), t.column("confidence").to_numpy(), matrix(t.column(column))
    idx = None if column == "probs" else np.asarray(t.column("topk_idx").to_pylist())
    probs = teacher_probs(matrix(t.column(column)), temperature)
    _, aligned = align_in_memory(probs, idx, prior, cfg.align_iterations)
    labels, conf = label_and_confidence(aligned, idx)
    return keys, labels, conf, sharpen(aligned, temperature).astype(np.float16)


def check_compact_shards(sel, sidecars, summary):
    """Each non-empty selection has a tar of its samples' original files, copies materialised in ``copy_keys``
    order; an empty one has no tar; the summary counts them."""
    members = shards = size = 0
    for s in sidecars:
        t = pq.read_table(sel / (s.rsplit("/", 1)[1]))
        tar = sel / s.rsplit("/", 1)[1].replace(".parquet", ".tar")
        if t.num_rows == 0:
            assert not tar.exists()
            continue
        original = {x["__key__"]: x for x in iter_raw_samples(t.column("shard")[0].as_py())}
        order, names = copy_keys(t.column("key").to_numpy(zero_copy_only=False), t.column("copies").to_numpy())
        got = list(iter_raw_samples(str(tar)))
        assert [x["__key__"] for x in got] == names
        for row, x in zip(order, got, strict=True):
            source = original[t.column("key")[int(row)].as_py()]
            assert {k: v for k, v in x.items() if k != "__key__" and k != "__url__"} == {
                k: v for k, v in source.items() if k != "__key__" and k != "__url__"
            }
        footer = pq.read_schema(sel / (s.rsplit("/", 1)[1])).metadata
        assert int(footer[b"train_members"]) == len(got) and int(footer[b"tar_bytes"]) == tar.stat().st_size
        assert footer[b"tar_sha256"].decode() == hashlib.sha256(tar.read_bytes()).hexdigest()
        members, shards, size = members + len(got), shards + 1, size + tar.stat().st_size
    assert (summary["train_shards"], summary["train_members"], summary["train_bytes"]) == (shards, members, size)
    assert summary["train_members"] == summary["copies_out"]


def test_ray_stage_resumes_and_redoes_a_damaged_sidecar(ray_session, tmp_path):
    sidecars = write_random_sidecars(tmp_path / "pl", [40, 40, 40], 4, seed=2, topk=2)
    cfg, ray = SelectConfig(), RayExecutor(False)
    first = run_selection(sidecars, tmp_path / "sel", 4, cfg, ray)
    assert first["shards_resumed"] == 0
    damaged = tmp_path / "sel" / "shard-1.parquet"
    before = pq.read_table(damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])
    second = run_selection(sidecars, tmp_path / "sel", 4, cfg, ray)
    assert second["shards_resumed"] == 2
    assert pq.read_table(damaged).equals(before)
    assert "topk_idx" in before.column_names
    assert second["per_class_after"] == first["per_class_after"]
    # a compact shard lost after its sidecar was written: the sidecar is not trusted, both are written again
    tar = tmp_path / "sel" / "shard-2.tar"
    content = tar.read_bytes()
    tar.unlink()
    third = run_selection(sidecars, tmp_path / "sel", 4, cfg, ray)
    assert third["shards_resumed"] == 2 and tar.read_bytes() == content
    tar.write_bytes(content[:-1024])  # cut short: another size than the sidecar records
    assert run_selection(sidecars, tmp_path / "sel", 4, cfg, InProcess(False))["shards_resumed"] == 2
    assert tar.read_bytes() == content
    damaged = bytearray(content)  # damaged in place, same size: the receipt's sha256 finds it
    damaged[600] ^= 0xFF
    tar.write_bytes(bytes(damaged))
    assert run_selection(sidecars, tmp_path / "sel", 4, cfg, InProcess(False))["shards_resumed"] == 2
    assert tar.read_bytes() == content
    check_compact_shards(tmp_path / "sel", sidecars, third)


def test_a_shard_with_nothing_selected_keeps_no_compact_shard(tmp_path):
    from stages.data.compact import trusted_selection, write_selection
    from stages.storage.layout import compact as compact_path

    (sidecar,) = write_random_sidecars(tmp_path / "pl", [5], 3, seed=0)
    path = tmp_path / "sel" / "shard-0.parquet"
    stale = compact_path(path)
    stale.parent.mkdir()
    stale.write_bytes(b"a tar an earlier plan wrote")
    empty = pq.read_table(sidecar).slice(0, 0).append_column("copies", pa.array([], pa.int32()))
    assert write_selection(empty, path, 0, "plan") == {"train_members": 0, "tar_bytes": 0, "tar_sha256": ""}
    assert not stale.exists() and trusted_selection(path, "plan").rows == 0


def test_ray_stage_names_the_sidecar_with_bad_labels(ray_session, tmp_path):
    sidecars = write_random_sidecars(tmp_path / "pl", [10], 4, seed=0)
    with pytest.raises(ValueError, match="shard-0.parquet"):  # the task's own exception, not Ray's wrapper
        run_selection(sidecars, tmp_path / "sel", 3, SelectConfig(), RayExecutor(False))


def test_a_selection_made_from_other_pseudo_labels_is_not_reused(tmp_path):
    """The plan's digest names the pseudo-labels' digest: labels from another teacher make another selection, even
    where the per-class cutoffs come out the same."""
    sidecars = write_random_sidecars(tmp_path / "pl", [30, 30], 3, seed=4)
    cfg = SelectConfig(floor=0.0)
    first = select_shards(sidecars, tmp_path / "sel", 3, cfg, "labels-a", InProcess(False))
    assert select_shards(sidecars, tmp_path / "sel", 3, cfg, "labels-a", InProcess(False))["shards_resumed"] == 2
    again = select_shards(sidecars, tmp_path / "sel", 3, cfg, "labels-b", InProcess(False))
    assert again["shards_resumed"] == 0 and again["per_class_after"] == first["per_class_after"]


def test_the_summary_scores_aligned_and_kept_labels_against_the_truth(tmp_path):
    """With ``.cls`` in the unlabeled shards (true_label in the sidecars) the summary says how right the labels are,
    over all rows and over the kept ones; alignment to the (uniform) truth repairs most of a biased teacher."""
    sidecars = write_random_sidecars(tmp_path / "pl", [200, 150], 4, seed=5, temperature=0.5, truth=True)
    t = pa.concat_tables(pq.read_table(s) for s in sidecars)
    truth, stored = t.column("true_label").to_numpy(), t.column("label").to_numpy()
    cfg = SelectConfig(mode="share", floor=0.3, align="uniform", align_iterations=3)
    kwargs = {"student_round": 1, "temperature": 0.5, "prior": np.full(4, 0.25)}
    summary = run_selection(sidecars, tmp_path / "sel", 4, cfg, InProcess(False), **kwargs)
    keys, labels, _, _ = reference_labels(sidecars, cfg, 0.5, np.full(4, 0.25))
    truth = truth[np.argsort(t.column("key").to_numpy(zero_copy_only=False))]
    record = summary["truth"]
    assert record["rows"] == 350 and record["accuracy"] == round(float((labels == truth).mean()), 6)
    assert record["accuracy"] > (stored == t.column("true_label").to_numpy()).mean() + 0.1
    kept = pa.concat_tables(pq.read_table(tmp_path / "sel" / s.rsplit("/", 1)[1]) for s in sidecars)
    rows = np.searchsorted(keys, kept.column("key").to_numpy(zero_copy_only=False))
    assert record["kept"] == summary["kept"] == len(rows)
    assert record["kept_accuracy"] == round(float((labels[rows] == truth[rows]).mean()), 6)
    for c in range(4):
        mine = truth[rows] == c
        assert record["per_class_kept_accuracy"][c] == round(float((labels[rows][mine] == c).mean()), 6)
    # resumed shards bring their truth counts back from their footers
    again = run_selection(sidecars, tmp_path / "sel", 4, cfg, InProcess(False), **kwargs)
    assert again["shards_resumed"] == 2 and again["truth"] == record
    no_truth = write_random_sidecars(tmp_path / "pl2", [30], 4, seed=5)
    assert "truth" not in run_selection(no_truth, tmp_path / "sel2", 4, SelectConfig(), InProcess(False))


def test_a_changed_prior_or_share_reselects(tmp_path):
    """The plan's digest names the alignment's prior and weights and the round's share: either changed, the shards
    are selected again (the same ones, resumed)."""
    sidecars = write_random_sidecars(tmp_path / "pl", [60, 60], 3, seed=6, temperature=0.5)
    aligned = SelectConfig(floor=0.0, align="labeled")
    base = {"temperature": 0.5, "prior": np.array([0.5, 0.25, 0.25])}
    select_shards(sidecars, tmp_path / "sel", 3, aligned, "labels", InProcess(False), **base)
    again = select_shards(sidecars, tmp_path / "sel", 3, aligned, "labels", InProcess(False), **base)
    assert again["shards_resumed"] == 2
    other = base | {"prior": np.array([0.25, 0.5, 0.25])}
    assert (
        select_shards(sidecars, tmp_path / "sel", 3, aligned, "labels", InProcess(False), **other)["shards_resumed"]
        == 0
    )
    share = SelectConfig(mode="share", floor=0.0)
    first = select_shards(sidecars, tmp_path / "s2", 3, share, "labels", InProcess(False), student_round=1)
    later = select_shards(sidecars, tmp_path / "s2", 3, share, "labels", InProcess(False), student_round=2)
    assert later["shards_resumed"] == 0 and later["kept"] > first["kept"]
    with pytest.raises(ValueError, match="needs the class prior"):
        select_shards(sidecars, tmp_path / "s3", 3, aligned, "labels", InProcess(False))


def test_the_stage_names_its_round_share_and_prior_in_its_inputs():
    """``Select``'s inputs (what makes the stage stale) gain a key only when share or alignment is on, so a run
    started before they existed keeps its selections; the prior comes from the labeled split, a class missing there
    is one DataError line."""
    from types import SimpleNamespace

    from stages.core.errors import DataError
    from stages.select import Select

    def ctx(labels):
        data = SimpleNamespace(num_classes=3, labeled=SimpleNamespace(labels=np.array(labels)))
        return SimpleNamespace(
            config_digest="c", manifest=SimpleNamespace(digest=lambda stage: "p"), data=data, round=2
        )

    plain = Select(SelectConfig(), temperature=0.5, student_round=2).inputs(ctx([0, 1, 2]))
    assert plain == {"config": "c", "pseudo_label": "p", "seed": "0"}
    share = Select(SelectConfig(mode="share"), temperature=0.5, student_round=2)
    assert share.inputs(ctx([0, 1, 2]))["share"] == "0.75"
    assert dataclasses.replace(share, student_round=3).inputs(ctx([0, 1, 2]))["share"] == "1.0"
    labeled = Select(SelectConfig(align="labeled"), temperature=0.5)
    assert labeled.prior(ctx([0, 0, 1, 2])).tolist() == [0.5, 0.25, 0.25]
    assert labeled.inputs(ctx([0, 0, 1, 2]))["prior"] != labeled.inputs(ctx([0, 1, 1, 2]))["prior"]
    with pytest.raises(DataError, match=r"round 2: select.align: labeled: class\(es\) \[2\]"):
        labeled.inputs(ctx([0, 1]))
