"""The select stage: confidence floor and class balancing (or class-wise shares) over the pseudo-label sidecars, in
three passes of per-shard tasks (after alignment passes, when on); the last one also copies the selected images into
compact training shards.

1. histograms (``classes x bins`` per shard, summed in the driver) -> per-class boundary bins and copy counts;
2. boundary candidates (a few rows per class and shard) -> exact per-class cutoffs;
3. per shard: the compact training shard ``<selection>/<shard_id>.tar`` (the selected samples read from the
   unlabeled shard once, copies materialised, in a seeded random order: ``stages/data/compact.py`` says why and
   how), then the selection sidecar ``<selection>/<shard_id>.parquet`` in the same row order: ``key, shard, copies,
   label, confidence`` and, with ``label_type: soft``, the teacher's soft label (``probs`` or
   ``topk_idx/topk_prob``). A shard with nothing selected gets an empty sidecar and no tar, so every unlabeled shard
   has exactly one selection sidecar.

With ``select.align`` (distribution alignment, ``stages/maths/alignment.py``) a pass 0 comes first: each shard's
sum of the teacher's probabilities at T = 1 (recovered from the stored soft labels), once per
``align_iterations``; the driver turns the sums into per-class weights ``w = prior / mean_pool(p)``, and passes 1-3
read each row's aligned ``label`` and ``confidence`` (argmax and max of ``normalise(p * w)``) instead of the stored
ones. The selection sidecar then holds the aligned label and confidence, and as soft target the aligned distribution
sharpened back to ``pseudo_label.temperature``. ``selection.json`` records the weights and the per-class counts
before and after alignment. With ``mode: share`` the per-class budget follows the student round (``Select``'s
``student_round``).

Where the unlabeled shards carry ``.cls`` (a diagnostic; never trained on), pass 3 also counts how many of the
(aligned) labels, and of the kept rows' labels, are right: ``truth`` in ``selection.json``.

The maths is ``stages/maths/selection.py`` and ``stages/maths/alignment.py`` (pure functions over arrays); the
driver holds histograms, per-class sums and cutoffs only. Each pass runs on the run's executor
(``stages.core.stage``): in this process for small data, as Ray tasks otherwise. Pass-3 sidecars record what made
them: the plan's digest, which names the pseudo-labels' own digest (so labels from another teacher make another
plan), the alignment's prior and weights and the round's share, and their tar's receipt; a re-run with the same
inputs keeps the shards already written whole (resume). ``selection.json`` (the summary, also in the round manifest)
sits beside them; the report draws it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.config import identity_tree
from stages.core.errors import DataError
from stages.core.stage import StageContext, StageOutput
from stages.data.compact import SELECTION_FORMAT, trusted_selection, write_selection
from stages.maths import alignment
from stages.maths.metrics import TRUTH, summarize_truth, truth_counts
from stages.maths.selection import (
    CandidateMerger,
    SelectConfig,
    SelectPlan,
    plan_selection,
    shard_candidates,
    shard_copies,
    shard_histogram,
    share_fraction,
)
from stages.storage.artifacts import read_footer
from stages.storage.files import Location, atomic_write_json, join, makedirs, read_table
from stages.storage.layout import compact

log = logging.getLogger(__name__)

SOFT_COLUMNS = ("probs", "topk_idx", "topk_prob")


@dataclasses.dataclass(frozen=True)
class Alignment:
    """What a task needs to align a shard's rows: the per-class weights and the soft labels' temperature."""

    weights: np.ndarray
    temperature: float


def _list_matrix(column: pa.ChunkedArray, rows: int, dtype) -> np.ndarray:
    """An equal-length list column as a ``rows x width`` array."""
    values = pc.list_flatten(column).to_numpy()
    return values.astype(dtype, copy=False).reshape(rows, -1) if rows else np.zeros((0, 0), dtype)


def _teacher_probs(t: pa.Table, temperature: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's own probabilities (T = 1) of a sidecar's rows, and their class indices for a top-k sidecar."""
    n = t.num_rows
    if "probs" in t.column_names:
        return alignment.teacher_probs(_list_matrix(t.column("probs"), n, np.float32), temperature), None
    idx = _list_matrix(t.column("topk_idx"), n, np.int64)
    return alignment.teacher_probs(_list_matrix(t.column("topk_prob"), n, np.float32), temperature), idx


