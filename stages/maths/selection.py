"""Selection of pseudo-labeled samples, as in Noisy Student (Xie et al. 2020, section 3 and appendix A.1).

1. Confidence floor (paper 0.3): a sample whose teacher confidence is below it is never kept. The confidence is
   the teacher's own top probability (``softmax(logits)``, the sidecars' ``confidence``), not the sharpened soft
   label's, so the floor keeps the same samples at any ``pseudo_label.temperature``.
2. Per-class budget ``K`` (paper 130,000 per class on ImageNet): ``select.per_class``, or when 0, derived from the
   data as ``ceil(per_class_factor * rows_above_floor / num_classes)``, the per-class size of a balanced set.
3. Mode ``none`` keeps everything above the floor once. ``topk`` keeps, per class, the ``K`` most confident
   samples above the floor. ``balanced`` (the paper) does the same and then duplicates the samples of a class
   that has ``n < K`` of them: each gets ``K // n`` copies and ``K % n`` of them, drawn by a seeded hash of the
   key, one more, so the class totals exactly ``K``.
4. Mode ``share`` is a class-wise curriculum: per predicted class, only its most confident rows up to a growing
   share of a balanced class, ``K = ceil(q_r * rows_above_floor / num_classes)`` with ``q_r = min(1, share_start +
   (r - 1) * share_step)`` for student round ``r`` (``share_fraction``; the defaults give 0.5, 0.75, 1.0 for rounds
   1, 2, 3+), no duplication. A class the teacher confuses contributes only its most confident rows and can never
   take more than its share, so a confusion is not copied wholesale; later (better) teachers are trusted with more.
   The idea is FlexMatch's class-wise thresholds (Zhang et al. 2021, "curriculum pseudo labeling": a class's
   threshold follows how well it is learned) and curriculum labeling (Cascante-Bonilla et al. 2021: admit the most
   confident pseudo-labels first, a growing percentile each round), in the per-class top-K form this selection
   already computes. ``per_class`` and ``per_class_factor`` do not apply to it. On digits with 2 labels per class
   (issue 31's prototype: SSL-initialised teacher, 3 seeds) it kept 50% of the pool at 99.2% pseudo-label accuracy
   (worst class 93.4%) where floor 0.3 + ``balanced`` kept 90.7% at 92.7% (worst class 82.4%).

Optionally the labels and confidences are first aligned to a class prior (``align``; ``stages/maths/alignment.py``):
then every step above reads the aligned ones.

Ranking is by confidence, descending; ties are broken by a seeded 64-bit hash of the sample key (ascending), so the
result depends only on the seed and the rows, never on shard order or file layout.

``select_in_memory`` is the reference: a few lines over whole arrays. The sharded path computes the same result
with bounded memory, as three passes over the pseudo-label sidecars (``stages/select.py`` runs each pass
as Ray tasks, one per shard):

* ``shard_histogram``: per-class confidence histograms (``classes x bins``) and counts above the floor.
* ``plan_selection`` (driver) finds each class's boundary bin: every row above it is kept, the rows in it compete.
* ``shard_candidates``: each shard's best ``need`` rows of the boundary bin, and for duplicated classes its
  smallest duplication hashes; ``CandidateMerger.finalize`` merges them into exact per-class cutoffs. Only
  histograms and these few candidates ever reach the driver, never the rows.
* ``shard_copies``: the per-row copy counts for one shard (0 = dropped), written as its selection sidecar.

Training order (``stages/data/compact.py`` writes it, ``stages/data/loader.py`` reads it): ``training_order`` puts a
shard's
kept rows in a seeded random order, and ``copy_order`` lays their copies out as the members of the compact training
shard, each sample's copies spread across the shard (``copy_keys`` names the members).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, StrictFloat, StrictInt, model_validator

from stages.core.config import LATE, config

# Keys are hashed with different salts: one hash breaks confidence ties, one draws extra copies, one orders a shard.
_RANK_SALT, _DUP_SALT, _ORDER_SALT = 0, 1, 2


SelectMode = Literal["auto", "none", "topk", "balanced", "share"]
AlignTo = Literal["auto", "none", "uniform", "labeled"]


@config
class SelectConfig:
    """Selection settings; the defaults are the paper's (floor 0.3, balanced), with K derived from the data. A run's
    ``select`` section (``pipeline/config.RunSelectConfig``) defaults ``mode`` and ``align`` to ``auto`` instead."""

    mode: SelectMode = "balanced"
    floor: Annotated[StrictFloat, Field(ge=0, le=1, description="the teacher's own top probability, at T = 1")] = 0.3
    per_class: Annotated[StrictInt, Field(ge=0, description="K; 0 = derived from the data")] = 0
    per_class_factor: Annotated[StrictFloat, Field(gt=0)] = 1.0
    label_type: Literal["soft", "hard"] = "soft"
    seed: StrictInt = 0
    bins: Annotated[StrictInt, Field(ge=16, le=1 << 16)] = 2048
    share_start: Annotated[StrictFloat, Field(gt=0, le=1, description="q for student round 1 (mode share)"), LATE] = 0.5
    share_step: Annotated[StrictFloat, Field(ge=0, le=1, description="q's growth per round (mode share)"), LATE] = 0.25
    align: Annotated[AlignTo, LATE] = "none"
    align_iterations: Annotated[StrictInt, Field(ge=1, le=10), LATE] = 1

    @model_validator(mode="after")
    def _share_budget(self) -> SelectConfig:
        if self.mode == "share" and self.per_class:
            raise ValueError(
                "per_class: mode share derives each class's budget from share_start/share_step; "
                "set per_class: 0 (or use mode topk/balanced for a fixed K)"
            )
        return self

    def resolve(self, weak_teacher: bool) -> SelectConfig:
        """``auto`` made concrete for a run: for a weak teacher (round 0 pretrained: few labels per class) mode
        ``share`` and ``align: uniform``, which stop the students copying its confusions (digits-hard, 3 seeds:
        92.7 -> 95.7% test top-1, worst class 78 -> 87%); otherwise, or with a fixed ``per_class`` K (which
        ``share`` has no use for), the paper's ``balanced``, and no alignment."""
        share = weak_teacher and not self.per_class
        mode = ("share" if share else "balanced") if self.mode == "auto" else self.mode
        align = ("uniform" if weak_teacher else "none") if self.align == "auto" else self.align
        return dataclasses.replace(self, mode=mode, align=align)

    def check_resolved(self) -> None:
        """Selection itself runs on concrete settings: ``auto`` is the pipeline's to resolve (``resolve``)."""
        if "auto" in (self.mode, self.align):
            raise ValueError("select: mode/align auto must be resolved for the run first (SelectConfig.resolve)")


