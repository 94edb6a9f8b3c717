"""Labels from ``suggest-labels`` against as many random ones: what a person's next labels buy (issue 31).

    python bench/suggest.py [--config configs/digits-hard.yaml] [--seeds 3] [--n 20] [--base-rounds 1]
                            [--rounds 1] [--name NAME] [--base-runs PREFIX] [--set key=value ...] [--no-save]
                            [--results DIR]

Per run seed:

1. a base run of the config with ``--base-rounds`` student rounds (so that a class left behind can show), or the
   runs ``--base-runs`` names (``bench/seeds.py``'s of the same config and seeds), resumed to that many rounds;
2. two arms of ``--n`` pool images each, labeled as a person would (here from the truth the digits split knows):
   ``suggested`` asks ``python -m pipeline suggest-labels`` of the base run, ``random`` draws as many pool images
   with the seed. Each arm goes through ``prepare-folder --csv --labeled-only`` exactly as a user's labels do;
3. each arm runs again with ``data.labeled`` plus its new shards, for ``--rounds`` student rounds. Round 0 starts
   from the base run's pretrained encoder (``teacher.init``; both arms alike, so pretraining is paid once per seed),
   with the selection and student start the base run chose (``run.json``: ``pretrain.then``).

Prints, per arm and seed, test top-1 and the worst class's test top-1 of round 0 and of the round each run chose,
and one JSON line with them, the gains of ``suggested`` over ``random`` (mean ± sample std over seeds) and the
machine's facts, also written to ``bench/results/suggest-<stamp>.json``. Runs are ordinary runs named
``<NAME>-base-s<seed>``, ``<NAME>-suggested-s<seed>`` and ``<NAME>-random-s<seed>``: the same ``--name`` resumes.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import csv
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_common import add_result_args, load_prepared, one_line_errors, save_result  # noqa: E402
from bench.seeds import pool_truth  # noqa: E402
from pipeline.plan import run_folder  # noqa: E402
from pipeline.rounds import run_pipeline  # noqa: E402
from stages.storage.files import read_json  # noqa: E402
from stages.storage.layout import CLASSES, SUGGESTED_LABELS, RunLayout  # noqa: E402

ARMS = ("suggested", "random")
FIGURES = ("round0_test_top1", "round0_worst_class_top1", "chosen_test_top1", "chosen_worst_class_top1")


def pool_keys(cfg) -> dict[str, str]:
    """Every unlabeled image's key -> its shard."""
    from stages.data.shards import expand_shards, iter_raw_samples

    return {
        sample["__key__"]: shard
        for shard in expand_shards(cfg.data.unlabeled, "data.unlabeled")
        for sample in iter_raw_samples(shard)
    }


