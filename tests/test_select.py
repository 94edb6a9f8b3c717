"""Selection: properties of the reference, a hand-worked example, and sharded/Ray == in-memory."""

from __future__ import annotations

import dataclasses
import hashlib

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
    cfg = SelectConfig(
        mode=draw(st.sampled_from(["none", "topk", "balanced"])),
        floor=draw(st.sampled_from([0.0, 0.3, 0.5, 0.95])),
        per_class=draw(st.integers(0, 25)),
        per_class_factor=draw(st.sampled_from([0.5, 1.0, 2.0])),
        seed=draw(st.integers(0, 3)),
        bins=draw(st.sampled_from([16, 64, 2048])),
    )
    return keys, labels, conf, num_classes, cfg


def sharded(keys, labels, conf, num_classes, cfg, shards: int, seed: int = 0) -> np.ndarray:
    """The three-pass path, in-process, over a random split of the rows into shards."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(keys)), shards)
    hist = np.zeros((num_classes, cfg.bins), dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    for p in parts:
        h, a = shard_histogram(labels[p], conf[p], num_classes, cfg)
        hist, above = hist + h, above + a
    merger = CandidateMerger(plan_selection(hist, above, cfg), compact_at=5)  # compacts between shards too
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
    keys, labels, conf, num_classes, cfg = inputs
    copies = select_in_memory(keys, labels, conf, num_classes, cfg)
    above = conf >= cfg.floor
    assert (copies >= 0).all() and len(copies) == len(keys)
    assert (conf[copies > 0] >= cfg.floor).all(), "a sample below the floor was kept"
    assert (copies[above] >= 1).all() if cfg.mode == "none" else True
    k = per_class_budget(np.bincount(labels[above], minlength=num_classes), cfg)
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
    again = select_in_memory(keys[order], labels[order], conf[order], num_classes, cfg)
    np.testing.assert_array_equal(again, copies[order])


@settings(max_examples=300, deadline=None)
@given(selection_inputs(), st.integers(1, 7))
def test_sharded_three_pass_equals_reference(inputs, shards):
    keys, labels, conf, num_classes, cfg = inputs
    expected = select_in_memory(keys, labels, conf, num_classes, cfg)
    np.testing.assert_array_equal(sharded(keys, labels, conf, num_classes, cfg, shards), expected)


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
    for bad in ({"mode": "paper"}, {"floor": 1.5}, {"per_class": -1}, {"label_type": "fuzzy"}, {"bins": 4}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SelectConfig(**bad)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="outside"):
        shard_histogram(np.array([0, 7]), np.array([0.5, 0.5]), 3, SelectConfig())


# ---- through Ray, on sidecars -------------------------------------------------------------------------------


def write_random_sidecars(root, rows_per_shard, num_classes, seed, topk=0):
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
        table = build_table(shard, keys, logits, [-1] * rows, topk)
        path = root / f"shard-{s}.parquet"
        write_table(table, path, format=SIDECAR_FORMAT, made_by="test", bad="[]")
        paths.append(str(path))
    return paths


def run_selection(sidecars, out, num_classes, cfg, executor):
    return select_shards(sidecars, out, num_classes, cfg, "labels", executor)


def read_all(paths):
    tables = [pq.read_table(p) for p in paths]
    keys = np.concatenate([t.column("key").to_numpy(zero_copy_only=False) for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    conf = np.concatenate([t.column("confidence").to_numpy() for t in tables])
    return keys, labels, conf


@pytest.mark.parametrize(
    "cfg, inline",
    [
        (SelectConfig(mode="balanced", floor=0.3, bins=16), False),
        (SelectConfig(mode="topk", floor=0.5, per_class=20, label_type="hard"), False),
        (SelectConfig(mode="none", floor=0.6, seed=3), False),
        (SelectConfig(mode="balanced", floor=0.3, bins=16), True),
    ],
    ids=["balanced", "topk-hard", "none", "balanced-in-process"],
)
def test_ray_stage_equals_reference(ray_session, tmp_path, cfg, inline):
    sidecars = write_random_sidecars(tmp_path / "pl", [90, 0, 57, 130], 5, seed=1)
    summary = run_selection(sidecars, tmp_path / "sel", 5, cfg, InProcess(False) if inline else RayExecutor(False))
    assert summary["ran_as"] == ("in-process" if inline else "ray")
    keys, labels, conf = read_all(sidecars)
    expected = dict(zip(keys, select_in_memory(keys, labels, conf, 5, cfg), strict=True))
    got = {}
    for s in sidecars:
        t = pq.read_table(tmp_path / "sel" / (s.rsplit("/", 1)[1]))
        assert ("probs" in t.column_names) == (cfg.label_type == "soft")
        for k, c in zip(t.column("key").to_pylist(), t.column("copies").to_pylist(), strict=True):
            assert k not in got, "a key appears twice in the selection"
            got[k] = c
    assert got == {k: int(c) for k, c in expected.items() if c > 0}
    assert summary["copies_out"] == sum(got.values()) and summary["kept"] == len(got)
    check_compact_shards(tmp_path / "sel", sidecars, summary)
    assert summary["rows_in"] == len(keys)
    assert summary["dropped_by_floor"] == int((conf < cfg.floor).sum())
    assert sum(summary["per_class_after"]) == summary["copies_out"]


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
