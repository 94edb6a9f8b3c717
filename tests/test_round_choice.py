"""Best-round rules and the stop rule beyond the noise (issue 29): golden values and the issue's three cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.maths.round_choice import (
    RULES,
    ChoiceOptions,
    RoundPredictions,
    check_same_images,
    choose_round,
    images_needed,
    mcnemar,
    mcnemar_p,
    mcnemar_power,
    noise_warning,
    paired_bootstrap,
    stop_beyond_noise,
    wilson_interval,
)
from stages.maths.stopping import best_round

N = 100
TRUE = np.arange(N) % 10


def round_with(wrong: set[int] | range, p_right: float = 0.9, p_wrong: float = 0.05) -> RoundPredictions:
    """A round on the 100 shared validation images that gets exactly the images in ``wrong`` wrong."""
    wrong_mask = np.isin(np.arange(N), list(wrong))
    pred = np.where(wrong_mask, (TRUE + 1) % 10, TRUE)
    return RoundPredictions(pred, TRUE.copy(), np.where(wrong_mask, p_wrong, p_right))


@pytest.mark.parametrize(
    ("a_only", "b_only", "p"),
    [
        (0, 0, 1.0),
        (1, 0, 1.0),  # one image: 2 x 1/2
        (2, 1, 1.0),
        (6, 0, 2 / 2**6),  # 0.03125: the fewest one-sided discordant images that reach p < 0.05
        (5, 0, 2 / 2**5),  # 0.0625: five is not enough
        (8, 2, 2 * (1 + 10 + 45) / 2**10),  # 0.109375
        (10, 1, 2 * (1 + 11) / 2**11),  # 0.01171875
        (3, 12, 2 * sum(math.comb(15, i) for i in range(4)) / 2**15),  # 0.03515625
    ],
)
def test_mcnemar_exact_p_golden(a_only, b_only, p):
    assert mcnemar_p(a_only, b_only) == pytest.approx(p, abs=1e-15)
    assert mcnemar_p(b_only, a_only) == pytest.approx(p, abs=1e-15)  # two-sided


def test_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(1, 0), (4, 1), (8, 2), (10, 1), (12, 3), (30, 18), (7, 7)]:
        assert mcnemar_p(a, b) == pytest.approx(stats.binomtest(a, a + b, 0.5).pvalue, rel=1e-12)


def test_mcnemar_counts_the_discordant_images():
    t = mcnemar(round_with({1, 2, 3}), round_with({3, 4, 5, 6, 7}))  # a gets 4-7 right, b gets 1-2 right
    assert (t.a_only, t.b_only, t.margin) == (4, 2, 2)
    assert t.p == pytest.approx(mcnemar_p(4, 2))


def test_wilson_interval_golden():
    # 95/100: Wilson (1927) score interval, z = 1.96; scipy's binomtest(95, 100).proportion_ci("wilson") agrees.
    assert wilson_interval(95, 100) == pytest.approx((0.888250, 0.978456), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    lo, hi = wilson_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.963007, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_is_seeded_and_paired():
    a, b = round_with(range(0, 3)), round_with(range(0, 15))  # a right on 12 more images, never the other way
    one, two = paired_bootstrap(a, b, seed=1), paired_bootstrap(a, b, seed=1)
    assert one == two
    assert one.top1_diff == pytest.approx(0.12) and one.top1_interval[0] > 0 and one.top1_p < 0.01
    assert one.loss_diff < 0 and one.loss_interval[1] < 0  # a's log-loss lower
    same = paired_bootstrap(a, a)
    assert same.top1_diff == 0 and same.top1_p == 1.0 and same.loss_p == 1.0


def test_today_is_stopping_best_round_on_random_rounds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rounds = [round_with(set(rng.choice(N, rng.integers(0, 6), replace=False))) for _ in range(4)]
        assert choose_round(rounds, "today").round == best_round([x.top1 for x in rounds])


def test_validation_tie_keeps_the_later_round():
    """Issue 29 case 1: rounds 1-3 tie at 95% on validation: today takes round 1, the new rules a later round."""
    rounds = [
        round_with(range(0, 9)),
        round_with({0, 1, 2, 3, 4}),
        round_with({5, 6, 7, 8, 9}),
        round_with(range(10, 15)),
    ]
    assert [x.top1 for x in rounds] == [0.91, 0.95, 0.95, 0.95]
    assert choose_round(rounds, "today").round == 1
    for rule in ("latest_tie", "last", "mcnemar", "latest_unbeaten", "bootstrap", "bootstrap_logloss", "logloss"):
        assert choose_round(rounds, rule).round == 3, rule
    # The tie break reads log-loss before the round: a tied earlier round with the lower log-loss wins it.
    sharper = [rounds[0], round_with({0, 1, 2, 3, 4}, p_right=0.99), rounds[2], rounds[3]]
    assert choose_round(sharper, "latest_tie").round == 1


def test_an_earlier_round_ahead_by_one_image_is_noise():
    """Issue 29 case 2: round 1 gets one validation image more than round 3 right: the last round is kept."""
    rounds = [round_with(range(0, 9)), round_with(range(0, 4)), round_with(range(0, 6)), round_with(range(0, 5))]
    assert choose_round(rounds, "today").round == 1
    choice = choose_round(rounds, "mcnemar")
    assert choice.round == 3
    assert choice.reason == (
        "round 3: no earlier round beats it beyond the noise (round 1: +1 images (1 vs 0), McNemar p=1)"
    )
    for rule in ("latest_unbeaten", "bootstrap", "last"):
        assert choose_round(rounds, rule).round == 3, rule


def test_an_earlier_round_ahead_beyond_the_noise_is_chosen():
    """Issue 29 case 3: round 1 gets 12 images right that round 3 gets wrong, and only 1 the other way."""
    rounds = [
        round_with(range(0, 20)),
        round_with(range(0, 3)),
        round_with(range(1, 15)),  # as bad as round 3: beaten by round 1 too
        round_with(range(1, 15)),
    ]
    assert mcnemar(rounds[1], rounds[3]).p < 0.01
    for rule in ("today", "latest_tie", "mcnemar", "latest_unbeaten", "bootstrap", "bootstrap_logloss", "logloss"):
        assert choose_round(rounds, rule).round == 1, rule
    reason = choose_round(rounds, "mcnemar").reason
    assert reason == "round 1: beats the last round 3 beyond the noise (+11 images (12 vs 1), McNemar p=0.0034)"
    assert choose_round(rounds, "last").round == 3


def test_latest_unbeaten_falls_back_to_the_next_latest_round_not_to_the_one_that_beat_the_last():
    rounds = [round_with(range(0, 4)), round_with(range(0, 2)), round_with(range(0, 3)), round_with(range(0, 16))]
    assert choose_round(rounds, "mcnemar").round == 1  # the best of those that beat round 3
    choice = choose_round(rounds, "latest_unbeaten")
    assert choice.round == 2  # round 2 is within the noise of round 1
    assert choice.reason == (
        "round 2: no round beats it beyond the noise (round 3 is beaten by round 1: +14 images (14 vs 0), "
        "McNemar p=0.00012; closest: round 1: +1 images (1 vs 0), McNemar p=1)"
    )


def test_the_issues_ladder_keeps_the_last_round():
    """Validation 91 -> 95 -> 94 -> 93 on 100 images (issue 29): today took round 1, 1.65 test points worse."""
    rounds = [round_with(range(0, 9)), round_with(range(0, 5)), round_with(range(3, 9)), round_with(range(2, 9))]
    assert [x.top1 for x in rounds] == [0.91, 0.95, 0.94, 0.93]
    assert choose_round(rounds, "today").round == 1
    assert choose_round(rounds, "mcnemar").round == 3
    assert noise_warning([x.top1 for x in rounds], N).startswith("warning: 100 validation images")


def test_every_rule_gives_a_round_and_a_one_line_reason():
    rounds = [round_with(range(0, 9)), round_with(range(0, 5))]
    for name in RULES:
        choice = choose_round(rounds, name, ChoiceOptions(n_boot=200))
        assert (
            0 <= choice.round < 2 and choice.reason.startswith(f"round {choice.round}:") and "\n" not in choice.reason
        )
    assert choose_round(rounds[:1], "mcnemar").round == 0
    with pytest.raises(ValueError, match="unknown best-round rule"):
        choose_round(rounds, "highest")


def test_sidecar_columns_are_put_in_key_order():
    keys, x = RoundPredictions.from_sidecar_columns(
        ["val-2", "val-0", "val-1"], np.array([1, 0, 2]), np.array([1, 0, 0]), np.eye(3)[[1, 0, 2]] * 0.5 + 0.1
    )
    assert keys == ["val-0", "val-1", "val-2"]
    assert x.pred.tolist() == [0, 2, 1] and x.true.tolist() == [0, 0, 1]
    assert x.p_true.tolist() == pytest.approx([0.6, 0.1, 0.6]) and x.top1 == pytest.approx(2 / 3)


def test_rounds_on_other_images_are_refused():
    short = RoundPredictions(TRUE[:50], TRUE[:50], np.ones(50))
    with pytest.raises(ValueError, match="same order"):
        check_same_images([round_with(()), short])


@pytest.mark.parametrize(
    ("student_wrong", "mode", "stop"),
    [
        (range(0, 16), "worse", True),  # 12 images worse than its teacher (4 wrong): beyond the noise
        (range(0, 5), "worse", False),  # one image worse: noise
        (range(0, 3), "not_better", True),  # one image better: not beyond the noise
        (range(0, 0), "not_better", True),  # four better: not enough either (p = 0.125)
    ],
)
def test_stop_rule_beyond_the_noise(student_wrong, mode, stop):
    rounds = [round_with(range(0, 4)), round_with(student_wrong)]
    assert stop_beyond_noise(rounds, patience=1, mode=mode)[0] is stop
    assert stop_beyond_noise(rounds, patience=0, mode=mode)[0] is False
    assert stop_beyond_noise(rounds, patience=2, mode=mode)[0] is False  # one student only


def test_stop_rule_needs_patience_students_in_a_row():
    teacher, bad, worse = round_with(range(0, 2)), round_with(range(0, 14)), round_with(range(0, 30))
    stop, reason = stop_beyond_noise([teacher, bad, worse], patience=2)
    assert stop and reason.startswith("stop: 2 student(s) in a row worse")
    assert not stop_beyond_noise([teacher, bad, round_with(range(0, 15))], patience=2)[0]


def test_mcnemar_power_golden_and_images_needed():
    # d = discordance: every discordant image favours the better round, and the exact test rejects from 6
    # discordant images on, so the power is P(Binomial(n, 0.05) >= 6).
    n, q = 157, 0.05
    at_least_6 = 1 - sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(6))
    assert mcnemar_power(n, 0.05, 0.05) == pytest.approx(at_least_6, rel=1e-9)
    assert images_needed(0.05, 0.05) == 157
    assert 1000 < images_needed(0.02, 0.05) < 1100  # 2 points at 5% discordance: about 1,000 images, not 100
    with pytest.raises(ValueError):
        images_needed(0.05, 0.02)


def test_noise_warning_only_when_the_interval_is_wider_than_the_gains():
    assert noise_warning([0.96, 0.98, 0.99, 0.98], 100) is not None
    assert noise_warning([0.80, 0.95], 2000) is None
    assert noise_warning([0.95], 100) is None
