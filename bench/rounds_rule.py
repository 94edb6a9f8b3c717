"""Which best-round rule to ship: each rule of ``stages/maths/round_choice.py`` scored by its regret on unseen data.

    python bench/rounds_rule.py --config configs/digits.yaml --seeds 5 [--base-seed 0] [--rounds 3]
                                [--storage /work/scratch/rules-runs] [--name rules] [--ladders A B]
    python bench/rounds_rule.py --runs-from /work/scratch/rules-runs [--name rules]   # re-score, no training

Runs the real round loop (``pipeline.rounds.run_pipeline``, as ``bench/seeds.py`` does) for every seed and ladder:
ladder A is the digits default (resnet10t every round), ladder B a growing one (resnet10t -> 14t -> 18 -> 26 with
the default's noise settings, ``ladder_mode: any``). ``--runs-from`` scores any finished digits runs named
``<name>-<ladder>-s<seed>``, e.g. ``bench/seeds.py --config configs/digits-hard.yaml --name rules-H`` (ladder H). Runs
are ordinary runs named ``<name>-<ladder>-s<seed>`` under
``--storage`` (keep it outside the repository); the same name resumes them and ``--runs-from`` re-scores them.

Each rule picks a round from the rounds' validation predictions (the eval sidecars ``round-NNN/eval/val/*.parquet``).
Its REGRET is ``top-1(best round) - top-1(chosen round)`` in points, on data the rule never saw:

* judge ``pool``: the digits' unlabeled pool with its true labels (``stages.data.digits.split_digits(0)``, with the
  run config's ``data.prepare_labeled_per_class``: digits-hard's pool holds the 80 labels it leaves out), each
  round's saved model re-evaluated on it (the pixels are checked against the run's unlabeled shards);
* judge ``split``: ``--splits`` random halvings of validation; the rule chooses on one half, the other judges.

Test top-1 is read and printed for information only; no rule and no regret reads it. Prints a table per judge
(mean and worst regret, per ladder and overall) and the chosen rounds' mean test top-1 beside the last round's;
its last line is one JSON object, also written with the machine's facts to ``bench/results/rounds_rule-<UTC>.json``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_common import add_result_args, load_prepared, one_line_errors, save_result
from stages.maths.round_choice import (
    RULES,
    ChoiceOptions,
    RoundPredictions,
    choose_round,
    images_needed_table,
    noise_warning,
    round_interval,
    stop_beyond_noise,
)
from stages.storage.layout import RoundLayout, RunLayout

log = logging.getLogger("rounds_rule")

_NOISE = "drop_rate: 0.3, drop_path_rate: 0.1, randaug_n: 2, randaug_m: 5"
LADDERS: dict[str, list[str]] = {
    "A": [],  # the config's own ladder (digits: resnet10t every round)
    "B": [
        "ladder=[{model: resnet10t, drop_rate: 0.2, drop_path_rate: 0.05, randaug_n: 2, randaug_m: 5}, "
        f"{{model: resnet14t, {_NOISE}}}, {{model: resnet18, {_NOISE}}}, {{model: resnet26, {_NOISE}}}]",
        "ladder_mode=any",
    ],
}
TIMES = "rounds_rule-runs.json"  # per-run training seconds, kept beside the runs so a re-score can report them


def run_name(prefix: str, ladder: str, seed: int) -> str:
    return f"{prefix}-{ladder}-s{seed}"


def train_runs(args: argparse.Namespace) -> None:
    """Run (or resume) every ladder x seed; seeds interleave the ladders so a cut-short bench has both."""

    from pipeline.rounds import run_pipeline
    from stages.storage.files import atomic_write_json

    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    times_path = storage / TIMES
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for seed in range(args.base_seed, args.base_seed + args.seeds):
        for ladder in args.ladders:
            name = run_name(args.name, ladder, seed)
            overrides = [*LADDERS[ladder], *args.overrides, f"seed={seed}", f"rounds={args.rounds}"]
            cfg = load_prepared(args.config, [*overrides, f"storage={storage}"])
            t = time.perf_counter()
            with one_line_errors():
                rows = run_pipeline(cfg, name, progress=False)
            seconds = round(time.perf_counter() - t, 1)
            if name not in times or seconds > 30:  # a resume that skipped every stage keeps the first timing
                times[name] = {"ladder": ladder, "seed": seed, "seconds": seconds, "overrides": overrides}
            atomic_write_json(times_path, times)
            test = " -> ".join(f"{m['test_top1'] * 100:.2f}" for m in rows)
            print(f"{name}: {len(rows)} rounds in {seconds:.0f} s, test {test}", flush=True)


# --- reading the runs ---------------------------------------------------------------------------------------------


def read_val(round_dir: RoundLayout) -> tuple[list[str], RoundPredictions]:
    """A round's validation predictions from its eval sidecars, sorted by key (the same order for every round)."""
    from stages.evaluate import val_predictions

    paths = sorted(Path(round_dir.eval, "val").glob("*.parquet"))
    if not paths:
        raise SystemExit(f"{round_dir.dir}: no validation sidecars (eval/val/*.parquet)")
    return val_predictions(paths)


