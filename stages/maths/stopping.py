"""When to stop adding rounds, which round is best, and each round's seed: pure functions over per-round numbers.

Stop rule (``stop`` in the config): after round ``r``, stop when the last ``patience`` students each gained less
than ``min_gain`` validation top-1 over their own teacher (the round before; ``stop.test: gain``, the function here;
``worse`` and ``not_better`` compare them beyond the noise, ``stages.maths.round_choice.stop_beyond_noise``).
``patience: 0`` never stops. ``best_round`` is the highest validation top-1, the earliest on a tie (the ``today``
rule); the default rule (``stop.best``) is ``round_choice``'s ``mcnemar``. Without a validation split the best
round is the last. Test accuracy never enters either choice.

Seeds: one run seed (``seed`` in the config) gives every round and role (teacher/student training, selection) its
own seed, so no two rounds' students share data order, initialisation or augmentation draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, StrictFloat, StrictInt

from stages.core.config import config

# Validation accuracies are ratios k/n: a gain of exactly min_gain must not fall below it by rounding.
_EPS = 1e-9
ROLES = ("train", "select", "pretrain")


@config
class StopConfig:
    """The stop rule and the best-round rule, both on validation. Stop: ``patience`` students in a row fail
    ``test`` against their own teacher (0 = off): ``gain`` (validation top-1 gain below ``min_gain``), ``worse``
    (the teacher beats it beyond the noise: McNemar on the same images, ``p < alpha``) or ``not_better`` (it does
    not beat its teacher beyond the noise). Best round: ``best`` names a rule of ``stages.maths.round_choice``
    (``mcnemar``: the last round unless an earlier one beats it beyond the noise; ``today``: the highest top-1)."""

    patience: Annotated[StrictInt, Field(ge=0, description="0 = never stop early")] = 0
    min_gain: Annotated[StrictFloat, Field(ge=-1, le=1)] = 0.0
    test: Literal["gain", "worse", "not_better"] = "worse"
    best: Literal[
        "mcnemar", "last", "today", "latest_tie", "logloss", "latest_unbeaten", "bootstrap", "bootstrap_logloss"
    ] = "mcnemar"
    alpha: Annotated[StrictFloat, Field(gt=0, lt=1, description="'beyond the noise': a two-sided p below it")] = 0.05


def gains(val_top1: Sequence[float]) -> list[float]:
    """Each student's gain over its teacher: ``val[r] - val[r - 1]`` for ``r >= 1``."""
    return [val_top1[r] - val_top1[r - 1] for r in range(1, len(val_top1))]


def should_stop(val_top1: Sequence[float], cfg: StopConfig) -> bool:
    """True when the last ``cfg.patience`` students (rounds >= 1) each gained less than ``cfg.min_gain``."""
    g = gains(val_top1)
    if not cfg.patience or len(g) < cfg.patience:
        return False
    return all(x < cfg.min_gain - _EPS for x in g[-cfg.patience :])


def best_round(val_top1: Sequence[float | None]) -> int:
    """The round with the highest validation top-1, the earliest on a tie; the last round when none has one."""
    known = [(v, -r) for r, v in enumerate(val_top1) if v is not None]
    if not known:
        return len(val_top1) - 1
    return -max(known)[1]


def round_seed(run_seed: int, base_seed: int, round_index: int, role: str = "train") -> int:
    """A 31-bit seed for ``role`` in round ``round_index``: distinct per round and role, the same on every machine
    and Python (numpy's ``SeedSequence``, not ``hash``). ``base_seed`` is the stage's own ``seed`` key."""
    words = [run_seed & 0xFFFFFFFF, base_seed & 0xFFFFFFFF, round_index, ROLES.index(role)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0] >> 1)