def key_hash(keys, seed: int, salt: int) -> np.ndarray:
    """A seeded 64-bit hash per key (SipHash via pandas, vectorised), as uint64."""
    hash_key = f"{seed & 0xFFFFFFFF:08x}{salt:08x}"
    return pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=hash_key, categorize=False)


def share_fraction(cfg: SelectConfig, student_round: int) -> float:
    """``q_r = min(1, share_start + (r - 1) * share_step)``: the share of a balanced class that mode ``share``
    keeps per class in student round ``r`` (1, 2, ...)."""
    return min(1.0, cfg.share_start + (max(student_round, 1) - 1) * cfg.share_step)


def per_class_budget(above_floor: np.ndarray, cfg: SelectConfig, student_round: int = 1) -> int:
    """K: the configured ``per_class``, or the mean class size above the floor times ``per_class_factor`` (mode
    ``share``: times ``share_fraction(cfg, student_round)``)."""
    if cfg.mode == "share":
        factor = share_fraction(cfg, student_round)
    elif cfg.per_class:
        return cfg.per_class
    else:
        factor = cfg.per_class_factor
    return max(1, math.ceil(factor * int(above_floor.sum()) / len(above_floor)))


def select_in_memory(
    keys, labels, confidence, num_classes: int, cfg: SelectConfig, student_round: int = 1
) -> np.ndarray:
    """The reference selection over whole arrays: the number of copies of each row (0 = not selected)."""
    cfg.check_resolved()
    labels, confidence = np.asarray(labels), np.asarray(confidence, dtype=np.float32)
    copies = np.zeros(len(labels), dtype=np.int64)
    above = confidence >= cfg.floor
    copies[above] = 1
    if cfg.mode == "none":
        return copies
    k = per_class_budget(np.bincount(labels[above], minlength=num_classes), cfg, student_round)
    rank_hash, dup_hash = key_hash(keys, cfg.seed, _RANK_SALT), key_hash(keys, cfg.seed, _DUP_SALT)
    for c in range(num_classes):
        rows = np.flatnonzero(above & (labels == c))
        if len(rows) > k:
            order = np.lexsort((rank_hash[rows], -confidence[rows]))
            copies[rows[order[k:]]] = 0
        elif cfg.mode == "balanced" and 0 < len(rows) < k:
            base, extra = divmod(k, len(rows))
            copies[rows] = base
            copies[rows[np.argsort(dup_hash[rows], kind="stable")[:extra]]] += 1
    return copies