def load_run(run_dir: Path) -> dict:
    """Every finished round of a run: validation predictions, validation and test top-1 from ``metrics.json``."""
    rounds, keys, val, test = [], None, [], []
    layout = RunLayout(run_dir)
    for r in layout.round_indices():
        rdir = layout.round(r)
        if not Path(rdir.metrics).exists():
            break
        metrics = json.loads(Path(rdir.metrics).read_text())
        k, preds = read_val(rdir)
        if keys is not None and k != keys:
            raise SystemExit(f"{rdir}: validation keys differ from round 0's")
        keys = k
        if abs(preds.top1 - metrics["val_top1"]) > 1e-9:
            raise SystemExit(f"{rdir}: sidecars give val top-1 {preds.top1}, metrics.json {metrics['val_top1']}")
        rounds.append(rdir)
        val.append(preds)
        test.append(metrics["test_top1"])
    return {"name": run_dir.name, "dir": run_dir, "round_dirs": rounds, "val": val, "test_top1": test}


def pool_images(run_dir: Path) -> tuple[list, np.ndarray]:
    """The digits' unlabeled pool as the run read it (PIL images, sorted by key) and its true labels from
    ``split_digits(0)``; every decoded image must equal the split's array, pixel for pixel."""
    import yaml
    from PIL import Image

    from stages.data.digits import split_digits
    from stages.data.shards import decode_image, expand_shards, image_field, iter_raw_samples

    cfg = yaml.safe_load(Path(RunLayout(run_dir).config).read_text())
    split = split_digits(0, labeled_per_class=cfg["data"].get("prepare_labeled_per_class", 10))  # digits-hard: 2
    patterns = [p if Path(p).is_absolute() else str(ROOT / p) for p in cfg["data"]["unlabeled"]]
    try:
        shards = expand_shards(patterns, "data.unlabeled")
    except Exception as exc:  # the shards moved: the split's own arrays are the same pixels (checked when present)
        log.warning("unlabeled shards not found (%s): using split_digits(0)'s arrays", exc)
        return [Image.fromarray(x, mode="L") for x in split.unlabeled_x], split.unlabeled_y
    samples = sorted((s for shard in shards for s in iter_raw_samples(shard)), key=lambda s: s["__key__"])
    images = [decode_image(image_field(s), cfg["data"]["channels"]) for s in samples]
    index = [int(s["__key__"].rsplit("-", 1)[1]) for s in samples]
    if index != list(range(len(split.unlabeled_x))) or any(
        not np.array_equal(np.asarray(im), split.unlabeled_x[i]) for im, i in zip(images, index, strict=True)
    ):
        raise SystemExit(f"{shards[0]}...: the unlabeled shards are not split_digits(0)'s pool, pixel for pixel")
    return images, split.unlabeled_y


def pool_predictions(run: dict, images: list, labels: np.ndarray) -> list[np.ndarray]:
    """Each round's saved model (un-noised) on the unlabeled pool: right or wrong per image, by its true label."""
    from stages.evaluate import predict_probs
    from stages.models.factory import load_model

    out: list[np.ndarray] = []
    for rdir in run["round_dirs"]:
        model, card = load_model(rdir.dir)
        out.append(predict_probs(model, images, card).argmax(axis=1) == labels)
    return out


# --- scoring ---------------------------------------------------------------------------------------------------------


def regret(judge: Sequence[float], chosen: int) -> float:
    """Points of top-1 (judge's) lost by shipping ``chosen`` instead of the judge's best round."""
    return 100 * (max(judge) - judge[chosen])


