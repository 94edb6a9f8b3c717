"""scikit-learn's semi-supervised peers on exactly the pipeline's digits split, beside the pipeline's rounds.

    python bench/peers.py --run runs/<run>

Peers see the same 100 labeled + 1,337 unlabeled images (features: pixels / 255) and the same 360 test images.
Prints a table, then one JSON line ``{"bench": "peers", ...}``, also saved to ``bench/results/`` (``--no-save``).
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

from stages.digits import split_digits  # noqa: E402


def peer_scores(seed: int = 0) -> dict[str, float]:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
    from sklearn.svm import SVC

    s = split_digits(seed)
    x = np.concatenate([s.labeled_x, s.unlabeled_x]).reshape(-1, 64) / 255.0
    y = np.concatenate([s.labeled_y, -np.ones(len(s.unlabeled_x), dtype=np.int64)])
    x_test = s.test_x.reshape(-1, 64) / 255.0
    # A small grid per peer, every setting reported, so that the comparison is with the peers' best.
    peers = {
        f"LabelSpreading(knn, k={k})": LabelSpreading(kernel="knn", n_neighbors=k, max_iter=1000) for k in (5, 7, 10)
    }
    peers |= {
        f"LabelSpreading(rbf, gamma={g})": LabelSpreading(kernel="rbf", gamma=g, max_iter=1000) for g in (1.0, 2.0, 5.0)
    }
    # SVC(probability=True) is deprecated in scikit-learn 1.9; its replacement is this calibrated SVC.
    calibrated = CalibratedClassifierCV(SVC(gamma="scale", random_state=seed), ensemble=False, cv=3)
    peers |= {
        f"SelfTrainingClassifier(SVC, threshold={t})": SelfTrainingClassifier(calibrated, threshold=t)
        for t in (0.75, 0.9)
    }
    peers["SVC (labeled only)"] = SVC(gamma="scale")
    scores = {}
    for name, model in peers.items():
        fit_x, fit_y = (x[: len(s.labeled_y)], s.labeled_y) if "labeled only" in name else (x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # LabelSpreading divides by zero on isolated points
            model.fit(fit_x, fit_y)
            scores[name] = float((model.predict(x_test) == s.test_y).mean())
    return scores


def pipeline_scores(run_dir: Path) -> dict[str, float]:
    scores = {}
    for metrics in sorted(run_dir.glob("round-*/metrics.json")):
        m = json.loads(metrics.read_text())
        scores[f"pipeline round {m['round']} ({m['model']})"] = m["test_top1"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (runs/<run>) to print beside the peers")
    add_result_args(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    peers = peer_scores()
    ours = pipeline_scores(args.run) if args.run else {}
    width = max(len(k) for k in [*peers, *ours])
    print(f"{'method':<{width}}  test top-1 (360 images)")
    for name, score in [*peers.items(), *ours.items()]:
        print(f"{name:<{width}}  {score * 100:6.2f}%")
    if ours:
        best_peer = max(peers.values())
        last = list(ours.values())[-1]
        print(
            f"\nlast round {last * 100:.2f}% vs best peer {best_peer * 100:.2f}%: "
            f"{'above' if last > best_peer else 'NOT above'} every peer"
        )
    result = {"bench": "peers", "setting": "digits split, seed 0", "peers": peers, "pipeline": ours}
    save_result(result | {"seconds": round(time.perf_counter() - start, 1)}, "peers", args)


if __name__ == "__main__":
    main()
