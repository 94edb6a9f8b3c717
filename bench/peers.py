"""scikit-learn's semi-supervised peers on exactly the pipeline's digits split, each setting chosen on validation.

    python bench/peers.py [--run runs/<run>]

Peers see the same 100 labeled + 1,237 unlabeled images (features: pixels / 255). Each peer family has a small grid;
the setting with the best validation top-1 (the 100 images of ``data/digits/val``, ties to the first in the grid) is
the family's pick, and only then is its test top-1 (360 images) read: test never chooses, as in the pipeline. Every
setting's validation and test figures are printed too. Prints a table, then one JSON line ``{"bench": "peers", ...}``
with ``selected`` (family -> setting, val, test) and ``best_peer_test_top1`` (the family chosen on validation).
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import add_result_args, save_result  # noqa: E402

from stages.data.digits import split_digits  # noqa: E402
from stages.storage.layout import RunLayout  # noqa: E402


def peer_grid(seed: int = 0, per_class: int = 10) -> dict[str, dict[str, object]]:
    """Family -> {setting name: unfitted estimator}."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
    from sklearn.svm import SVC

    # SVC(probability=True) is deprecated in scikit-learn 1.9; its replacement is this calibrated SVC. Its folds
    # need as many labeled images per class (digits-hard has 2), and self-training one fold at the least.
    folds = min(3, per_class)
    calibrated = CalibratedClassifierCV(SVC(gamma="scale", random_state=seed), ensemble=False, cv=folds)
    self_training = {
        f"SelfTrainingClassifier(SVC, threshold={t})": SelfTrainingClassifier(calibrated, threshold=t)
        for t in (0.75, 0.9, 0.95)
    }
    return {
        "LabelSpreading(knn)": {
            f"LabelSpreading(knn, k={k})": LabelSpreading(kernel="knn", n_neighbors=k, max_iter=1000)
            for k in (3, 5, 7, 10)
        },
        "LabelSpreading(rbf)": {
            f"LabelSpreading(rbf, gamma={g})": LabelSpreading(kernel="rbf", gamma=g, max_iter=1000)
            for g in (0.5, 1.0, 2.0, 5.0)
        },
        **({"SelfTrainingClassifier(SVC)": self_training} if folds >= 2 else {}),
        "SVC (labeled only)": {f"SVC (labeled only, C={c})": SVC(gamma="scale", C=c) for c in (1.0, 10.0)},
    }


def peer_scores(seed: int = 0, labeled_per_class: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Family -> setting -> {"val_top1", "test_top1"}, on ``split_digits(seed, labeled_per_class)`` (None: the
    default's 10 a class; digits-hard: 2)."""
    s = split_digits(seed) if labeled_per_class is None else split_digits(seed, labeled_per_class=labeled_per_class)
    x = np.concatenate([s.labeled_x, s.unlabeled_x]).reshape(-1, 64) / 255.0
    y = np.concatenate([s.labeled_y, -np.ones(len(s.unlabeled_x), dtype=np.int64)])
    x_val, x_test = s.val_x.reshape(-1, 64) / 255.0, s.test_x.reshape(-1, 64) / 255.0
    scores: dict[str, dict[str, dict[str, float]]] = {}
    per_class = 10 if labeled_per_class is None else labeled_per_class
    for family, settings in peer_grid(seed, per_class).items():
        scores[family] = {}
        for name, model in settings.items():
            fit_x, fit_y = (x[: len(s.labeled_y)], s.labeled_y) if "labeled only" in name else (x, y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # LabelSpreading divides by zero on isolated points
                model.fit(fit_x, fit_y)
                scores[family][name] = {
                    "val_top1": float((model.predict(x_val) == s.val_y).mean()),
                    "test_top1": float((model.predict(x_test) == s.test_y).mean()),
                }
    return scores


def select_on_validation(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict]:
    """Family -> its setting with the best validation top-1 (the first in the grid on a tie), with both figures."""
    picked = {}
    for family, settings in scores.items():
        name = max(settings, key=lambda n: settings[n]["val_top1"])  # max keeps the first of equals
        picked[family] = {"setting": name, **settings[name]}
    return picked


def pipeline_scores(run_dir: Path) -> dict[str, dict[str, float | None]]:
    run, scores = RunLayout(run_dir), {}
    for r in run.round_indices():
        metrics = run.round(r).metrics
        if not metrics.exists():  # a round still running
            continue
        m = json.loads(metrics.read_text())
        scores[f"pipeline round {m['round']} ({m['model']})"] = {
            "val_top1": m.get("val_top1"),
            "test_top1": m["test_top1"],
        }
    return scores


def _pct(v: float | None) -> str:
    return "   -   " if v is None else f"{v * 100:6.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (runs/<run>) to print beside the peers")
    add_result_args(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    scores = peer_scores()
    selected = select_on_validation(scores)
    ours = pipeline_scores(args.run) if args.run else {}
    rows = [(name, v) for settings in scores.values() for name, v in settings.items()] + list(ours.items())
    width = max(len(name) for name, _ in rows)
    print(f"{'method':<{width}}  val top-1  test top-1  chosen on val")
    chosen = {p["setting"] for p in selected.values()}
    for name, v in rows:
        mark = "<- chosen" if name in chosen else ""
        print(f"{name:<{width}}  {_pct(v['val_top1'])}   {_pct(v['test_top1'])}    {mark}")
    best_family = max(selected, key=lambda f: selected[f]["val_top1"])
    best = selected[best_family]
    print(
        f"\nbest peer by validation: {best['setting']} (val {_pct(best['val_top1'])}, test {_pct(best['test_top1'])})"
    )
    if ours:
        last = list(ours.values())[-1]["test_top1"]
        above = all(last > p["test_top1"] for p in selected.values())
        print(f"last round test {last * 100:.2f}%: {'above' if above else 'NOT above'} every peer chosen on validation")
    save_result(
        {
            "bench": "peers",
            "selected": selected,
            "best_peer": best["setting"],
            "best_peer_test_top1": best["test_top1"],
            "max_selected_peer_test_top1": max(p["test_top1"] for p in selected.values()),
            "scores": scores,
            "pipeline": ours,
            "seconds": round(time.perf_counter() - start, 1),
        },
        "peers",
        args,
    )


if __name__ == "__main__":
    main()