def half_splits(true: np.ndarray, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` stratified halvings of the validation images: (choosing half, judging half), seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        choose = []
        for c in np.unique(true):
            idx = rng.permutation(np.nonzero(true == c)[0])
            choose.extend(idx[: len(idx) // 2])
        mask = np.zeros(len(true), dtype=bool)
        mask[choose] = True
        out.append((np.nonzero(mask)[0], np.nonzero(~mask)[0]))
    return out


def split_regret(val: list[RoundPredictions], rule: str, splits, opts: ChoiceOptions) -> float:
    """Mean regret over the halvings: the rule chooses on one half, the other half judges."""
    total = 0.0
    for choose, judge in splits:
        chosen = choose_round([x.subset(choose) for x in val], rule, opts).round
        total += regret([x.subset(judge).top1 for x in val], chosen)
    return total / len(splits)


def summarise(values: dict[str, list[float]]) -> dict:
    return {
        k: {"mean_regret": round(float(np.mean(v)), 3), "worst_regret": round(float(np.max(v)), 3)}
        for k, v in values.items()
    }


# Ties in mean regret (judge a, then b) go to the first rule here: mcnemar, the shipped default (``StopConfig.best``),
# before last, which picks the same round unless an earlier round is better beyond the noise, and never goes back.
TIES = ("mcnemar", "last", "today", "latest_tie", "logloss", "latest_unbeaten", "bootstrap", "bootstrap_logloss")
STOPS = (("today", 1), ("today", 2), ("worse", 1), ("worse", 2), ("not_better", 1), ("not_better", 2))


def score_run(run: dict, pool: list[float], splits: int, opts: ChoiceOptions) -> dict:
    """What each rule picks on the full validation, its regret on the pool, its mean regret over the halvings."""
    val = run["val"]
    halves = half_splits(val[0].true, splits)
    choices = {rule: choose_round(val, rule, opts) for rule in RULES}
    return {
        "chosen": {rule: c.round for rule, c in choices.items()},
        "reasons": {rule: c.reason for rule, c in choices.items()},
        "regret_pool": {rule: round(regret(pool, c.round), 4) for rule, c in choices.items()},
        "regret_split": {rule: round(split_regret(val, rule, halves, opts), 4) for rule in RULES},
    }


def stop_outcomes(val: list[RoundPredictions], pool: list[float], rule: str, opts: ChoiceOptions) -> dict:
    """Each stop variant replayed on the run: students trained before it stops, and the pool regret of the round
    ``rule`` then picks among the rounds run (against the best of all rounds)."""
    from stages.maths.stopping import StopConfig, should_stop

    out = {}
    for mode, patience in STOPS:
        stop_after = len(val) - 1
        for r in range(1, len(val)):
            if mode == "today":
                stop = should_stop([x.top1 for x in val[: r + 1]], StopConfig(patience=patience, min_gain=0.0))
            else:
                stop = stop_beyond_noise(val[: r + 1], patience, opts.alpha, mode)[0]
            if stop:
                stop_after = r
                break
        chosen = choose_round(val[: stop_after + 1], rule, opts).round
        out[f"{mode}:{patience}"] = {"students": stop_after, "regret_pool": round(regret(pool, chosen), 4)}
    return out


def discordance(correct: list[np.ndarray]) -> float:
    """The mean share of images exactly one of two consecutive rounds gets right."""
    return float(np.mean([(a != b).mean() for a, b in zip(correct, correct[1:], strict=False)]))


def score_runs(storage: Path, prefix: str, splits: int, opts: ChoiceOptions) -> dict:
    times = json.loads((storage / TIMES).read_text()) if (storage / TIMES).exists() else {}
    pools: dict[str, tuple[list, np.ndarray]] = {}
    runs = []
    for run_dir in sorted(storage.glob(f"{prefix}-*-s*")):
        layout = RunLayout(run_dir)
        status = json.loads(Path(layout.status).read_text()) if Path(layout.status).exists() else {}
        if status.get("status") != "finished":
            print(f"{run_dir.name}: status {status.get('status')!r}, left out", flush=True)
            continue
        run = load_run(run_dir)
        recorded = status["stop"].get("best_by")
        rule = recorded if recorded in RULES else "today"  # runs before stop.best recorded the today rule's choice
        if choose_round(run["val"], rule, opts).round != status["stop"]["best_round"]:
            raise SystemExit(
                f"{run_dir}: rule {rule} picks round {choose_round(run['val'], rule, opts).round}, "
                f"run.json {status['stop']['best_round']}"
            )
        key = Path(layout.config).read_text().split("unlabeled:", 1)[1][:200]
        if key not in pools:
            pools[key] = pool_images(run_dir)
        images, labels = pools[key]
        pool_correct = pool_predictions(run, images, labels)
        pool = [float(c.mean()) for c in pool_correct]
        ladder, seed = run_dir.name[len(prefix) + 1 :].rsplit("-s", 1)
        row = {
            "run": run_dir.name,
            "ladder": ladder,
            "seed": int(seed),
            "seconds": times.get(run_dir.name, {}).get("seconds"),
            "models": [json.loads(Path(d.model.card).read_text())["create"]["model_name"] for d in run["round_dirs"]],
            "val_top1": [x.top1 for x in run["val"]],
            "val_interval": [[round(v, 4) for v in round_interval(x)] for x in run["val"]],  # Wilson, 95%
            "noise_warning": noise_warning([x.top1 for x in run["val"]], len(run["val"][0])),
            "val_log_loss": [round(x.log_loss, 4) for x in run["val"]],
            "judge_top1": pool,
            "test_top1": run["test_top1"],  # for information only: no rule and no regret reads it
            "val_discordance": discordance([x.correct for x in run["val"]]),
            "judge_discordance": discordance(pool_correct),
        }
        row |= score_run(run, pool, splits, opts)
        row["stop"] = stop_outcomes(run["val"], pool, "mcnemar", opts)
        runs.append(row)
        print(f"{run_dir.name}: scored", flush=True)
    if not runs:
        raise SystemExit(f"no finished runs named {prefix}-<ladder>-s<seed> under {storage}")
    return aggregate(runs, splits)


def aggregate(runs: list[dict], splits: int) -> dict:
    ladders = sorted({r["ladder"] for r in runs})
    groups = {**{lad: [r for r in runs if r["ladder"] == lad] for lad in ladders}, "all": runs}

    def table(judge: str, rows: list[dict]) -> dict:
        return summarise({rule: [r[f"regret_{judge}"][rule] for r in rows] for rule in RULES})

    regrets = {g: {j: table(j, rows) for j in ("pool", "split")} for g, rows in groups.items()}
    rules = {
        rule: {
            "mean_regret": {j: regrets["all"][j][rule]["mean_regret"] for j in ("pool", "split")},
            "worst_regret": {j: regrets["all"][j][rule]["worst_regret"] for j in ("pool", "split")},
        }
        for rule in RULES
    }
    default = min(
        RULES, key=lambda k: (rules[k]["mean_regret"]["pool"], rules[k]["mean_regret"]["split"], TIES.index(k))
    )
    test_means = {
        g: {
            **{
                rule: round(100 * float(np.mean([r["test_top1"][r["chosen"][rule]] for r in rows])), 3)
                for rule in RULES
            },
            "judge_best": round(
                100 * float(np.mean([r["test_top1"][int(np.argmax(r["judge_top1"]))] for r in rows])), 3
            ),
        }
        for g, rows in groups.items()
    }
    stop = {
        variant: {
            "students_mean": round(float(np.mean([r["stop"][variant]["students"] for r in runs])), 3),
            "mean_regret_pool": round(float(np.mean([r["stop"][variant]["regret_pool"] for r in runs])), 3),
        }
        for variant in runs[0]["stop"]
    }
    q = float(np.mean([r["judge_discordance"] for r in runs]))
    qv = float(np.mean([r["val_discordance"] for r in runs]))
    return {
        "rules": rules,
        "per_ladder": {lad: regrets[lad] for lad in ladders},
        "default": default,
        # Rules that chose the same round as the default in every run: the bench cannot tell them apart.
        "same_choices_as_default": [
            rule for rule in RULES if all(r["chosen"][rule] == r["chosen"][default] for r in runs) and rule != default
        ],
        "today": rules["today"],
        "seeds": sorted({r["seed"] for r in runs}),
        "ladders": {lad: sorted({tuple(r["models"]) for r in groups[lad]})[0] for lad in ladders},
        "runs": runs,
        "test_top1_mean_of_chosen": test_means,
        "stop_rules": stop,
        "discordance": {"val": qv, "judge": q},
        # Rows only where d <= discordance: two rounds d apart disagree on at least d of the images.
        "images_needed": images_needed_table(discordances=sorted({round(q, 3), round(qv, 3), 0.02, 0.05, 0.10})),
        "splits": splits,
        "training_seconds": {
            g: round(float(np.mean([r["seconds"] for r in rows if r["seconds"]] or [0.0])), 1)
            for g, rows in groups.items()
        },
    }


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def print_report(result: dict) -> None:
    runs, ladders = result["runs"], list(result["per_ladder"])
    tables = result["per_ladder"] | {"all": {j: _overall(result, j) for j in ("pool", "split")}}
    count = {lad: sum(r["ladder"] == lad for r in runs) for lad in ladders} | {"all": len(runs)}
    groups = [*ladders, "all"]
    widths = [18] + [15] * len(groups)
    judges = {
        "pool": "judge (a): the unlabeled pool's true labels, each round's model re-evaluated",
        "split": f"judge (b): {result['splits']} stratified halvings of validation (choose on one, judge on the other)",
    }
    for judge, title in judges.items():
        worst = "worst over runs" if judge == "pool" else "worst run's mean over the halvings"
        print(f"\n{title}\nregret in top-1 points, mean / {worst}")
        print(_row(["rule", *(f"{g} ({count[g]} runs)" for g in groups)], widths))
        for rule in RULES:
            cells = [tables[g][judge][rule] for g in groups]
            print(_row([rule, *(f"{x['mean_regret']:.2f} / {x['worst_regret']:.2f}" for x in cells)], widths))
    test = result["test_top1_mean_of_chosen"]
    print("\nmean test top-1 (%) of the round each rule chooses (test is reported, never chosen on)")
    print(_row(["rule", *groups], widths))
    for rule in test["all"]:
        print(_row([rule, *(f"{test[g][rule]:.2f}" for g in groups)], widths))
    print("\nper run: top-1 (%) per round on validation | judge (a) | test; rounds chosen by today and the default")
    for r in runs:
        cells = [" ".join(f"{x * 100:5.1f}" for x in r[k]) for k in ("val_top1", "judge_top1", "test_top1")]
        print(
            f"{r['run']:<14} {' | '.join(cells)} | today {r['chosen']['today']}, "
            f"{result['default']} {r['chosen'][result['default']]} ({r['seconds']} s)"
        )
    print("\nstop rules replayed (then the mcnemar rule on the rounds run): students trained, pool regret")
    for variant, x in result["stop_rules"].items():
        print(f"  {variant:<14} students {x['students_mean']:.2f}  regret {x['mean_regret_pool']:.2f}")
    q = result["discordance"]
    print(f"\nconsecutive rounds disagree on {q['val'] * 100:.1f}% of validation, {q['judge'] * 100:.1f}% of the pool")
    print("validation images for McNemar to tell two rounds d points apart (80% power, alpha 0.05):")
    for row in result["images_needed"]:
        print(
            f"  d {row['d'] * 100:.0f} points at {row['discordance'] * 100:.1f}% discordance: {row['images']:,} images"
        )
    t = result["today"]["mean_regret"]
    d = result["rules"][result["default"]]["mean_regret"]
    print(
        f"\ndefault rule: {result['default']} (least mean regret on judge (a), then (b), ties in TIES order): "
        f"{d['pool']:.2f} points (judge b {d['split']:.2f}) against today's {t['pool']:.2f} ({t['split']:.2f}); "
        f"the same round in every run: {', '.join(result['same_choices_as_default']) or 'no other rule'}"
    )


def _overall(result: dict, judge: str) -> dict:
    return {
        rule: {"mean_regret": v["mean_regret"][judge], "worst_regret": v["worst_regret"][judge]}
        for rule, v in result["rules"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--base-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ladders", nargs="+", default=list(LADDERS), choices=list(LADDERS))
    parser.add_argument("--name", default="rules", help="run name prefix (default rules)")
    parser.add_argument("--storage", default="/work/scratch/rules-runs", help="where the runs live")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs-from", type=Path, help="re-score the finished runs under this folder; train nothing")
    parser.add_argument("--train-only", action="store_true", help="train (or resume) the runs, score nothing")
    parser.add_argument("--splits", type=int, default=200, help="validation halvings for judge (b) (default 200)")
    parser.add_argument("--alpha", type=float, default=0.05, help="'beyond the noise': p below this (default 0.05)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    add_result_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    if args.runs_from is None:
        train_runs(args)
        if args.train_only:
            return
    storage = Path(args.runs_from or args.storage).resolve()
    result = {"bench": "rounds_rule", "storage": str(storage), "alpha": args.alpha, "n_boot": args.n_boot}
    result |= score_runs(storage, args.name, args.splits, ChoiceOptions(args.alpha, args.n_boot))
    print_report(result)
    save_result(result | {"seconds": round(time.perf_counter() - start, 1)}, "rounds_rule", args)


if __name__ == "__main__":
    main()
