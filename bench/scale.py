"""One real round of the pipeline on synthetic photo-like JPEG shards of a chosen size: the driver's peak memory,
what the student reads against what it trains on, and each stage's seconds.

    python bench/scale.py --labeled 300 --unlabeled 1000 --test 100 --classes 10 --image-size 32 --no-save  # smoke
    python bench/scale.py --labeled 10000 --unlabeled 100000 --test 5000             # 64 px, 100 classes (default)

Data: ``bench/images.py``'s photo-like JPEGs (a class sets the dominant hue, so a model learns something), labeled
and test with ``.cls``, unlabeled without, each split drawn from its own fixed seed (the data check refuses test
images in the training data). Each split is written once to ``--data/<split>-<n>-<size>px-<classes>c/`` and reused
while its ``<split>-spec.json`` matches (not timed).

Config: ``configs/digits.yaml``'s tree with these shards, RGB at ``--image-size``, ``augment: digits``, one rung
``--model`` for every round, 1 teacher epoch and 1 student epoch (no ``min_steps``/``max_steps``), selection with a
fixed ``select.per_class`` K (``--per-class``, floor 0: a one-epoch teacher is rarely 30% sure) so that the student's
epoch is K x classes samples whatever the unlabeled set's size, no validation split, no corruption scoring
(``robustness.corruptions: []``: it would multiply the evaluate stage by the corruptions x severities), and
``resources.executor: ray`` (what this bench measures is a driver that hands the work to Ray; ``auto`` would keep a
small smoke run in the driver's process); ``--set`` changes any key. It is validated by
``pipeline.config.load_config`` and written resolved beside the run.

Run: ``python -m pipeline iterate --config CFG --rounds 1 --run NAME`` (round 0 teacher, round 1 student) in a fresh
process, timed by ``bench/e2e.py``'s ``timed_process``, its storage in a temporary folder. A thread samples that
process's RSS every 0.25 s (psutil, the driver process alone: Ray's raylet and workers are other processes) for
``driver_peak_rss_mb``; ``driver_peak_shared_mb`` is the largest shared part of it seen (object-store pages and
mapped libraries).

Figures: ``stage_seconds`` from ``run.json`` and the log (``bench/e2e.py``'s ``pipeline_split``): start-up to a
running Ray (imports, config, the preflight's checks of storage, shards and models, ``ray.init``), the rest of the
preflight (scanning the labeled and test splits) and the data check, each stage, the time between stages and after
the last; ``executor`` is where the run's work ran, as its ``run.json`` records it. ``student_bytes_ratio`` = bytes
the student epoch read from the unlabeled shards / bytes of the pseudo-labeled samples it trained on (each copy
counted), from ``round-001/train_metrics.jsonl`` (tar payload bytes, counted by ``stages/data/loader.py``); ``bytes``
holds every count and ratio, labeled and pseudo apart, teacher and student. Final line ``{"bench": "scale", ...}``,
saved to ``--results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == BENCH:
    sys.path.pop(0)
sys.path.append(str(BENCH))  # this folder last: bench/select.py must not shadow the stdlib select module
sys.path.insert(0, str(BENCH.parent))  # this tree's packages first

import argparse
import json
import os
import subprocess
import tarfile
import tempfile
import threading
import time

import psutil
import yaml
from bench_common import add_result_args, save_result
from e2e import ROOT, pipeline_split, timed_process
from images import make_shards

sys.path.insert(0, str(ROOT))  # again: e2e.py and images.py each move the first path entry last

from pipeline.config import dump_config, load_config
from stages.data.loader import BYTE_COUNTS
from stages.storage.layout import RunLayout
from stages.train import read_metrics_lines

SEEDS = {"labeled": 1, "unlabeled": 2, "test": 3}  # one per split: no image is drawn twice
SPLITS = tuple(SEEDS)


def ensure_shards(root: Path, sizes: dict[str, int], image_size: int, classes: int, per_shard: int) -> dict:
    """The shards of each split, written unless ``root/<split>-<n>-<size>px-<classes>c/`` already holds them;
    ``{split: [paths]}``."""
    shards = {}
    for split in SPLITS:
        folder = root / f"{split}-{sizes[split]}-{image_size}px-{classes}c"
        shards[split] = make_shards(
            folder,
            sizes[split],
            image_size,
            "jpeg",
            labels=split != "unlabeled",
            per_shard=per_shard,
            classes=classes,
            seed=SEEDS[split],
            prefix=split,
        )
    return shards


def scale_tree(shards: dict, storage: Path, image_size: int, classes: int, model: str, per_class: int) -> dict:
    """``configs/digits.yaml``'s tree made into the bench's one-round run (see the module docstring)."""
    tree = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    tree.update(name="scale", storage=str(storage), rounds=1)
    tree["data"].update(
        labeled=shards["labeled"],
        unlabeled=shards["unlabeled"],
        test=shards["test"],
        val=[],
        val_per_class=0,
        num_classes=classes,
        channels=3,
        image_size=image_size,
        mean=[],  # 0.5 per channel
        std=[],
        augment="digits",
        prepare_digits="",
    )
    tree["ladder"] = [{"model": model, "drop_rate": 0.2, "drop_path_rate": 0.05, "randaug_n": 2, "randaug_m": 5}]
    for part in ("teacher", "student"):
        tree[part].update(epochs=1, min_steps=0, max_steps=0, checkpoint_every=1)
    tree["select"].update(per_class=per_class, floor=0.0)
    tree["robustness"]["corruptions"] = []
    tree["resources"]["executor"] = "ray"
    return tree


def write_config(tree: dict, overrides: list[str], path: Path) -> Path:
    """Validate ``tree`` with ``overrides`` (``load_config``) and write it resolved to ``path``."""
    cfg = load_config(None, overrides, base=tree)
    if cfg.rounds != 1:
        raise SystemExit("--set rounds: this bench runs one round")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


class DriverRss:
    """Peak RSS of one process, sampled in a thread every ``interval`` seconds until it exits."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self.peak_shared, self.samples = interval, 0, 0, 0
        self._stop, self._thread = threading.Event(), None

    def start(self, proc: subprocess.Popen) -> None:
        self._thread = threading.Thread(target=self._run, args=(psutil.Process(proc.pid),), daemon=True)
        self._thread.start()

    def _run(self, process: psutil.Process) -> None:
        while True:
            try:
                mem = process.memory_info()
            except psutil.Error:  # exited
                return
            self.peak, self.peak_shared = max(self.peak, mem.rss), max(self.peak_shared, mem.shared)
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def tar_payload_bytes(shards: list[str]) -> int:
    """The members' bytes of these tars (what ``stages/data/loader.py`` counts as read), from their headers."""
    total = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            total += sum(info.size for info in tar if info.isreg())
    return total


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def byte_figures(rows: list[dict]) -> dict:
    """One training stage's byte counts (its epochs summed) and the read / trained ratios."""
    counts = {k: sum(int(r.get(k, 0)) for r in rows) for k in BYTE_COUNTS}
    read = counts["labeled_read_bytes"] + counts["pseudo_read_bytes"]
    trained = counts["labeled_trained_bytes"] + counts["pseudo_trained_bytes"]
    return {
        **counts,
        "labeled_ratio": _ratio(counts["labeled_read_bytes"], counts["labeled_trained_bytes"]),
        "pseudo_ratio": _ratio(counts["pseudo_read_bytes"], counts["pseudo_trained_bytes"]),
        "all_ratio": _ratio(read, trained),
    }


