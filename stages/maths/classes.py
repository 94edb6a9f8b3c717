"""Per-class diagnostics: which class the rounds leave behind, and which unlabeled images a person should label.

A weak teacher's confusions are copied: a class it mistakes for others gets few (and wrong) pseudo-labels, so every
student learns the same confusion and the class's recall stays where round 0 left it while the others rise.

* ``stuck_classes``: after a student round, the classes whose validation recall has not moved since round 0 by more
  than ``min_gain`` while the mean recall did, and which lag the mean by at least ``lag``. Validation only (test is
  never chosen on); with few validation images a class is a handful of images, so the rule asks for a clear lag.
* ``suggestion_order``: the unlabeled samples whose labels would help most: those the model is least sure of
  (smallest margin between its two top classes), half of the budget from samples whose top two classes include a
  stuck class, the rest round-robin over the predicted classes so that no class takes the whole budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stuck_classes(per_class: Sequence[Sequence[float | None]], min_gain: float = 0.05, lag: float = 0.10) -> list[int]:
    """Classes left behind, from per-round validation recall (``per_class[r][c]``, round 0 first): recall gained
    less than ``min_gain`` since round 0 while the mean gained at least that, and recall at least ``lag`` below the
    latest mean. Empty before a student round, or when a class has no validation images (``None``)."""
    if len(per_class) < 2:
        return []
    first, last = per_class[0], per_class[-1]
    known = [c for c in range(len(last)) if first[c] is not None and last[c] is not None]
    if not known:
        return []
    mean_first = float(np.mean([first[c] for c in known]))
    mean_last = float(np.mean([last[c] for c in known]))
    if mean_last - mean_first < min_gain:
        return []  # nothing moved: no class is behind the others
    return [c for c in known if last[c] - first[c] < min_gain and last[c] <= mean_last - lag]


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (0 = a tie between two classes: the least sure)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def suggestion_order(probs: np.ndarray, stuck: Sequence[int], n: int) -> tuple[np.ndarray, list[str]]:
    """``(rows, why)``: up to ``n`` row indices of ``probs`` (one row per unlabeled sample), most useful first, and
    for each a short reason. Ties in margin go to the lower row index (deterministic)."""
    n = min(n, len(probs))
    margin = margins(probs)
    top2 = np.argsort(-probs, axis=1, kind="stable")[:, :2] if probs.shape[1] > 1 else np.zeros((len(probs), 1), int)
    order = np.lexsort((np.arange(len(probs)), margin))  # least sure first
    chosen: list[int] = []
    why: list[str] = []
    taken = np.zeros(len(probs), dtype=bool)
    if stuck:
        near = np.isin(top2, list(stuck)).any(axis=1)
        for i in order[near[order]][: n // 2 if n > 1 else n]:
            chosen.append(int(i))
            why.append(
                f"near a stuck class ({', '.join(str(c) for c in top2[i] if c in stuck)}); margin {margin[i]:.2f}"
            )
            taken[i] = True
    predicted = top2[:, 0]
    queues = {c: [int(i) for i in order if predicted[i] == c and not taken[i]] for c in np.unique(predicted)}
    while len(chosen) < n and any(queues.values()):
        for c in sorted(queues):
            if queues[c] and len(chosen) < n:
                i = queues[c].pop(0)
                chosen.append(i)
                why.append(f"least sure of predicted class {c}; margin {margin[i]:.2f}")
    return np.asarray(chosen, dtype=np.int64), why
