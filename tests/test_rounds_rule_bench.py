"""``bench/rounds_rule.py``'s pure parts: regret, the validation halvings, the scoring of a run and the summary
(default rule, ties to the simpler rule). No pipeline run here: the bench trains real runs, minutes each."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.maths.round_choice import RULES, ChoiceOptions, RoundPredictions

ROOT = Path(__file__).resolve().parents[1]
TRUE = np.arange(100) % 10


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)  # the bench scripts reorder sys.path for their own imports
    spec = importlib.util.spec_from_file_location("bench_rounds_rule", ROOT / "bench" / "rounds_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = saved
    return module


def round_with(wrong) -> RoundPredictions:
    mask = np.isin(np.arange(100), list(wrong))
    return RoundPredictions(np.where(mask, (TRUE + 1) % 10, TRUE), TRUE.copy(), np.where(mask, 0.05, 0.9))


def test_regret_is_points_below_the_judges_best(bench):
    assert bench.regret([0.90, 0.95, 0.94], 2) == pytest.approx(1.0)
    assert bench.regret([0.90, 0.95, 0.94], 1) == 0.0


def test_halvings_are_stratified_disjoint_and_seeded(bench):
    splits = bench.half_splits(TRUE, 5, seed=3)
    assert len(splits) == 5
    for choose, judge in splits:
        assert len(choose) == len(judge) == 50 and not set(choose) & set(judge)
        assert np.bincount(TRUE[choose]).tolist() == [5] * 10
    again = bench.half_splits(TRUE, 5, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again, strict=True))


def test_scoring_and_summary_pick_the_rule_with_least_regret(bench):
    # Validation 91 -> 95 -> 94 -> 93 (the ladder); the judge says the last round is best.
    val = [round_with(range(0, 9)), round_with(range(0, 5)), round_with(range(3, 9)), round_with(range(2, 9))]
    pool = [0.9075, 0.9475, 0.9535, 0.9640]
    row = bench.score_run({"val": val}, pool, splits=4, opts=ChoiceOptions(n_boot=200))
    assert row["chosen"]["today"] == 1 and row["chosen"]["mcnemar"] == 3
    assert row["regret_pool"]["today"] == pytest.approx(1.65) and row["regret_pool"]["mcnemar"] == 0
    runs = []
    for ladder, seed in (("A", 0), ("B", 0)):
        runs.append(
            row
            | {
                "run": f"rules-{ladder}-s{seed}",
                "ladder": ladder,
                "seed": seed,
                "seconds": 10.0,
                "models": ["resnet10t"] * 4,
                "val_top1": [x.top1 for x in val],
                "test_top1": pool,
                "judge_top1": pool,
                "val_discordance": 0.04,
                "judge_discordance": 0.04,
                "stop": bench.stop_outcomes(val, pool, "mcnemar", ChoiceOptions(n_boot=200)),
            }
        )
    result = bench.aggregate(runs, splits=4)
    assert set(result["rules"]) == set(RULES) and set(result["per_ladder"]) == {"A", "B"}
    assert result["default"] == "mcnemar"  # last, mcnemar, ... tie at 0 regret: the shipped default wins ties
    assert result["today"]["mean_regret"]["pool"] == pytest.approx(1.65)
    assert result["test_top1_mean_of_chosen"]["all"]["last"] == pytest.approx(96.40)
    assert result["stop_rules"]["today:1"]["students_mean"] == 2  # 95 -> 94: a student below its teacher
    bench.print_report(result | {"alpha": 0.05})