STAGE_NAMES = {
    "round-000 train": "teacher",
    "round-000 evaluate": "teacher_evaluate",
    "round-001 pseudo_label": "pseudo_label",
    "round-001 select": "select",
    "round-001 train": "student",
    "round-001 evaluate": "evaluate",
}
SPLIT_NAMES = {
    "start-up to a running Ray": "startup_preflight_ray",
    "start-up to the in-process executor": "startup_preflight",
    "data check, run folder": "data_check",
    "between stages (manifests, run.json, report per round)": "between_stages",
    "after the last stage (report, shutdown)": "after_last_stage",
}


def read_run(run_dir: Path, wall: float, lines: list[tuple[float, str]]) -> dict:
    """Stage seconds, byte counts, selection and top-1 from the finished run folder and its log."""
    run = RunLayout(run_dir)
    status = json.loads(run.status.read_text())
    stages, split = pipeline_split(wall, lines, status["rounds"])
    stage_seconds = {SPLIT_NAMES.get(k, k): v for k, v in split.items()}
    stage_seconds.update({STAGE_NAMES.get(k, k): round(v, 2) for k, v in stages.items()})
    rows = {r: read_metrics_lines(run.round(r).train_metrics.read_text()) for r in (0, 1)}
    manifest = json.loads(run.round(1).manifest.read_text())
    select = manifest["stages"]["select"]["result"]
    return {
        "executor": status.get("executor"),
        "stage_seconds": stage_seconds,
        "teacher_bytes": byte_figures(rows[0]),
        "student_bytes": byte_figures(rows[1]),
        "student_epoch_seconds": round(sum(r["seconds"] for r in rows[1]), 2),
        "student_steps": rows[1][-1]["step"],
        "selection": {k: select.get(k) for k in ("rows_in", "kept", "copies_out")},
        "top1": [json.loads(run.round(r).metrics.read_text())["test_top1"] for r in (0, 1)],
    }


