"""Which round to ship and when to stop, judged beyond the noise of a small validation split: pure functions.

Every function reads per-round validation predictions on the SAME images in the same order
(``RoundPredictions``: predicted class, true class, probability of the true class), so two rounds are compared
pair-wise, image by image:

* ``wilson_interval``: a 95% (Wilson score) interval for one round's top-1;
* ``mcnemar``: McNemar's exact test, a two-sided binomial test on the images exactly one of two rounds gets right;
* ``paired_bootstrap``: the bootstrap distribution (seeded) of the top-1 and log-loss differences of two rounds;
* best-round rules, each ``(rounds, ChoiceOptions) -> Choice(round, reason)`` and listed by name in ``RULES``:
  ``today`` (highest top-1, earliest on a tie: ``stopping.best_round``), ``latest_tie`` (ties to the lower log-loss,
  then the later round), ``last``, ``logloss`` (lowest log-loss), ``mcnemar`` / ``bootstrap`` (the last round
  unless an earlier one beats it beyond the noise), ``latest_unbeaten`` (the latest round no round beats beyond
  the noise) and ``bootstrap_logloss`` (``bootstrap`` on log-loss);
* ``stop_beyond_noise``: the stop rule on the same footing;
* ``images_needed`` / ``mcnemar_power`` / ``noise_warning``: how many validation images tell two rounds apart.

With 100 validation images one image is one point: a rule that follows the highest top-1 follows the noise
(issue 29). ``bench/rounds_rule.py`` measures each rule's regret on data no rule chooses on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, NamedTuple

import numpy as np

from stages.maths.stopping import best_round

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%
_LOG_FLOOR = 1e-7  # a probability of 0 for the true class (float32 softmax underflow) costs -log(1e-7) = 16.1


@dataclass(frozen=True)
class RoundPredictions:
    """One round's predictions on the validation images (the same images, in the same order, for every round)."""

    pred: np.ndarray  # predicted class per image
    true: np.ndarray  # true class per image
    p_true: np.ndarray  # probability the round gave the true class

    @classmethod
    def from_probs(cls, probs: np.ndarray, true: np.ndarray) -> RoundPredictions:
        """From full class probabilities (``[n, classes]``) and the true classes."""
        probs, true = np.asarray(probs, dtype=np.float64), np.asarray(true, dtype=np.int64)
        return cls(probs.argmax(axis=1), true, probs[np.arange(len(true)), true])

    @classmethod
    def from_sidecar_columns(
        cls, keys: Sequence[str], label: np.ndarray, true_label: np.ndarray, probs: np.ndarray
    ) -> tuple[list[str], RoundPredictions]:
        """From the columns of a round's ``eval/val`` sidecars (concatenated in any order): the rows sorted by key,
        so that every round lists the same images in the same order; ``label`` is the stored prediction."""
        order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
        probs, true = np.asarray(probs, dtype=np.float64)[order], np.asarray(true_label, dtype=np.int64)[order]
        pred = np.asarray(label, dtype=np.int64)[order]
        return [keys[i] for i in order], cls(pred, true, probs[np.arange(len(true)), true])

    def __len__(self) -> int:
        return len(self.true)

    @property
    def correct(self) -> np.ndarray:
        return np.asarray(self.pred) == np.asarray(self.true)

    @property
    def top1(self) -> float:
        return float(self.correct.mean()) if len(self) else 0.0

    @property
    def losses(self) -> np.ndarray:
        """Per-image log-loss: ``-log p(true class)``."""
        return -np.log(np.clip(np.asarray(self.p_true, dtype=np.float64), _LOG_FLOOR, 1.0))

    @property
    def log_loss(self) -> float:
        return float(self.losses.mean()) if len(self) else 0.0

    def subset(self, index: np.ndarray) -> RoundPredictions:
        """The same round on a subset of the images (``index``: positions)."""
        return RoundPredictions(np.asarray(self.pred)[index], np.asarray(self.true)[index], self.p_true[index])


def check_same_images(rounds: Sequence[RoundPredictions]) -> None:
    """Paired comparisons need every round on the same images: equal counts and equal true classes."""
    if not rounds:
        raise ValueError("no rounds to choose from")
    first = rounds[0]
    for r, x in enumerate(rounds):
        if len(x) != len(first) or not np.array_equal(x.true, first.true):
            raise ValueError(
                f"round {r}'s validation predictions are not on round 0's images ({len(x)} vs {len(first)} images, "
                "or other true classes): read every round's sidecars in the same order"
            )


# --- intervals and paired tests ----------------------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a top-1 of ``correct / n`` (95% by default); ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def round_interval(x: RoundPredictions) -> tuple[float, float]:
    return wilson_interval(int(x.correct.sum()), len(x))