# ---- the sharded path ------------------------------------------------------------------------------------------


def confidence_bin(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Histogram bin of each confidence; bins are equal-width on [0, 1], the last one closed."""
    return np.minimum((np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64), bins - 1)


def shard_histogram(labels, confidence, num_classes: int, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 for one shard: ``(classes x bins)`` confidence counts, and counts at or above the floor."""
    labels, confidence = np.asarray(labels), np.asarray(confidence, dtype=np.float32)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"pseudo-labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    flat = labels.astype(np.int64) * cfg.bins + confidence_bin(confidence, cfg.bins)
    hist = np.bincount(flat, minlength=num_classes * cfg.bins).reshape(num_classes, cfg.bins)
    above = np.bincount(labels[confidence >= cfg.floor], minlength=num_classes)
    return hist, above


@dataclasses.dataclass(frozen=True)
class SelectPlan:
    """Per-class decisions from the histograms. ``boundary[c] = -1``: keep every row of class c above the floor.

    Otherwise rows in bins above ``boundary[c]`` are kept, and the best ``need[c]`` rows inside it compete
    (confidence, then rank hash); ``cut_conf/cut_hash`` are filled in by ``CandidateMerger.finalize``.
    Duplicated classes get ``base[c]`` copies per row, plus one for the ``extra[c]`` rows with the smallest
    duplication hash (``dup_cut[c]`` is the largest such hash).
    """

    k: int
    above_floor: np.ndarray
    boundary: np.ndarray
    need: np.ndarray
    base: np.ndarray
    extra: np.ndarray
    cut_conf: np.ndarray | None = None
    cut_hash: np.ndarray | None = None
    dup_cut: np.ndarray | None = None


def plan_selection(hist: np.ndarray, above_floor: np.ndarray, cfg: SelectConfig, student_round: int = 1) -> SelectPlan:
    """Pass-1 reduction (driver): boundary bins and copy counts per class, from histograms only."""
    num_classes = hist.shape[0]
    boundary = np.full(num_classes, -1, dtype=np.int64)
    need = np.zeros(num_classes, dtype=np.int64)
    base = np.ones(num_classes, dtype=np.int64)
    extra = np.zeros(num_classes, dtype=np.int64)
    k = 0 if cfg.mode == "none" else per_class_budget(above_floor, cfg, student_round)
    floor_bin = int(confidence_bin(np.array([cfg.floor]), cfg.bins)[0])
    for c in range(num_classes):
        n = int(above_floor[c])
        if cfg.mode == "none" or n == 0:
            continue
        if n > k:
            # Rows at or above the boundary bin number >= k; those strictly above it number < k.
            above_bin = np.cumsum(hist[c, ::-1])[::-1]  # above_bin[b] = rows in bins >= b
            b = int(np.flatnonzero(above_bin >= k).max())
            b = max(b, floor_bin)
            boundary[c] = b
            need[c] = k - (int(above_bin[b + 1]) if b + 1 < cfg.bins else 0)
        elif cfg.mode == "balanced" and n < k:
            base[c], extra[c] = divmod(k, n)
    return SelectPlan(k, np.asarray(above_floor), boundary, need, base, extra)


def top_per_class(classes: np.ndarray, limit: np.ndarray, hashes: np.ndarray, confidence=None) -> np.ndarray:
    """Indices of the best ``limit[c]`` rows of each class, grouped by class, best first within a group.

    Best = highest confidence, then smallest hash (or smallest hash alone when ``confidence`` is None).
    Vectorised: one sort for all classes, so a shard or a merge costs the same for 10 or 10,000 classes.
    """
    keys = (hashes, classes) if confidence is None else (hashes, -confidence, classes)
    order = np.lexsort(keys)
    sorted_classes = classes[order]
    first = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    return order[rank < limit[sorted_classes]]


def shard_candidates(keys, labels, confidence, plan: SelectPlan, cfg: SelectConfig) -> dict[str, tuple]:
    """Pass 2 for one shard: per class, its best ``need`` rows of the boundary bin (``rank``: class, confidence,
    hash) and its ``extra`` smallest duplication hashes (``dup``: class, hash). A shard can't contribute more
    than that to the global cutoffs, so that is all it sends."""
    labels, confidence = np.asarray(labels, dtype=np.int64), np.asarray(confidence, dtype=np.float32)
    keys = np.asarray(keys, dtype=object)
    above = confidence >= cfg.floor
    compete = np.flatnonzero(above & (plan.boundary[labels] == confidence_bin(confidence, cfg.bins)))
    h = key_hash(keys[compete], cfg.seed, _RANK_SALT)
    best = top_per_class(labels[compete], plan.need, h, confidence[compete])
    dup = np.flatnonzero(above & (plan.extra[labels] > 0))
    d = key_hash(keys[dup], cfg.seed, _DUP_SALT)
    draws = top_per_class(labels[dup], plan.extra, d)
    return {
        "rank": (labels[compete][best], confidence[compete][best], h[best]),
        "dup": (labels[dup][draws], d[draws]),
    }


class CandidateMerger:
    """Folds shard candidates into the global best ``need`` / ``extra`` per class, in bounded memory."""

    def __init__(self, plan: SelectPlan, compact_at: int = 1 << 21) -> None:
        self.plan, self.compact_at = plan, compact_at
        self.rank: list[tuple] = []
        self.dup: list[tuple] = []

    def add(self, candidates: dict[str, tuple]) -> None:
        self.rank.append(candidates["rank"])
        self.dup.append(candidates["dup"])
        if sum(len(c[0]) for c in self.rank) + sum(len(c[0]) for c in self.dup) > self.compact_at:
            self._compact()

    def _compact(self) -> None:
        if self.rank:
            cls, conf, h = (np.concatenate(parts) for parts in zip(*self.rank, strict=True))
            best = top_per_class(cls, self.plan.need, h, conf)
            self.rank = [(cls[best], conf[best], h[best])]
        if self.dup:
            cls, h = (np.concatenate(parts) for parts in zip(*self.dup, strict=True))
            best = top_per_class(cls, self.plan.extra, h)
            self.dup = [(cls[best], h[best])]

    def finalize(self) -> SelectPlan:
        """The plan with exact cutoffs: the last kept boundary row and the largest hash given an extra copy."""
        self._compact()
        n = len(self.plan.boundary)
        cut_conf = np.full(n, np.inf, dtype=np.float32)
        cut_hash = np.zeros(n, dtype=np.uint64)
        dup_cut = np.zeros(n, dtype=np.uint64)
        rank = self.rank[0] if self.rank else (np.empty(0, np.int64),) * 3
        dup = self.dup[0] if self.dup else (np.empty(0, np.int64),) * 2
        for name, cls, expected in (("boundary rows", rank[0], self.plan.need), ("draws", dup[0], self.plan.extra)):
            got = np.bincount(cls, minlength=n)
            if (got != expected).any():
                c = int(np.flatnonzero(got != expected)[0])
                raise RuntimeError(f"selection: class {c}: {got[c]} {name}, expected {expected[c]}")
        last = np.flatnonzero(np.r_[rank[0][1:] != rank[0][:-1], True]) if len(rank[0]) else []
        cut_conf[rank[0][last]], cut_hash[rank[0][last]] = rank[1][last], rank[2][last]
        last = np.flatnonzero(np.r_[dup[0][1:] != dup[0][:-1], True]) if len(dup[0]) else []
        dup_cut[dup[0][last]] = dup[1][last]
        return dataclasses.replace(self.plan, cut_conf=cut_conf, cut_hash=cut_hash, dup_cut=dup_cut)


def shard_copies(keys, labels, confidence, plan: SelectPlan, cfg: SelectConfig) -> np.ndarray:
    """Pass 3 for one shard: copies per row (0 = dropped), given a finalized plan."""
    if plan.cut_conf is None:
        raise ValueError("shard_copies needs a finalized plan (CandidateMerger.finalize)")
    labels, confidence = np.asarray(labels), np.asarray(confidence, dtype=np.float32)
    copies = (confidence >= cfg.floor).astype(np.int64)
    if cfg.mode == "none" or not len(labels):
        return copies
    boundary = plan.boundary[labels]
    bins = confidence_bin(confidence, cfg.bins)
    copies[(boundary >= 0) & (bins < boundary)] = 0
    tied = np.flatnonzero((copies > 0) & (boundary >= 0) & (bins == boundary))
    if len(tied):
        h = key_hash(np.asarray(keys, dtype=object)[tied], cfg.seed, _RANK_SALT)
        cc, ch, conf = plan.cut_conf[labels[tied]], plan.cut_hash[labels[tied]], confidence[tied]
        copies[tied] = (conf > cc) | ((conf == cc) & (h <= ch))
    dup = np.flatnonzero((copies > 0) & ((plan.base[labels] > 1) | (plan.extra[labels] > 0)))
    if len(dup):
        copies[dup] = plan.base[labels[dup]]
        has_extra = dup[plan.extra[labels[dup]] > 0]
        if len(has_extra):
            h = key_hash(np.asarray(keys, dtype=object)[has_extra], cfg.seed, _DUP_SALT)
            copies[has_extra] += h <= plan.dup_cut[labels[has_extra]]
    return copies


# ---- the training order ----------------------------------------------------------------------------------------


def training_order(keys, seed: int) -> np.ndarray:
    """A seeded random permutation of one shard's rows: sorted by a salted hash of the key, so it depends only on
    the seed and the keys (not on task order or the file layout)."""
    return np.argsort(key_hash(keys, seed, _ORDER_SALT), kind="stable")


def copy_order(copies: np.ndarray) -> np.ndarray:
    """The row of each member of a compact training shard: row ``r`` appears ``copies[r]`` times, its copies spread
    evenly over the shard.

    The ``m`` rows holding ``c`` copies form one evenly spaced grid: copy ``j`` of the ``k``-th of them (in row
    order) sits at position ``(j + (k + 1/2) / m) / c`` in [0, 1), and the members of every grid are sorted by
    position (ties by row). With equal copies this is the plain pass order (every row once, then every row again,
    ...). With mixed copies, each row recurs every ``1/c`` of the shard with the rest of its grid and the other
    grids in between, where passes ``j = 0, 1, ...`` over the rows with ``copies > j`` would put the copies of a
    shard's only duplicated row back to back at its end. The rows come in a random order already
    (``training_order``), so the layout is random too, and it is a pure function of ``copies``: the writer and the
    reader compute the same one.
    """
    copies = np.asarray(copies, dtype=np.int64)
    n = len(copies)
    rows = np.repeat(np.arange(n), copies)
    if not len(rows):
        return rows
    by_copies = np.lexsort((np.arange(n), copies))  # grouped by copies, row order within a group
    grouped = copies[by_copies]
    first = np.searchsorted(grouped, grouped, side="left")
    rank, size = np.empty(n, np.int64), np.empty(n, np.int64)
    rank[by_copies] = np.arange(n) - first
    size[by_copies] = np.searchsorted(grouped, grouped, side="right") - first
    copy = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)  # j: which copy of its row
    k, m, c = rank[rows], size[rows], copies[rows]
    # (j + (k + 1/2) / m) / c as one exact fraction: a correctly rounded division maps equal fractions (rows of
    # different grids at the same place) to the same float, so such ties are always broken the same way.
    position = (2 * (copy * m + k) + 1) / (2 * m * c)
    return rows[np.lexsort((rows, position))]


def copy_keys(keys, copies: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``copy_order(copies)`` and the tar key of each member: a row's key, ``<key>_copy<j>`` for its copy j > 0
    (webdataset groups consecutive files by key, so two copies must not share one)."""
    order = copy_order(copies)
    keys = np.asarray(keys, dtype=object)
    seen = np.zeros(len(keys), dtype=np.int64)
    names = []
    for r in order.tolist():
        j = seen[r]
        seen[r] += 1
        names.append(keys[r] if j == 0 else f"{keys[r]}_copy{j}")
    return order, names
