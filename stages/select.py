"""The select stage: confidence floor and class balancing over the pseudo-label sidecars, in three passes of
per-shard tasks; the last one also copies the selected images into compact training shards.

1. histograms (``classes x bins`` per shard, summed in the driver) -> per-class boundary bins and copy counts;
2. boundary candidates (a few rows per class and shard) -> exact per-class cutoffs;
3. per shard: the compact training shard ``<selection>/<shard_id>.tar`` (the selected samples read from the
   unlabeled shard once, copies materialised, in a seeded random order: ``stages/data/compact.py`` says why and
   how), then the selection sidecar ``<selection>/<shard_id>.parquet`` in the same row order: ``key, shard, copies,
   label, confidence`` and, with ``label_type: soft``, the teacher's soft label (``probs`` or
   ``topk_idx/topk_prob``). A shard with nothing selected gets an empty sidecar and no tar, so every unlabeled shard
   has exactly one selection sidecar.

The maths is ``stages/maths/selection.py`` (pure functions over arrays); the driver holds histograms and cutoffs
only. Each pass runs on the run's executor (``stages.core.stage``): in this process for small data, as Ray tasks
otherwise. Pass-3 sidecars record what made them: the plan's digest, which names the pseudo-labels' own digest (so
labels from another teacher make another plan), and their tar's receipt; a re-run with the same inputs keeps the
shards already written whole (resume). ``selection.json`` (the summary, also in the round manifest) sits beside
them; the report draws it.
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

from stages.core.errors import DataError
from stages.core.stage import StageContext, StageOutput
from stages.data.compact import SELECTION_FORMAT, trusted_selection, write_selection
from stages.maths.selection import (
    CandidateMerger,
    SelectConfig,
    SelectPlan,
    plan_selection,
    shard_candidates,
    shard_copies,
    shard_histogram,
)
from stages.storage.artifacts import read_footer
from stages.storage.files import Location, atomic_write_json, join, makedirs, read_table
from stages.storage.layout import compact

log = logging.getLogger(__name__)

SOFT_COLUMNS = ("probs", "topk_idx", "topk_prob")


def _histogram_task(path: str, num_classes: int, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 for one shard; the histogram travels sparse (a shard fills few of the classes x bins cells)."""
    t = read_table(path, columns=["label", "confidence"])
    try:
        hist, above = shard_histogram(t.column("label").to_numpy(), t.column("confidence").to_numpy(), num_classes, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cells = np.flatnonzero(hist)
    return cells, hist.reshape(-1)[cells], above


def _candidates_task(path: str, plan: SelectPlan, cfg: SelectConfig) -> dict:
    t = read_table(path, columns=["key", "label", "confidence"])
    labels, conf = t.column("label").to_numpy(), t.column("confidence").to_numpy()
    return shard_candidates(t.column("key").to_numpy(zero_copy_only=False), labels, conf, plan, cfg)


def _write_task(path: str, out_path: str, plan: SelectPlan, cfg: SelectConfig, made_by: str) -> dict:
    """Writes one compact training shard and its selection sidecar (unless this plan's are there, whole); returns
    per-class counts and the compact shard's ``train_members``/``train_bytes``."""
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
    train = write_selection(out, out_path, cfg.seed, made_by, counts=json.dumps(counts))
    return counts | {"train_members": train["train_members"], "train_bytes": train["tar_bytes"], "resumed": False}


def plan_digest(plan: SelectPlan, cfg: SelectConfig, labels_digest: str) -> str:
    """What makes a shard's selection: the settings, the plan's per-class cutoffs, and the pseudo-labels' digest."""
    h = hashlib.sha256(f"{SELECTION_FORMAT}:{cfg!r}:{labels_digest}".encode())
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
) -> dict:
    """Selects pseudo-labeled samples from per-shard sidecars (whose contents ``labels_digest`` names); writes the
    compact shards and selection sidecars; returns the summary (also ``selection.json``)."""
    start = time.perf_counter()
    out = join(out_dir)
    makedirs(out)
    n, paths = len(sidecars), [str(s) for s in sidecars]
    hist = np.zeros((num_classes, cfg.bins), dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    pass1 = ((s, num_classes, cfg) for s in paths)
    for cells, counts, a in executor.map(_histogram_task, pass1, n, "select 1/3"):
        hist.reshape(-1)[cells] += counts
        above += a
    plan = plan_selection(hist, above, cfg)
    merger = CandidateMerger(plan)
    if (plan.need > 0).any() or (plan.extra > 0).any():
        shared = executor.share(plan)
        for cand in executor.map(_candidates_task, ((s, shared, cfg) for s in paths), n, "select 2/3"):
            merger.add(cand)
    plan = merger.finalize()
    made_by = plan_digest(plan, cfg, labels_digest)
    shared = executor.share(plan)
    kept = np.zeros(num_classes, dtype=np.int64)
    after = np.zeros(num_classes, dtype=np.int64)
    train = dict.fromkeys(("train_shards", "train_members", "train_bytes", "shards_resumed"), 0)
    args = ((s, str(join(out, _name(s))), shared, cfg, made_by) for s in paths)
    for counts in executor.map(_write_task, args, n, "select 3/3"):
        kept += counts["kept"]
        after += counts["after"]
        train["shards_resumed"] += counts["resumed"]
        train["train_shards"] += int(counts["train_members"] > 0)
        train["train_members"] += counts["train_members"]
        train["train_bytes"] += counts["train_bytes"]
    summary = summarize(hist, plan, kept, after, cfg) | train
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
    name: ClassVar[str] = "select"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {
            "config": ctx.config_digest,
            "pseudo_label": ctx.manifest.digest("pseudo_label"),
            "seed": str(self.cfg.seed),
        }

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