def random_folder(cfg, n: int, seed: int, out: Path, classes: Path) -> None:
    """``n`` pool images drawn with ``seed``, written as ``suggest-labels`` writes its folder (``images/``, the
    labels CSV, the run's ``classes.json``)."""
    from pipeline.own_data import export_images

    keys = pool_keys(cfg)
    picked = sorted(np.random.default_rng(seed).choice(sorted(keys), size=n, replace=False).tolist())
    files = export_images({k: keys[k] for k in picked}, out)
    (out / CLASSES).write_bytes(classes.read_bytes())
    with open(out / SUGGESTED_LABELS, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([files[k], "?", "labeled"] for k in picked)


def label_from_truth(folder: Path, truth: np.ndarray, names: list[str]) -> list[int]:
    """Sets each row of the folder's labels CSV to its image's true class (key ``unlabeled-<i>`` is pool row
    ``i``), as the person who sorts them would; returns the classes."""
    with open(folder / SUGGESTED_LABELS) as f:
        rows = list(csv.DictReader(f))
    classes = [int(truth[int(Path(row["path"]).stem.rsplit("-", 1)[1])]) for row in rows]
    for row, c in zip(rows, classes, strict=True):
        row["label"] = names[c]
    with open(folder / SUGGESTED_LABELS, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return classes


def arm_figures(rows: list[dict], best_round: int) -> dict:
    """Test top-1 and the worst class's test top-1 of round 0 and of the chosen round."""

    def worst(m: dict) -> float:
        return min(v for v in m["per_class_top1"] if v is not None)

    return {
        "test_top1": [m["test_top1"] for m in rows],
        "worst_class_top1": [worst(m) for m in rows],
        "best_round": best_round,
        "round0_test_top1": rows[0]["test_top1"],
        "round0_worst_class_top1": worst(rows[0]),
        "chosen_test_top1": rows[best_round]["test_top1"],
        "chosen_worst_class_top1": worst(rows[best_round]),
    }


def run(cfg, name: str) -> tuple[list[dict], int, Path]:
    with one_line_errors():
        rows = run_pipeline(cfg, name, progress=False)
    folder = Path(run_folder(cfg, name))
    return rows, read_json(RunLayout(folder).status)["stop"]["best_round"], folder


def _cli(argv: list[str]) -> None:
    from pipeline.cli import main as cli

    if cli(argv) != 0:
        raise SystemExit(f"error: python -m pipeline {' '.join(argv)} failed")


def one_seed(args, seed: int, work: Path) -> dict:
    """The base run, both arms' folders and runs for one seed."""
    base_cfg = load_prepared(args.config, [*args.overrides, f"seed={seed}", f"rounds={args.base_rounds}"])
    truth = pool_truth(base_cfg)
    if truth is None:
        raise SystemExit("error: bench/suggest.py needs a config with data.prepare_digits (the truth of the pool)")
    _, _, base_dir = run(base_cfg, f"{args.base_runs or args.name + '-base'}-s{seed}")
    names = base_cfg.data.classes or [str(c) for c in range(base_cfg.data.num_classes)]
    encoder = Path(RunLayout(base_dir).round(0).encoder)
    start = []
    if encoder.is_file():  # the base run's recipe (run.json: pretrain.then), from its encoder, without pretraining
        then = read_json(RunLayout(base_dir).status)["pretrain"]["then"]
        start = [f"teacher.init={encoder}", "pretrain.enabled=off", f"select.mode={then['select_mode']}"]
        start += [f"select.align={then['select_align']}", f"pretrain.init_students={then['students_from_encoder']}"]
    out: dict = {"seed": seed, "base_run": base_dir.name}
    for arm in ARMS:
        folder = work / f"s{seed}-{arm}"
        if not (folder / SUGGESTED_LABELS).is_file():
            if arm == "suggested":
                argv = ["suggest-labels", str(base_dir), "--n", str(args.n), "--out", str(folder), "--no-progress"]
                _cli(argv)
            else:
                random_folder(base_cfg, args.n, seed, folder, work / f"s{seed}-suggested" / CLASSES)
        classes = label_from_truth(folder, truth, names)
        added = folder / "shards"
        argv = ["prepare-folder", "--csv", str(folder / SUGGESTED_LABELS), "--labeled-only"]
        _cli([*argv, "--classes", str(folder / CLASSES), "--out", str(added), "--no-progress"])
        labeled = [*base_cfg.data.labeled, str(added / "labeled" / "*.tar")]
        overrides = [*args.overrides, f"seed={seed}", f"rounds={args.rounds}", f"data.labeled={labeled}", *start]
        rows, best, _ = run(load_prepared(args.config, overrides), f"{args.name}-{arm}-s{seed}")
        out[arm] = {"labels_per_class": np.bincount(classes, minlength=len(names)).tolist()}
        out[arm] |= arm_figures(rows, best)
        print(
            f"seed {seed} {arm:>9}: test {_pct(out[arm]['round0_test_top1'])} -> {_pct(out[arm]['chosen_test_top1'])}"
            f" (round {best}), worst class {_pct(out[arm]['round0_worst_class_top1'])} -> "
            f"{_pct(out[arm]['chosen_worst_class_top1'])}; labels per class {out[arm]['labels_per_class']}",
            flush=True,
        )
    return out


def _pct(v: float) -> str:
    return f"{v * 100:.2f}"


def gains(per_seed: list[dict]) -> dict:
    """``suggested`` minus ``random`` per figure: mean and sample std over seeds, and each arm's mean."""
    out = {}
    for figure in FIGURES:
        diff = [s["suggested"][figure] - s["random"][figure] for s in per_seed]
        out[figure] = {
            **{f"{arm}_mean": float(np.mean([s[arm][figure] for s in per_seed])) for arm in ARMS},
            "gain_mean": float(np.mean(diff)),
            "gain_std": float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits-hard.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..S-1 (default 3)")
    parser.add_argument("--n", type=int, default=20, help="images each arm labels (default 20)")
    parser.add_argument("--base-rounds", type=int, default=1, help="student rounds of the base run (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="student rounds of each arm's run (default 1)")
    parser.add_argument("--name", help="run name prefix; the same name resumes (default suggest-<time>)")
    parser.add_argument(
        "--base-runs",
        help="use the runs <BASE_RUNS>-s<seed> as the base runs (e.g. bench/seeds.py's of the same config; resumed "
        "to --base-rounds, so finished ones cost nothing) instead of <NAME>-base-s<seed>",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_result_args(parser)
    args = parser.parse_args()
    args.name = args.name or f"suggest-{time.strftime('%Y%m%d-%H%M%S')}"
    work = ROOT / "runs" / f"{args.name}-folders"
    start = time.perf_counter()
    per_seed = [one_seed(args, seed, work) for seed in range(args.seeds)]
    summary = gains(per_seed)
    print(f"{args.seeds} seeds, {args.n} labels per arm; suggested - random, mean ± std over seeds (points):")
    for figure, g in summary.items():
        print(
            f"  {figure:>24}: suggested {_pct(g['suggested_mean'])}, random {_pct(g['random_mean'])}, "
            f"gain {g['gain_mean'] * 100:+.2f} ± {g['gain_std'] * 100:.2f}"
        )
    result = {
        "bench": "suggest",
        "config": args.config,
        "overrides": args.overrides,
        "n": args.n,
        "base_rounds": args.base_rounds,
        "base_runs": [s["base_run"] for s in per_seed],
        "rounds": args.rounds,
        "seeds": per_seed,
        "gains": summary,
        "suggested_beat_random_on_worst_class": bool(summary["chosen_worst_class_top1"]["gain_mean"] > 0),
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_result(result, "suggest", args)


if __name__ == "__main__":
    main()