def _read(path: str, columns: list[str], align: Alignment | None) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A sidecar's ``columns`` and each row's label and confidence: as stored, or aligned."""
    if align is None:
        t = read_table(path, columns=[*columns, "label", "confidence"])
        return t, t.column("label").to_numpy(), t.column("confidence").to_numpy()
    t = read_table(path)  # the soft labels are most of a sidecar: reading it whole costs little more
    probs, idx = _teacher_probs(t, align.temperature)
    return t, *alignment.label_and_confidence(alignment.align(probs, idx, align.weights), idx)


def _align_task(path: str, num_classes: int, temperature: float, weights: np.ndarray) -> tuple:
    """Pass 0 for one shard: the exact per-class sum of its aligned probabilities under ``weights``, its row count
    and its stored (unaligned) label counts."""
    t = read_table(path)
    probs, idx = _teacher_probs(t, temperature)
    sums = alignment.pool_sum(alignment.align(probs, idx, weights), idx, num_classes)
    labels = t.column("label").to_numpy()
    return sums, t.num_rows, np.bincount(labels, minlength=num_classes)[:num_classes]


def _histogram_task(
    path: str, num_classes: int, cfg: SelectConfig, align: Alignment | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 for one shard; the histogram travels sparse (a shard fills few of the classes x bins cells)."""
    _, labels, conf = _read(path, [], align)
    try:
        hist, above = shard_histogram(labels, conf, num_classes, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cells = np.flatnonzero(hist)
    return cells, hist.reshape(-1)[cells], above


def _candidates_task(path: str, plan: SelectPlan, cfg: SelectConfig, align: Alignment | None) -> dict:
    t, labels, conf = _read(path, ["key"], align)
    return shard_candidates(t.column("key").to_numpy(zero_copy_only=False), labels, conf, plan, cfg)


def _write_task(
    path: str, out_path: str, plan: SelectPlan, cfg: SelectConfig, align: Alignment | None, made_by: str
) -> dict:
    """Writes one compact training shard and its selection sidecar (unless this plan's are there, whole); returns
    per-class counts, the truth counts and the compact shard's ``train_members``/``train_bytes``."""
    num_classes = len(plan.boundary)
    footer = trusted_selection(out_path, made_by)
    if footer is not None:
        counts = json.loads(footer.meta["counts"])
        return counts | {
            "train_members": int(footer.meta["train_members"]),
            "train_bytes": int(footer.meta["tar_bytes"]),
            "resumed": True,
        }
    t = read_table(path)
    keys = t.column("key").to_numpy(zero_copy_only=False)
    labels, conf = t.column("label").to_numpy(), t.column("confidence").to_numpy()
    if align is not None:
        probs, idx = _teacher_probs(t, align.temperature)
        aligned = alignment.align(probs, idx, align.weights)
        labels, conf = alignment.label_and_confidence(aligned, idx)
        t = _with_aligned(t, labels, conf, alignment.sharpen(aligned, align.temperature))
    copies = shard_copies(keys, labels, conf, plan, cfg)
    kept = np.flatnonzero(copies > 0)
    columns = ["key", "shard", "label", "confidence"]
    if cfg.label_type == "soft":
        columns += [c for c in SOFT_COLUMNS if c in t.column_names]
    out = t.select(columns).take(pa.array(kept, pa.int64()))
    out = out.add_column(2, "copies", pa.array(copies[kept].astype(np.int32)))
    counts = {
        "kept": np.bincount(labels[kept], minlength=num_classes).tolist(),
        "after": np.bincount(labels[kept], weights=copies[kept], minlength=num_classes).astype(int).tolist(),
    }
    if "true_label" in t.column_names:
        counts |= truth_counts(t.column("true_label").to_numpy(), labels, copies > 0, num_classes)
    train = write_selection(out, out_path, cfg.seed, made_by, counts=json.dumps(counts))
    return counts | {"train_members": train["train_members"], "train_bytes": train["tar_bytes"], "resumed": False}


def _with_aligned(t: pa.Table, labels: np.ndarray, conf: np.ndarray, soft: np.ndarray) -> pa.Table:
    """The sidecar's rows with the aligned label and confidence, and the sharpened aligned soft label."""
    if not t.num_rows:
        return t
    column = "probs" if "probs" in t.column_names else "topk_prob"
    values = pa.FixedSizeListArray.from_arrays(pa.array(soft.reshape(-1).astype(np.float16)), soft.shape[1])
    for name, array in (
        ("label", pa.array(labels.astype(np.int32))),
        ("confidence", pa.array(conf.astype(np.float32))),
        (column, values.cast(t.schema.field(column).type)),
    ):
        t = t.set_column(t.column_names.index(name), name, array)
    return t


def plan_digest(
    plan: SelectPlan,
    cfg: SelectConfig,
    labels_digest: str,
    student_round: int = 1,
    align: Alignment | None = None,
    prior: np.ndarray | None = None,
) -> str:
    """What makes a shard's selection: the settings, the student round (mode ``share``), the alignment's prior and
    weights, the plan's per-class cutoffs, and the pseudo-labels' digest."""
    settings = json.dumps(identity_tree(cfg), sort_keys=True)
    h = hashlib.sha256(f"{SELECTION_FORMAT}:{settings}:{labels_digest}".encode())
    if cfg.mode == "share":
        h.update(f":share={share_fraction(cfg, student_round)!r}".encode())
    if align is not None:
        h.update(f":align T={align.temperature!r}".encode())
        for part in (prior, align.weights):
            h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
    for part in ("boundary", "need", "base", "extra", "cut_conf", "cut_hash", "dup_cut"):
        h.update(np.ascontiguousarray(getattr(plan, part)).tobytes())
    return h.hexdigest()[:24]


def select_shards(
    sidecars: list[Location],
    out_dir: Location,
    num_classes: int,
    cfg: SelectConfig,
    labels_digest: str,
    executor,
    *,
    student_round: int = 1,
    temperature: float = 1.0,
    prior: np.ndarray | None = None,
) -> dict:
    """Selects pseudo-labeled samples from per-shard sidecars (whose contents ``labels_digest`` names, soft labels at
    ``temperature``); writes the compact shards and selection sidecars; returns the summary (also
    ``selection.json``). ``prior`` (with ``cfg.align`` not ``none``): the class prior the labels are aligned to."""
    cfg.check_resolved()
    start = time.perf_counter()
    out = join(out_dir)
    makedirs(out)
    n, paths = len(sidecars), [str(s) for s in sidecars]
    passes = 3 + (cfg.align_iterations if cfg.align != "none" else 0)
    align, aligned = None, {}
    if cfg.align != "none":
        if prior is None:
            raise ValueError(f"select.align: {cfg.align} needs the class prior")
        align, aligned = _align(paths, num_classes, cfg, temperature, prior, executor)
    hist = np.zeros((num_classes, cfg.bins), dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    pass1 = ((s, num_classes, cfg, align) for s in paths)
    for cells, counts, a in executor.map(_histogram_task, pass1, n, f"select {passes - 2}/{passes}"):
        hist.reshape(-1)[cells] += counts
        above += a
    plan = plan_selection(hist, above, cfg, student_round)
    merger = CandidateMerger(plan)
    if (plan.need > 0).any() or (plan.extra > 0).any():
        shared = executor.share(plan)
        args2 = ((s, shared, cfg, align) for s in paths)
        for cand in executor.map(_candidates_task, args2, n, f"select {passes - 1}/{passes}"):
            merger.add(cand)
    plan = merger.finalize()
    made_by = plan_digest(plan, cfg, labels_digest, student_round, align, prior)
    shared = executor.share(plan)
    kept = np.zeros(num_classes, dtype=np.int64)
    after = np.zeros(num_classes, dtype=np.int64)
    truth = {k: np.zeros(num_classes, dtype=np.int64) for k in TRUTH}
    train = dict.fromkeys(("train_shards", "train_members", "train_bytes", "shards_resumed"), 0)
    args = ((s, str(join(out, _name(s))), shared, cfg, align, made_by) for s in paths)
    for counts in executor.map(_write_task, args, n, f"select {passes}/{passes}"):
        kept += counts["kept"]
        after += counts["after"]
        for k in TRUTH:
            truth[k] += counts.get(k, 0)
        train["shards_resumed"] += counts["resumed"]
        train["train_shards"] += int(counts["train_members"] > 0)
        train["train_members"] += counts["train_members"]
        train["train_bytes"] += counts["train_bytes"]
    summary = summarize(hist, plan, kept, after, cfg) | train
    if cfg.mode == "share":
        summary["share"] = share_fraction(cfg, student_round)
    summary["align"] = cfg.align
    if align is not None:
        summary["alignment"] = aligned | {"per_class_after": hist.sum(axis=1).tolist()}
    if truth["truth_rows"].sum():
        summary["truth"] = summarize_truth(truth)
    summary |= {"shards": n, "seconds": round(time.perf_counter() - start, 3), "ran_as": executor.kind}
    log.info(
        "select: %d of %d rows kept (%d below the floor), %d copies with K=%d",
        summary["kept"],
        summary["rows_in"],
        summary["dropped_by_floor"],
        summary["copies_out"],
        plan.k,
    )
    return summary


def _align(
    paths: list[str], num_classes: int, cfg: SelectConfig, temperature: float, prior: np.ndarray, executor
) -> tuple[Alignment, dict]:
    """Pass 0, once per iteration: the pool's per-class sums under the current weights, reduced to the next
    weights. Returns the final alignment and its summary (prior, weights, per-class counts before it)."""
    weights = np.ones(num_classes)
    before = np.zeros(num_classes, dtype=np.int64)
    passes = 3 + cfg.align_iterations
    for i in range(cfg.align_iterations):
        sums, rows = np.zeros(num_classes, dtype=np.int64), 0
        args = ((s, num_classes, temperature, weights) for s in paths)
        for shard_sums, shard_rows, labels in executor.map(_align_task, args, len(paths), f"select {i + 1}/{passes}"):
            sums, rows = sums + shard_sums, rows + shard_rows
            if i == 0:
                before += labels
        weights = alignment.next_weights(weights, prior, sums, rows)
    summary = {
        "prior": cfg.align,
        "iterations": cfg.align_iterations,
        "prior_weights": [round(float(p), 6) for p in prior],
        "weights": [round(float(w), 6) for w in weights],
        "per_class_before": before.tolist(),
    }
    return Alignment(weights, temperature), summary


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def summarize(hist: np.ndarray, plan: SelectPlan, kept: np.ndarray, after: np.ndarray, cfg: SelectConfig) -> dict:
    """The stage summary: per-class counts before/after, thresholds, duplication, and a coarse histogram."""
    before = hist.sum(axis=1)
    thresholds = np.where(plan.boundary >= 0, plan.cut_conf, cfg.floor).astype(float)
    duplication = np.divide(after, kept, out=np.zeros(len(kept)), where=kept > 0)
    edges = np.linspace(0, cfg.bins, 33).astype(int)
    coarse = np.add.reduceat(hist.sum(axis=0), edges[:-1])
    return {
        "mode": cfg.mode,
        "floor": cfg.floor,
        "label_type": cfg.label_type,
        "K": int(plan.k),
        "rows_in": int(before.sum()),
        "dropped_by_floor": int(before.sum() - plan.above_floor.sum()),
        "kept": int(kept.sum()),
        "copies_out": int(after.sum()),
        "per_class_before": before.tolist(),
        "per_class_candidates": plan.above_floor.tolist(),
        "per_class_kept": kept.tolist(),
        "per_class_after": after.tolist(),
        "thresholds": [round(t, 6) for t in thresholds.tolist()],
        "duplication": [round(d, 4) for d in duplication.tolist()],
        "confidence_histogram": {"edges": (edges / cfg.bins).round(6).tolist(), "counts": coarse.tolist()},
    }


@dataclasses.dataclass(frozen=True)
class Select:
    """The stage: this round's pseudo-labels -> selection sidecars and compact training shards."""

    cfg: SelectConfig  # its seed is the round's (pipeline/choices.round_seeds)
    temperature: float  # pseudo_label.temperature: the soft labels' (alignment recovers T = 1 from them)
    student_round: int = 1  # mode share: the round whose share q_r is kept
    name: ClassVar[str] = "select"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        inputs = {
            "config": ctx.config_digest,
            "pseudo_label": ctx.manifest.digest("pseudo_label"),
            "seed": str(self.cfg.seed),
        }
        if self.cfg.mode == "share":  # only then: a run started before these keys existed keeps its selections
            inputs["share"] = repr(share_fraction(self.cfg, self.student_round))
        if self.cfg.align != "none":  # a changed labeled split changes the prior, and so the selection
            inputs["prior"] = hashlib.sha256(self.prior(ctx).tobytes()).hexdigest()[:16]
        return inputs

    def prior(self, ctx: StageContext) -> np.ndarray:
        """The class prior of ``select.align`` (float64): uniform, or the labeled training split's frequencies."""
        try:
            return alignment.class_prior(self.cfg.align, ctx.data.num_classes, ctx.data.labeled.labels)
        except ValueError as e:
            raise DataError(f"round {ctx.round}: select.{e}") from None

    def run(self, ctx: StageContext) -> StageOutput:
        layout, shards = ctx.layout, ctx.data.unlabeled_shards
        sidecars = [layout.pseudo_label(s) for s in shards]
        summary = select_shards(
            sidecars,
            layout.selection,
            ctx.data.num_classes,
            self.cfg,
            ctx.manifest.digest("pseudo_label"),
            ctx.executor,
            student_round=self.student_round,
            temperature=self.temperature,
            prior=self.prior(ctx) if self.cfg.align != "none" else None,
        )
        if not summary["copies_out"]:
            raise DataError(
                f"round {ctx.round}: selection kept no pseudo-labeled sample of {summary['rows_in']} "
                f"(select.floor={self.cfg.floor}); lower the floor or train a better teacher"
            )
        atomic_write_json(layout.selection_summary, summary)
        files = [layout.selected(s) for s in shards] + [layout.selection_summary]
        files += [compact(layout.selected(s)) for s in shards if _kept_any(layout.selected(s))]
        return StageOutput(files, summary)


def _kept_any(sidecar: Location) -> bool:
    footer = read_footer(sidecar, SELECTION_FORMAT)
    return bool(footer and footer.rows)