class Paired(NamedTuple):
    """Round ``a`` against round ``b`` on the same images: ``a_only`` right only in ``a``, ``b_only`` only in ``b``;
    ``p`` two-sided; ``margin`` = ``a_only - b_only`` (images ``a`` gets right beyond ``b``)."""

    a_only: int
    b_only: int
    p: float

    @property
    def margin(self) -> int:
        return self.a_only - self.b_only


def mcnemar_p(a_only: int, b_only: int) -> float:
    """McNemar's exact test: two-sided binomial p of ``min(a_only, b_only)`` on the discordant images at 1/2."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a: RoundPredictions, b: RoundPredictions) -> Paired:
    ca, cb = a.correct, b.correct
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    return Paired(a_only, b_only, mcnemar_p(a_only, b_only))


class Bootstrap(NamedTuple):
    """Paired bootstrap of ``a - b``: the observed top-1 and log-loss differences, their 95% percentile intervals,
    and two-sided p-values (twice the smaller share of resamples on either side of 0)."""

    top1_diff: float
    top1_interval: tuple[float, float]
    top1_p: float
    loss_diff: float
    loss_interval: tuple[float, float]
    loss_p: float


def paired_bootstrap(a: RoundPredictions, b: RoundPredictions, n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """Resample the images (with replacement, ``n_boot`` times, seeded), the same draw for both rounds."""
    n = len(a)
    d_top1 = a.correct.astype(np.float64) - b.correct.astype(np.float64)
    d_loss = a.losses - b.losses
    if n == 0:
        return Bootstrap(0.0, (0.0, 0.0), 1.0, 0.0, (0.0, 0.0), 1.0)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    bt, bl = d_top1[idx].mean(axis=1), d_loss[idx].mean(axis=1)

    def two_sided(x: np.ndarray) -> float:
        return float(min(1.0, 2 * min((x <= 0).mean(), (x >= 0).mean())))

    def interval(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(x, [0.025, 0.975])
        return float(lo), float(hi)

    return Bootstrap(
        float(d_top1.mean()), interval(bt), two_sided(bt), float(d_loss.mean()), interval(bl), two_sided(bl)
    )


# --- best-round rules ---------------------------------------------------------------------------------------------


class Choice(NamedTuple):
    round: int
    reason: str


@dataclass(frozen=True)
class ChoiceOptions:
    alpha: float = 0.05  # "beyond the noise": a two-sided p below alpha
    n_boot: int = 2000
    seed: int = 0


def _pct(x: float) -> str:
    return f"{x * 100:.2f}".rstrip("0").rstrip(".")


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}".rstrip("0").rstrip(".") if p < 1 else "1"


def rule_today(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    """Highest validation top-1, the earliest on a tie (``stopping.best_round``, what runs record today)."""
    r = best_round([x.top1 for x in rounds])
    return Choice(r, f"round {r}: highest validation top-1 ({_pct(rounds[r].top1)}%), the earliest on a tie")


def rule_last(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    r = len(rounds) - 1
    return Choice(r, f"round {r}: the last round")


def rule_latest_tie(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    """Highest validation top-1; a tie goes to the lower log-loss, then to the later round."""
    r = max(range(len(rounds)), key=lambda i: (rounds[i].top1, -rounds[i].log_loss, i))
    tied = [i for i, x in enumerate(rounds) if x.top1 == rounds[r].top1]
    why = f", ties {tied} broken by log-loss ({rounds[r].log_loss:.3f})" if len(tied) > 1 else ""
    return Choice(r, f"round {r}: highest validation top-1 ({_pct(rounds[r].top1)}%){why}")


def rule_logloss(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    r = min(range(len(rounds)), key=lambda i: (rounds[i].log_loss, -i))
    return Choice(r, f"round {r}: lowest validation log-loss ({rounds[r].log_loss:.3f})")


# A paired test of round a against round b: (a's edge, > 0 when a is ahead; two-sided p; the reason's words).
Test = Callable[[RoundPredictions, RoundPredictions, ChoiceOptions], tuple[float, float, str]]


def _words(t: Paired) -> str:
    """``+11 images (12 vs 1), McNemar p=0.0034``: the net margin, the discordant images each way, the p-value."""
    return f"{t.margin:+d} images ({t.a_only} vs {t.b_only}), McNemar p={_p(t.p)}"


def _mcnemar_test(a: RoundPredictions, b: RoundPredictions, opts: ChoiceOptions) -> tuple[float, float, str]:
    t = mcnemar(a, b)
    return t.margin, t.p, _words(t)


def _bootstrap_top1(a: RoundPredictions, b: RoundPredictions, opts: ChoiceOptions) -> tuple[float, float, str]:
    t = paired_bootstrap(a, b, opts.n_boot, opts.seed)
    return t.top1_diff, t.top1_p, f"{t.top1_diff * 100:+.0f} points, bootstrap p={_p(t.top1_p)}"


def _bootstrap_loss(a: RoundPredictions, b: RoundPredictions, opts: ChoiceOptions) -> tuple[float, float, str]:
    t = paired_bootstrap(a, b, opts.n_boot, opts.seed)
    return -t.loss_diff, t.loss_p, f"log-loss {t.loss_diff:+.3f}, bootstrap p={_p(t.loss_p)}"


def _keep_last_unless_beaten(rounds: Sequence[RoundPredictions], opts: ChoiceOptions, test: Test) -> Choice:
    """The last round, unless an earlier one beats it beyond the noise (``test``: ``(edge of a over b, p, text)``);
    then, of those that do, the one with the highest top-1 (the later on a tie)."""
    check_same_images(rounds)
    last = len(rounds) - 1
    if last == 0:
        return Choice(0, "round 0: the only round")
    tests = {r: test(rounds[r], rounds[last], opts) for r in range(last)}
    beating = [r for r, (edge, p, _) in tests.items() if edge > 0 and p < opts.alpha]
    if beating:
        r = max(beating, key=lambda i: (rounds[i].top1, i))
        return Choice(r, f"round {r}: beats the last round {last} beyond the noise ({tests[r][2]})")
    closest = max(tests, key=lambda i: (tests[i][0] > 0, -tests[i][1], tests[i][0], i))
    return Choice(
        last, f"round {last}: no earlier round beats it beyond the noise (round {closest}: {tests[closest][2]})"
    )


def rule_mcnemar(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    return _keep_last_unless_beaten(rounds, opts, _mcnemar_test)


def rule_bootstrap(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    return _keep_last_unless_beaten(rounds, opts, _bootstrap_top1)


def rule_bootstrap_logloss(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    return _keep_last_unless_beaten(rounds, opts, _bootstrap_loss)


def rule_latest_unbeaten(rounds: Sequence[RoundPredictions], opts: ChoiceOptions = ChoiceOptions()) -> Choice:
    """The latest round that no other round beats beyond the noise (McNemar): like ``mcnemar``, but when the last
    round is beaten it falls back to the next latest round, not to the earlier round that beat it."""
    check_same_images(rounds)
    if len(rounds) == 1:
        return Choice(0, "round 0: the only round")
    skipped = []
    # Some round is always unbeaten: none beats the highest top-1 (a margin is a difference of top-1 counts).
    for r in range(len(rounds) - 1, -1, -1):
        tests = {o: mcnemar(rounds[o], rounds[r]) for o in range(len(rounds)) if o != r}
        beaten = [o for o, t in tests.items() if t.margin > 0 and t.p < opts.alpha]
        if beaten:
            o = min(beaten, key=lambda i: (tests[i].p, -i))
            skipped.append(f"round {r} is beaten by round {o}: {_words(tests[o])}")
            continue
        o = max(tests, key=lambda i: (tests[i].margin, -tests[i].p, i))
        closest = f"closest: round {o}: {_words(tests[o])}"
        return Choice(r, f"round {r}: no round beats it beyond the noise ({'; '.join([*skipped, closest])})")
    raise AssertionError("unreachable: the round with the highest top-1 is never beaten")


RULES: dict[str, Callable[[Sequence[RoundPredictions], ChoiceOptions], Choice]] = {
    "today": rule_today,
    "last": rule_last,
    "latest_tie": rule_latest_tie,
    "logloss": rule_logloss,
    "mcnemar": rule_mcnemar,
    "latest_unbeaten": rule_latest_unbeaten,
    "bootstrap": rule_bootstrap,
    "bootstrap_logloss": rule_bootstrap_logloss,
}


def choose_round(
    rounds: Sequence[RoundPredictions], rule: str = "mcnemar", opts: ChoiceOptions = ChoiceOptions()
) -> Choice:
    """``(round, reason)`` by the named rule (``RULES``)."""
    if rule not in RULES:
        raise ValueError(f"unknown best-round rule {rule!r}: one of {', '.join(RULES)}")
    return RULES[rule](rounds, opts)


# --- stop rule ----------------------------------------------------------------------------------------------------


def stop_beyond_noise(
    rounds: Sequence[RoundPredictions],
    patience: int,
    alpha: float = 0.05,
    mode: Literal["not_better", "worse"] = "worse",
) -> tuple[bool, str]:
    """Whether to stop after the last round: the last ``patience`` students each fail the test against their own
    teacher (the round before). ``mode``: ``worse`` counts a student its teacher beats beyond the noise (McNemar,
    ``p < alpha``); ``not_better`` counts a student that does not beat its teacher beyond the noise, which on 100
    images is almost every student (a gain needs about 7 more images right than wrong). ``patience: 0`` never stops.
    """
    students = len(rounds) - 1
    if not patience or students < patience:
        return False, f"{students} student(s), patience {patience}: go on"
    failed, texts = [], []
    for r in range(students - patience + 1, students + 1):
        t = mcnemar(rounds[r], rounds[r - 1])
        failed.append(t.margin < 0 and t.p < alpha if mode == "worse" else not (t.margin > 0 and t.p < alpha))
        texts.append(f"round {r} vs {r - 1}: {_words(t)}")
    what = "worse than their teachers" if mode == "worse" else "not better than their teachers"
    verdict = "stop" if all(failed) else "go on"
    return all(failed), f"{verdict}: {patience} student(s) in a row {what} beyond the noise? ({'; '.join(texts)})"


# --- how many validation images -----------------------------------------------------------------------------------


def images_needed(d: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Validation images for McNemar's exact test to tell apart two rounds ``d`` top-1 apart (a fraction: 0.02 = 2
    points) with the given power, when a fraction ``discordance`` of images is right in exactly one of them: Connor
    (1987)'s normal approximation, raised (in steps of 0.5%) until ``mcnemar_power`` reaches ``power``."""
    if not 0 < d <= discordance <= 1:
        raise ValueError(f"need 0 < d ({d}) <= discordance ({discordance}) <= 1")
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    n = math.ceil((za * math.sqrt(discordance) + zb * math.sqrt(discordance - d * d)) ** 2 / (d * d))
    while mcnemar_power(n, d, discordance, alpha) < power:
        n += max(1, n // 200)
    return n


def mcnemar_power(n: int, d: float, discordance: float, alpha: float = 0.05) -> float:
    """Exact power of McNemar's exact test (two-sided, ``p < alpha``) on ``n`` images to find the better of two
    rounds ``d`` apart at the given discordance: the discordant count is Binomial(n, discordance), and each
    discordant image favours the better round with probability ``(discordance + d) / (2 discordance)``."""
    if not 0 < d <= discordance <= 1:
        raise ValueError(f"need 0 < d ({d}) <= discordance ({discordance}) <= 1")
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])

    def log_pmf(k: np.ndarray, m: int, p: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return logfact[m] - logfact[k] - logfact[m - k] + k * np.log(p) + (m - k) * np.log1p(-p)

    favour = (discordance + d) / (2 * discordance)
    m_all = np.arange(n + 1)
    weight = np.exp(log_pmf(m_all, n, discordance)) if discordance < 1 else (m_all == n).astype(float)
    total = 0.0
    for m in np.nonzero(weight > 1e-12)[0]:
        k = np.arange(m + 1)
        tail = np.minimum(1.0, 2 * np.cumsum(np.exp(log_pmf(k, m, 0.5))))  # p of a split (k, m - k), k <= m / 2
        # Reject for the better round when its count j has min(j, m - j) = m - j with p < alpha.
        j = k[(k > m / 2) & (tail[np.clip(m - k, 0, m)] < alpha)]
        if j.size:
            hit = np.exp(log_pmf(j, m, favour)).sum() if favour < 1 else float(m in j)
            total += weight[m] * hit
    return float(total)


def images_needed_table(
    ds: Sequence[float] = (0.01, 0.02, 0.05), discordances: Sequence[float] = (0.05, 0.10), power: float = 0.8
) -> list[dict]:
    """One row per ``(d, discordance)`` with ``d <= discordance``: the images needed (``images_needed``), the exact
    power there, and the 95% Wilson interval's width at 95% top-1 on that many images."""
    rows = []
    for q in discordances:
        for d in ds:
            if d <= q:
                n = images_needed(d, q, power=power)
                lo, hi = wilson_interval(round(0.95 * n), n)
                rows.append(
                    {
                        "d": d,
                        "discordance": q,
                        "images": n,
                        "exact_power": round(mcnemar_power(n, d, q), 3),
                        "interval_width_at_95": round(hi - lo, 4),
                    }
                )
    return rows


def noise_warning(top1: Sequence[float], images: int, discordance: float = 0.05) -> str | None:
    """One line when the 95% interval of validation top-1 is wider than the gains between the rounds compared
    (``top1``: per round, as fractions, on ``images`` validation images); ``None`` when it is not."""
    if images <= 0 or len(top1) < 2:
        return None
    best, spread = max(top1), max(top1) - min(top1)  # the largest gain between any two of the rounds
    lo, hi = wilson_interval(round(best * images), images)
    if hi - lo <= spread:
        return None
    need = images_needed(0.02, max(discordance, 0.02))
    return (
        f"warning: {images} validation images: the best round's 95% interval is {_pct(lo)}-{_pct(hi)}% "
        f"({_pct(hi - lo)} points wide), wider than the gains between rounds (at most {_pct(spread)} points): "
        f"which round is best is mostly noise; telling 2 points apart takes about {need:,} images"
    )
