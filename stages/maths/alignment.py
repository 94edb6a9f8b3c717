"""Distribution alignment of pseudo-labels to a class prior, before selection (``select.align``).

A teacher trained on few labels over-predicts the classes it knows well and under-predicts those it confuses; the
student then copies the confusion. Distribution alignment (ReMixMatch, Berthelot et al. 2020, section 3.2: "Distribution
Alignment") rescales each prediction by how far the pool's mean prediction is from a class prior, and renormalises:

    aligned(x) = normalise(p(x) * w),   w = prior / mean_pool(p)

so that over the pool the aligned predictions put each class's expected mass where the prior says it belongs.
ReMixMatch keeps a running mean over recent batches; here the mean is exact, over the whole unlabeled pool, one pass
over the pseudo-label sidecars per iteration (``select.align_iterations``): iteration ``i + 1`` multiplies ``w`` by
``prior / mean_pool(aligned_i)``, which drives the pool's mean closer to the prior (a Sinkhorn-like half-step each;
the issue-31 prototype used 3 on digits-hard and measured pool accuracy 87.1 -> 88.4%, worst class 69.6 -> 75.4%).

The prior (``class_prior``) is ``uniform`` (1/C each) or ``labeled`` (the labeled training split's class frequencies).

``p`` is the teacher's own distribution at T = 1, recovered from the stored soft labels ``softmax(z / T)`` with
``stages.maths.tuning.retemper`` (exact up to their float16 storage). A top-k sidecar holds only its k largest
probabilities: it is aligned over those k classes (renormalised over them; the mass outside them is ignored), an
approximation; its mean over the pool counts each row's k classes only.

Pool sums are exact: each probability is rounded to a multiple of ``2**-30`` and summed as integers
(``pool_sum``), so the weights do not depend on how the rows are split into shards or in which order the shards'
sums arrive (the three-pass selection must equal its in-memory reference bit for bit). Everything else here is per
row.

Label spreading over a kNN graph of the pool's features helped a little more in the prototype, but it needs one
global graph over every unlabeled sample's features: it does not fit this pipeline's per-shard passes (and does not
scale with them), so it is not offered.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from stages.maths.tuning import retemper

Prior = Literal["uniform", "labeled"]
QUANTUM = 1 << 30  # pool sums count probabilities in units of 2**-30 (int64 holds 2**33 rows of mass 1)


def class_prior(kind: Prior, num_classes: int, labeled_labels: np.ndarray | None = None) -> np.ndarray:
    """The prior the pool is aligned to: ``uniform``, or ``labeled`` (class frequencies of ``labeled_labels``)."""
    if kind == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    if kind != "labeled":
        raise ValueError(f"align: unknown prior {kind!r}; use uniform or labeled")
    counts = np.bincount(np.asarray(labeled_labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise ValueError(
            f"align: labeled: class(es) {missing} have no labeled sample, so the prior would remove them; "
            "use select.align: uniform"
        )
    return counts / counts.sum()


def teacher_probs(soft: np.ndarray, temperature: float) -> np.ndarray:
    """The teacher's own probabilities (T = 1) from stored soft labels ``softmax(z / temperature)``, float32,
    rows renormalised (a top-k row over its k classes)."""
    soft = np.asarray(soft, dtype=np.float32)
    if not len(soft):
        return soft
    return retemper(soft, temperature, 1.0)


def pool_sum(probs: np.ndarray, idx: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Per-class sums of ``probs`` (dense ``(N, C)``, or top-k values with their class indices ``idx``), exactly,
    in units of ``1 / QUANTUM`` (int64): any split of the rows gives the same total."""
    q = np.rint(np.asarray(probs, dtype=np.float64) * QUANTUM).astype(np.int64)
    if idx is None:
        return q.sum(axis=0) if len(q) else np.zeros(num_classes, np.int64)
    out = np.zeros(num_classes, dtype=np.int64)
    np.add.at(out, np.asarray(idx, dtype=np.int64).reshape(-1), q.reshape(-1))
    return out


def next_weights(weights: np.ndarray, prior: np.ndarray, sums: np.ndarray, rows: int) -> np.ndarray:
    """One alignment step: ``weights * prior / mean``, where ``mean = sums / (QUANTUM * rows)`` is the pool's mean
    aligned prediction under ``weights`` (a class with no mass at all counts as one quantum)."""
    mean = np.maximum(np.asarray(sums, dtype=np.float64), 1.0) / (float(QUANTUM) * max(rows, 1))
    return np.asarray(weights, dtype=np.float64) * np.asarray(prior, dtype=np.float64) / mean


def align(probs: np.ndarray, idx: np.ndarray | None, weights: np.ndarray) -> np.ndarray:
    """``normalise(p * w)`` per row, float64 (a top-k row over its k classes)."""
    w = np.asarray(weights, dtype=np.float64)
    if not len(probs):  # an empty shard (its list columns give no width)
        return np.zeros((0, len(w) if idx is None else np.shape(idx)[-1]))
    p = np.asarray(probs, dtype=np.float64) * (w if idx is None else w[np.asarray(idx, dtype=np.int64)])
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=np.zeros_like(p), where=total > 0)


def label_and_confidence(aligned: np.ndarray, idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's argmax class (int64) and its probability (float32): what the floor and the ranking read."""
    if not len(aligned):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    best = aligned.argmax(axis=1)
    rows = np.arange(len(aligned))
    label = best if idx is None else np.asarray(idx, dtype=np.int64)[rows, best]
    return label.astype(np.int64), aligned[rows, best].astype(np.float32)


def sharpen(aligned: np.ndarray, temperature: float) -> np.ndarray:
    """The student's soft target: ``normalise(aligned ** (1 / temperature))``, float32 (in log space: no
    underflow at small temperatures)."""
    a = np.asarray(aligned, dtype=np.float64)
    if not len(a):
        return a.astype(np.float32)
    with np.errstate(divide="ignore"):
        logp = np.log(a) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def align_in_memory(
    probs: np.ndarray, idx: np.ndarray | None, prior: np.ndarray, iterations: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The reference over the whole pool: the weights after ``iterations`` steps and the aligned predictions."""
    weights = np.ones(len(prior))
    for _ in range(iterations):
        weights = next_weights(weights, prior, pool_sum(align(probs, idx, weights), idx, len(prior)), len(probs))
    return weights, align(probs, idx, weights)
