"""The round loop S times with different run seeds: per-round test and validation top-1 as mean ± std, min, max.

    python bench/seeds.py --config configs/digits.yaml --seeds 3 [--rounds R] [--base-seed 0] [--name NAME]
                          [--set key=value ...] [--peers] [--results DIR]

Run ``i`` uses run seed ``base_seed + i`` (every round's own seeds derive from it, ``stages/stopping.round_seed``);
the data split, validation included, stays fixed. Runs are ordinary runs under the config's storage, named
``<NAME>-s<seed>``: re-running with the same ``--name`` resumes them. They run where the config says
(``resources.executor``; the digits default, ``auto``, keeps them in this process) and ``executors`` in the JSON says
where each one ran, as its ``run.json`` records it. ``--peers`` adds scikit-learn's peers on the digits split, each
chosen on validation (``bench/peers.py``), and checks the last round's test mean against them.

Prints a per-round table, then one JSON line ``{"bench": "seeds", "seeds": [...], "test_top1_mean": [...],
"test_top1_std": [...], "val_top1_mean": [...], ...}`` (lists: one entry per round) that is also written, with the
machine's facts (CPU, cores, load, torch/ray versions, date, git commit), to ``bench/results/seeds-<date>.json``
(``--results DIR``: elsewhere, e.g. for a smoke run).
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_common import load_prepared, machine_facts, one_line_errors  # noqa: E402
from pipeline.plan import run_folder  # noqa: E402
from pipeline.rounds import run_pipeline  # noqa: E402
from stages.storage.files import read_json  # noqa: E402
from stages.storage.layout import RunLayout  # noqa: E402

METRICS = ("test_top1", "val_top1", "corruption_top1")
EXTRA = ("worst_class_top1", "pseudo_label_accuracy")  # in the JSON: the lowest per-class test top-1, and the
# round's pseudo-labels' accuracy against the truth the digits' unlabeled shards carry (students only)


def per_round(runs: list[list[dict]]) -> dict:
    """Mean, sample std (ddof=1; 0 for a single run), min and max per round of each metric over the runs that reached
    the round."""
    rounds = max(len(rows) for rows in runs)
    out: dict = {"rounds": list(range(rounds)), "runs_per_round": []}
    for r in range(rounds):
        reached = [rows[r] for rows in runs if len(rows) > r]
        out["runs_per_round"].append(len(reached))
        for metric in METRICS + EXTRA:
            values = [_value(m, metric) for m in reached]
            values = [v for v in values if v is not None]
            for stat, fn in (("mean", np.mean), ("std", _sample_std), ("min", np.min), ("max", np.max)):
                out.setdefault(f"{metric}_{stat}", []).append(float(fn(values)) if values else None)
    return out


def _sample_std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _value(m: dict, metric: str) -> float | None:
    if metric == "worst_class_top1":
        known = [v for v in m.get("per_class_top1") or [] if v is not None]
        return min(known) if known else None
    value = m.get(metric)
    return value.get("mean") if isinstance(value, dict) else value


def pool_truth(cfg) -> np.ndarray | None:
    """The true class of each unlabeled digits image (row ``i`` = key ``unlabeled-<i>``), as ``prepare-digits``
    split them (``data.prepare_labeled_per_class``); None when the config does not use the built-in digits."""
    if not cfg.data.prepare_digits:
        return None
    from stages.data.digits import split_digits

    return split_digits(0, labeled_per_class=cfg.data.prepare_labeled_per_class).unlabeled_y


def pseudo_label_accuracy(run: RunLayout, metrics: dict, truth: np.ndarray) -> float | None:
    """The share of the unlabeled pool round ``metrics["round"]``'s teacher labeled right (its argmax ``label``),
    from the round's pseudo-label sidecars."""
    from stages.storage.files import read_table

    paths = sorted(Path(run.round(metrics["round"]).pseudo_labels).glob("*.parquet"))
    if not paths:
        return None
    keys, labels = [], []
    for path in paths:
        table = read_table(str(path), columns=["key", "label"])
        keys += table.column("key").to_pylist()
        labels += table.column("label").to_pylist()
    rows = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    return float((np.asarray(labels) == truth[rows]).mean())


