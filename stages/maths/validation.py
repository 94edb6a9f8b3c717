"""The validation split: held-out labeled images that every choice of the pipeline is made on, never test.

Two sources (``data`` in the config): ``data.val``, shards of their own (the digits default: 10 per class drawn from
the unlabeled pool by ``stages/data/digits.py``), or ``data.val_per_class: K``, carved from the labeled shards. A carve
is stratified (K per class), drawn by ``data.val_seed`` over the sorted keys, so it depends only on the labeled samples,
never on shard order or the run's seed; the carved keys are recorded in ``run.json`` and a resumed run that would
carve differently is refused. Carved images are never trained on: ``TrainPlan.exclude_keys`` makes the training
loader (``stages/data/loader.py``) skip them, and they never reach the pseudo-label stage, which reads the unlabeled
shards only (the data check refuses validation images found there).

Every round's model is scored on it by the evaluate stage (``stages/evaluate.py``): ``val_top1`` in ``metrics.json``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from stages.data.labeled_scan import LabeledIndex
from stages.data.shards import LabeledSet

S = TypeVar("S", LabeledSet, LabeledIndex)


def carve_keys(keys: list[str], labels: np.ndarray, per_class: int, seed: int) -> list[str]:
    """``per_class`` keys of each class present, drawn by ``seed`` from the keys in sorted order; sorted.

    A class with ``per_class`` or fewer samples would be left with nothing to train on: ``ValueError`` naming it.
    """
    labels = np.asarray(labels)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    sorted_keys, sorted_labels = [keys[i] for i in order], labels[order]
    rng = np.random.default_rng(seed)
    carved: list[str] = []
    for c in np.unique(sorted_labels):
        rows = np.flatnonzero(sorted_labels == c)
        if len(rows) <= per_class:
            raise ValueError(
                f"val_per_class: class {int(c)} has {len(rows)} labeled sample(s), so carving {per_class} would "
                "leave none to train on; lower data.val_per_class or give validation shards as data.val"
            )
        carved += [sorted_keys[i] for i in rng.choice(rows, per_class, replace=False)]
    return sorted(carved)


def split_off(labeled: S, carved: set[str]) -> tuple[S, S]:
    """``(training part, validation part)`` of a split (a ``LabeledSet`` or a ``LabeledIndex``): the carved keys go
    to validation, in their order."""
    held = [i for i, k in enumerate(labeled.keys) if k in carved]
    kept = [i for i, k in enumerate(labeled.keys) if k not in carved]
    return labeled.take(kept), labeled.take(held)
