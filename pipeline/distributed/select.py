"""The select stage on Ray: three passes of per-shard tasks over the pseudo-label sidecars; the last one also copies
the selected images into compact training shards.

1. histograms (``classes x bins`` per shard, summed in the driver) -> per-class boundary bins and copy counts;
2. boundary candidates (a few rows per class and shard) -> exact per-class cutoffs;
3. per shard: the compact training shard ``<out_dir>/<shard_id>.tar`` (the selected samples read from the
   unlabeled shard once, copies materialised, in a seeded random order: ``stages/data/compact.py`` says why and how),
   then the selection sidecar ``<out_dir>/<shard_id>.parquet`` in the same row order: ``key, shard, copies, label,
   confidence`` and, with ``label_type: soft``, the teacher's soft label (``probs`` or ``topk_idx/topk_prob``). A
   shard with nothing selected gets an empty sidecar and no tar, so every unlabeled shard has exactly one
   selection sidecar.

The driver holds histograms and cutoffs only. Pass 3 sidecars carry the plan's digest and their tar's size in
their footer; a re-run with the same inputs skips shards already written (resume), and neither a half-written file
(temp name) nor a sidecar whose tar is missing or of another size is trusted. ``selection.json`` (the summary also
recorded in the round manifest; ``train_shards``, ``train_members``, ``train_bytes`` count the compact shards) and
``selection.png`` sit beside them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa

from pipeline.distributed.runtime import run_tasks
from stages.data.compact import selection_footer, write_selection
from stages.maths.selection import (
    CandidateMerger,
    SelectConfig,
    SelectPlan,
    plan_selection,
    shard_candidates,
    shard_copies,
    shard_histogram,
)
from stages.storage.files import (
    Location,
    atomic_write_bytes,
    atomic_write_json,
    join,
    makedirs,
    name,
    read_table,
    size,
    stamp,
)

log = logging.getLogger(__name__)

SOFT_COLUMNS = ("probs", "topk_idx", "topk_prob")
INLINE_BYTES = 16 << 20  # below this much input (sidecars and the unlabeled shards pass 3 reads), run in the driver


def _read(path: str, columns: list[str]) -> pa.Table:
    return read_table(path, columns=columns)


def _histogram_task(path: str, num_classes: int, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 for one shard; the histogram travels sparse (a shard fills few of the classes x bins cells)."""
    t = _read(path, ["label", "confidence"])
    try:
        hist, above = shard_histogram(t.column("label").to_numpy(), t.column("confidence").to_numpy(), num_classes, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cells = np.flatnonzero(hist)
    return cells, hist.reshape(-1)[cells], above


def _candidates_task(path: str, plan: SelectPlan, cfg: SelectConfig) -> dict:
    t = _read(path, ["key", "label", "confidence"])
    labels, conf = t.column("label").to_numpy(), t.column("confidence").to_numpy()
    return shard_candidates(t.column("key").to_numpy(zero_copy_only=False), labels, conf, plan, cfg)


def _write_task(path: str, out_path: str, plan: SelectPlan, cfg: SelectConfig, digest: str) -> dict:
    """Writes one compact training shard and its selection sidecar (unless valid ones for this plan exist); returns
    per-class counts and the compact shard's ``train_members``/``train_bytes``."""
    num_classes = len(plan.boundary)
    existing = _selection_counts(out_path, digest, num_classes)
    if existing is not None:
        return existing | {"resumed": True}
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
    train = write_selection(out, out_path, cfg.seed, plan=digest, counts=json.dumps(counts))
    return counts | train | {"resumed": False}


def _selection_counts(path: str, digest: str, num_classes: int) -> dict | None:
    """Per-class counts and compact-shard sizes of a complete selection written for this plan, or None."""
    meta = selection_footer(path)
    if meta is None or meta.get(b"plan") != digest.encode():
        return None
    counts = json.loads(meta[b"counts"])
    if len(counts["kept"]) != num_classes:
        return None
    return counts | {k: int(meta[k.encode()]) for k in ("train_members", "train_bytes")}


def _input_bytes(sidecars: list[str], limit: int) -> int:
    """The bytes the passes read: every sidecar, and the unlabeled shard each one labels (pass 3 reads it to copy
    the selected samples). Counting stops once past ``limit``: only the inline-or-not decision needs it."""
    total = sum(size(s) for s in sidecars)
    for s in sidecars:
        if total >= limit:
            break
        shards = _read(s, ["shard"]).column("shard")
        if len(shards):
            total += size(shards[0].as_py())
    return total


def plan_digest(plan: SelectPlan, cfg: SelectConfig, sidecars: list[str]) -> str:
    h = hashlib.sha256(repr(cfg).encode())
    for part in ("boundary", "need", "base", "extra", "cut_conf", "cut_hash", "dup_cut"):
        h.update(np.ascontiguousarray(getattr(plan, part)).tobytes())
    for s in sidecars:
        h.update(f"{name(s)}:{stamp(s)}".encode())
    return h.hexdigest()


def run_selection(
    sidecars: list[str],
    out_dir: str,
    num_classes: int,
    cfg: SelectConfig,
    progress: bool = True,
    inline_bytes: int = INLINE_BYTES,
) -> dict:
    """Selects pseudo-labeled samples from per-shard sidecars; returns the summary (also ``selection.json``).

    Inputs totalling less than ``inline_bytes`` (the sidecars and the unlabeled shards they label, ~1 MB for the
    digits default) are processed in this process with the same functions: Ray tasks would cost seconds of worker
    start-up for milliseconds of work.
    """
    import ray

    start = time.perf_counter()
    out = join(out_dir)
    makedirs(out)
    n = len(sidecars)
    inline = _input_bytes(sidecars, inline_bytes) < inline_bytes
    put = (lambda x: x) if inline else ray.put
    hist = np.zeros((num_classes, cfg.bins), dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    pass1 = ((s, num_classes, cfg) for s in sidecars)
    for cells, counts, a in run_tasks(_histogram_task, pass1, n, "select 1/3", progress, inline):
        hist.reshape(-1)[cells] += counts
        above += a
    plan = plan_selection(hist, above, cfg)
    plan_ref = put(plan)
    merger = CandidateMerger(plan)
    if (plan.need > 0).any() or (plan.extra > 0).any():
        pass2 = ((s, plan_ref, cfg) for s in sidecars)
        for cand in run_tasks(_candidates_task, pass2, n, "select 2/3", progress, inline):
            merger.add(cand)
    plan = merger.finalize()
    digest = plan_digest(plan, cfg, sidecars)
    plan_ref = put(plan)
    kept = np.zeros(num_classes, dtype=np.int64)
    after = np.zeros(num_classes, dtype=np.int64)
    resumed = 0
    train = dict.fromkeys(("train_shards", "train_members", "train_bytes"), 0)
    args = ((s, str(join(out, name(s))), plan_ref, cfg, digest) for s in sidecars)
    for counts in run_tasks(_write_task, args, n, "select 3/3", progress, inline):
        kept += counts["kept"]
        after += counts["after"]
        resumed += counts["resumed"]
        train["train_shards"] += int(counts["train_members"] > 0)
        train["train_members"] += counts["train_members"]
        train["train_bytes"] += counts["train_bytes"]
    summary = summarize(hist, plan, kept, after, cfg)
    summary.update(train)
    summary.update({"shards": n, "shards_resumed": resumed, "seconds": round(time.perf_counter() - start, 3)})
    summary["ran_as"] = "in-process" if inline else "ray tasks"
    atomic_write_json(join(out, "selection.json"), summary)
    plot_selection(summary, join(out, "selection.png"))
    log.info(
        "select: %d of %d rows kept (%d below the floor), %d copies with K=%d",
        summary["kept"],
        summary["rows_in"],
        summary["dropped_by_floor"],
        summary["copies_out"],
        plan.k,
    )
    return summary


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


def plot_selection(summary: dict, path: Location) -> None:
    """Class counts before/after selection and the confidence histogram with the floor, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    classes = np.arange(len(summary["per_class_before"]))
    for key, label in (
        ("per_class_before", "teacher argmax"),
        ("per_class_candidates", "above floor"),
        ("per_class_after", "selected (with copies)"),
    ):
        ax1.step(classes, summary[key], where="mid", label=label)
    ax1.axhline(summary["K"], color="grey", ls=":", label=f"K = {summary['K']}")
    ax1.set(xlabel="class", ylabel="samples", title="class counts")
    ax1.legend(fontsize=8)
    hist = summary["confidence_histogram"]
    edges = np.asarray(hist["edges"])
    ax2.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue")
    ax2.axvline(summary["floor"], color="tab:red", ls="--", label=f"floor {summary['floor']}")
    ax2.set(xlabel="teacher confidence", ylabel="samples", title="pseudo-label confidence", yscale="log")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