def run_round(config: Path, storage: Path, name: str) -> tuple[float, list[tuple[float, str]], DriverRss]:
    cmd = [sys.executable, "-m", "pipeline", "iterate", "--config", str(config), "--rounds", "1", "--run", name]
    cmd += ["--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    rss = DriverRss()
    try:
        wall, _, lines = timed_process(cmd, env, started=rss.start)
    finally:
        rss.stop()
    return wall, lines, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labeled", type=int, required=True, help="labeled images")
    parser.add_argument("--unlabeled", type=int, required=True, help="unlabeled images")
    parser.add_argument("--test", type=int, required=True, help="test images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--per-class", type=int, default=10, help="select.per_class K (default 10)")
    parser.add_argument("--model", default="resnet10t", help="timm model of every round (default resnet10t)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/scale-data"), help="shard cache (default %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_result_args(parser)
    args = parser.parse_args()
    sizes = {"labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test}
    start = time.perf_counter()
    shards = ensure_shards(args.data, sizes, args.image_size, args.classes, args.per_shard)
    print(f"data: {sum(map(len, shards.values()))} shards in {time.perf_counter() - start:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        storage = Path(tmp) / "runs"
        tree = scale_tree(shards, storage, args.image_size, args.classes, args.model, args.per_class)
        config = write_config(tree, args.overrides, Path(tmp) / "scale.yaml")
        name = f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
        wall, lines, rss = run_round(config, storage, name)
        run = read_run(storage / name, wall, lines)
    student = run["student_bytes"]
    result = {
        "bench": "scale",
        "setting": f"cpu {args.model} {args.image_size}px {args.classes} classes {args.labeled}/{args.unlabeled}/"
        f"{args.test} K={args.per_class}" + "".join(f" {s}" for s in args.overrides),
        **sizes,
        "image_size": args.image_size,
        "classes": args.classes,
        "per_class": args.per_class,
        "model": args.model,
        "overrides": args.overrides,
        "seconds": round(wall, 1),
        "driver_peak_rss_mb": round(rss.peak / 2**20, 1),
        "driver_peak_shared_mb": round(rss.peak_shared / 2**20, 1),
        "rss_samples": rss.samples,
        "student_bytes_ratio": student["pseudo_ratio"],  # pseudo bytes read / pseudo bytes trained on
        "unlabeled_payload_bytes": tar_payload_bytes(shards["unlabeled"]),
        "shard_file_bytes": {s: sum(os.path.getsize(p) for p in shards[s]) for s in SPLITS},
        **run,
    }
    result["student_unlabeled_passes"] = _ratio(student["pseudo_read_bytes"], result["unlabeled_payload_bytes"])
    save_result(result, "scale", args)


if __name__ == "__main__":
    main()