def write_results(bench: str, payload: dict, folder: Path = ROOT / "bench" / "results") -> Path:
    """``<folder>/<bench>-<date>.json`` (a second one the same day gets the time too), written atomically."""
    from stages.storage.files import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench}-{time.strftime('%Y-%m-%d')}.json"
    if path.exists():
        path = folder / f"{bench}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    atomic_write_json(path, payload)
    return path


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def print_table(stats: dict, seeds: list[int], runs: list[list[dict]]) -> None:
    print(f"{len(seeds)} seeds {seeds}; top-1 in % (mean ± std [min, max] over the runs that reached the round)")
    print(f"{'round':>5}  {'n':>2}  {'test':>24}  {'val':>24}  {'corrupted test (mean)':>24}")
    for r in stats["rounds"]:
        cells = [
            f"{_pct(stats[f'{m}_mean'][r])} ± {_pct(stats[f'{m}_std'][r])} "
            f"[{_pct(stats[f'{m}_min'][r])}, {_pct(stats[f'{m}_max'][r])}]"
            for m in METRICS
        ]
        print(f"{r:>5}  {stats['runs_per_round'][r]:>2}  " + "  ".join(f"{c:>24}" for c in cells))
    for seed, rows in zip(seeds, runs, strict=True):
        print(f"seed {seed}: test " + " -> ".join(_pct(m["test_top1"]) for m in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="how many runs (default 3)")
    parser.add_argument("--base-seed", type=int, default=0, help="run i gets seed base + i (default 0)")
    parser.add_argument("--rounds", type=int, help="student rounds (default: the config's)")
    parser.add_argument("--name", help="run name prefix; the same name resumes (default seeds-<time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--peers", action="store_true", help="add scikit-learn's peers chosen on validation (digits)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the JSON is written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.name or f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    seeds = [args.base_seed + i for i in range(args.seeds)]
    before = machine_facts()
    start = time.perf_counter()
    runs, names, executors, stops = [], [], [], []
    for seed in seeds:
        overrides = [*args.overrides, f"seed={seed}"] + ([f"rounds={args.rounds}"] if args.rounds is not None else [])
        cfg = load_prepared(args.config, overrides)
        names.append(f"{name}-s{seed}")
        t = time.perf_counter()
        with one_line_errors():
            runs.append(run_pipeline(cfg, names[-1], progress=False))
        truth = pool_truth(cfg)
        for m in runs[-1]:  # the digits' unlabeled shards carry no labels: the split that wrote them knows them
            if m.get("pseudo_label_accuracy") is None and truth is not None and m["round"] > 0:
                m["pseudo_label_accuracy"] = pseudo_label_accuracy(RunLayout(run_folder(cfg, names[-1])), m, truth)
        status = read_json(RunLayout(run_folder(cfg, names[-1])).status)
        executors.append(status.get("executor"))
        stops.append(status["stop"])
        print(f"seed {seed}: {len(runs[-1])} rounds in {time.perf_counter() - t:.0f} s (run {names[-1]})", flush=True)
    stats = per_round(runs)
    print_table(stats, seeds, runs)
    last = [rows[-1]["test_top1"] for rows in runs]
    chosen = [rows[stop["best_round"]]["test_top1"] for rows, stop in zip(runs, stops, strict=True)]
    print(
        f"test top-1 of the round each run chose ({stops[0]['best_by']}): {_pct(np.mean(chosen))} ± "
        f"{_pct(_sample_std(chosen))}; of the last round: {_pct(np.mean(last))} ± {_pct(_sample_std(last))}"
    )
    result = {
        "bench": "seeds",
        "setting": Path(args.config).stem,  # one row per config in the README's table
        "config": args.config,
        "overrides": args.overrides,
        "seeds": seeds,
        "runs": names,
        "executors": executors,
        **stats,
        "last_round_above_round_0": [rows[-1]["test_top1"] > rows[0]["test_top1"] for rows in runs],
        "best_round": [stop["best_round"] for stop in stops],  # as run.json records it: what `download` takes
        "best_by": [stop["best_by"] for stop in stops],
        "chosen_round_test_top1_mean": float(np.mean(chosen)),
        "chosen_round_test_top1_std": _sample_std(chosen),
        "last_round_test_top1_mean": float(np.mean(last)),
        "last_round_test_top1_std": _sample_std(last),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": before | {"load_avg_1m_end": os.getloadavg()[0]},
    }
    if args.peers:
        from bench.peers import peer_scores, select_on_validation

        selected = select_on_validation(peer_scores(labeled_per_class=cfg.data.prepare_labeled_per_class or None))
        result["peers_selected_on_val"] = selected
        best_peer = max(p["test_top1"] for p in selected.values())
        result["last_round_test_mean_above_every_peer"] = bool(np.mean(last) > best_peer)
        result["chosen_round_test_mean_minus_best_peer"] = float(np.mean(chosen) - best_peer)
    print(f"results: {write_results('seeds', result, args.results)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
