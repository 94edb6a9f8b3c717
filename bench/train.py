"""Training throughput: the real Ray Train stage against a hand-written DataLoader loop, and the bare step.

    python bench/train.py --repeat 3                      # teacher path: labeled shards only
    python bench/train.py --student --repeat 3            # student path: labeled + selected pseudo-labeled shards
    python bench/train.py --student --steps 20 --no-save  # a smoke run
    python bench/train.py --gpu --student --model resnet50 --image-size 224 --batch 256 --loader-workers 6

Same model (``--model``, default ``resnet18``, 10 classes), input (photo-like ``--image-size`` px ``--encode``
shards from ``bench/images.py``), step batch (``--batch``), optimizer (AdamW), loss, noise (RandAugment n2 m9,
dropout 0.2, drop path 0.1), torch threads and DataLoader workers in both:

- ``stage``: ``stages.train.train_model`` through Ray Train (``RayExecutor.fit``, as the train stage calls it on the
  Ray executor, set here whatever ``choose_executor`` would pick), one worker; images/s is the steady-state rate the
  worker measures over its epochs (the first, with DataLoader start-up, excluded), ``stage_wall_s`` the whole
  ``fit()`` with Ray Train's start-up;
- ``loop``: webdataset + torch DataLoader (``bench/train_loops.py``), the same steps, as many warm-up steps skipped;
- ``bare``: forward + backward + step on tensors already in memory.

The recipe is a config (``bench_tree``, validated by ``pipeline.config.load_config``) and the stage's plan is the
pipeline's (``pipeline.plan.plan_for``: round 0's for the teacher path, round 1's for the student path), so the
stage trains what the round loop would; the loop and the bare step take the same plan's model and recipe.

``--student`` measures the student path: an untimed preparation trains a small teacher (``resnet10t``, 2 epochs,
in-process) on the labeled shards, labels the unlabeled shards with the real stage code (``label_shards`` writing
its sidecars, in this process) and runs the real selection (``select_shards``: balanced, floor 0 so that every class
is either cut to K or duplicated up to it, soft labels, writing the compact training shards); the stage then trains
on those (``TrainPlan.pseudo``) and the loop reads the same selection files (key, copies, soft probabilities) beside
the unlabeled shards, ``batch / 4`` labeled + ``3 batch / 4`` pseudo-labeled per step.

``--repeat N`` runs N pairs of loop and stage, the loop first in even pairs and second in odd ones: ``ratio`` is the
median of the pairs' ratios (this machine drifts by 10-20% between minutes, more than the difference measured).
``--gpu`` puts all three on the GPU with bf16 autocast and channels_last, as the stage does there. Final line
``{"bench": "train", ...}``, saved to ``bench/results/`` (``train-*.json``, ``train_student-*.json``).
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Accel, add_result_args, fit_in_process, save_result, save_round_model  # noqa: E402
from images import ENCODINGS, make_shards  # noqa: E402
from train_loops import bare_steps, hand_loop  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.plan import plan_for  # noqa: E402
from stages.storage.layout import TRAIN_METRICS, RunLayout  # noqa: E402
from stages.train import TrainConfig, TrainPlan, read_metrics_lines  # noqa: E402

CLASSES, PER_EPOCH, RATIO = 10, 20, 3.0  # PER_EPOCH: steps per epoch the data is sized for
MEAN = STD = (0.5, 0.5, 0.5)


def recipe(args, epochs: int) -> dict:
    """The bench's training recipe (the teacher's and the students'): AdamW at 1e-3 without warmup, ``--batch``
    images per step (student: a quarter labeled), one checkpoint, at the end."""
    return {
        "epochs": epochs,
        "batch_size": args.batch // (1 + int(RATIO)) if args.student else args.batch,
        "unlabeled_ratio": RATIO,
        "optimizer": "adamw",
        "lr": 1e-3,
        "warmup_epochs": 0,
        "loader_workers": args.loader_workers,
        "checkpoint_every": epochs,
        "label_smoothing": 0.1,
    }


def bench_tree(args, labeled: list[str], unlabeled: list[str], epochs: int) -> dict:
    """The bench's run as a config tree: ``--model`` with dropout 0.2, drop path 0.1 and RandAugment n2 m9 at
    ``--image-size``, 10 classes, mean and std 0.5, ``recipe`` for the teacher and the students."""
    return {
        "data": {
            "labeled": labeled,
            "unlabeled": unlabeled or labeled,  # a config names every split; a training plan reads neither of these
            "test": labeled,
            "num_classes": CLASSES,
            "channels": 3,
            "image_size": args.image_size,
            "mean": list(MEAN),
            "std": list(STD),
        },
        "ladder": [{"model": args.model, "drop_rate": 0.2, "drop_path_rate": 0.1, "randaug_n": 2, "randaug_m": 9}],
        "teacher": recipe(args, epochs),
        "student": recipe(args, epochs),
        "resources": {"torch_threads": args.threads},
    }


def bench_plan(args, data: dict, count: int, epochs: int, pseudo=(), pseudo_count: int = 0) -> TrainPlan:
    """The stage's plan for the bench's run: round 1's (a student's) with ``--student``, else round 0's."""
    cfg = load_config(None, base=bench_tree(args, data["labeled"], data["unlabeled"], epochs))
    return plan_for(cfg, int(args.student), data["labeled"], count, pseudo=tuple(pseudo), pseudo_count=pseudo_count)


def fit_teacher(args, root: Path, labeled: list[str], count: int, device: str) -> Path:
    """A quickly trained ``resnet10t`` (2 epochs, in-process), saved as round 0's model folder under ``root``."""
    teacher = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0, "checkpoint_every": 2}
    tree = bench_tree(args, labeled, [], 2) | {"ladder": [{"model": "resnet10t"}], "teacher": teacher, "resources": {}}
    cfg = load_config(None, base=tree)
    plan = plan_for(cfg, 0, labeled, count, metrics_path=str(root / "teacher-train" / TRAIN_METRICS))
    weights, _ = fit_in_process(plan, root / "teacher-train", device)
    teacher = RunLayout(root).round(0).dir
    save_round_model(weights, cfg, 0, teacher)
    return teacher


def prepare_student(args, root: Path, labeled: list[str], count: int, unlabeled: list[str], device: str) -> dict:
    """Teacher, pseudo-label sidecars and selection by the real stage code, in this process (not timed)."""
    from stages.core.stage import InProcess, LabelResources
    from stages.data.compact import pseudo_sources
    from stages.maths.selection import SelectConfig
    from stages.models.factory import model_sha
    from stages.pseudo_label import PseudoLabelConfig, label_shards
    from stages.select import select_shards
    from stages.storage.layout import ModelFiles

    start = time.perf_counter()
    teacher = fit_teacher(args, root, labeled, count, device)
    layout, executor, sha = RunLayout(root).round(1), InProcess(progress=False), model_sha(ModelFiles(teacher))
    resources = LabelResources()
    label_shards(teacher, sha, unlabeled, layout.pseudo_labels, PseudoLabelConfig(), 3, resources, executor, False)
    sidecars = [layout.pseudo_label(s) for s in unlabeled]
    summary = select_shards(sidecars, layout.selection, CLASSES, SelectConfig(floor=0.0), sha, executor)
    selection = [str(layout.selected(s)) for s in unlabeled]
    pseudo = tuple(pseudo_sources(layout.selection, unlabeled))
    print(
        f"student data: {summary['kept']} of {summary['rows_in']} pseudo-labeled samples kept, {summary['copies_out']}"
        f" copies (K={summary['K']}), per class {summary['per_class_after']} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return {
        "pseudo": pseudo,
        "selection": selection,
        "pseudo_count": int(summary["copies_out"]),
        "summary": {k: summary[k] for k in ("rows_in", "kept", "copies_out", "K", "per_class_after")},
    }


def bench_stage(plan: TrainPlan, root: Path, gpu: bool, name: str) -> tuple[float, float]:
    import functools

    from pipeline.distributed.executor import RayExecutor
    from pipeline.distributed.runtime import init_ray
    from stages.core.stage import TrainResources
    from stages.train import train_model

    init_ray(num_cpus=os.cpu_count())
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    plan = dataclasses.replace(plan, metrics_path=str(root / TRAIN_METRICS))
    train = functools.partial(train_model, plan)
    start = time.perf_counter()
    RayExecutor(progress=False).fit(train, name, root / "ray_train", TrainResources(use_gpu=gpu), root / "final")
    wall = time.perf_counter() - start
    epochs = read_metrics_lines((root / TRAIN_METRICS).read_text())[1:]
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs), wall


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="store_true", help="the student path (pseudo-labeled data mixed in)")
    parser.add_argument("--steps", type=int, default=60, help="steady-state steps timed in each of stage and loop")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="images per step (student: 1/4 labeled, 3/4 pseudo)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--encode", choices=ENCODINGS, default="jpeg")
    parser.add_argument("--gpu", action="store_true", help="all three on the GPU (the stage with use_gpu)")
    parser.add_argument("--repeat", type=int, default=1, help="loop and stage alternated this many times (medians)")
    add_result_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    accel = Accel(args.gpu)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        probe = TrainConfig(**recipe(args, 2))  # the batch sizes, before any shard exists
        labeled_count = 1000 if args.student else PER_EPOCH * probe.batch_size
        labeled = make_shards(root / "labeled", labeled_count, args.image_size, args.encode, labels=True)
        data = {"labeled": labeled, "unlabeled": [], "selection": [], "classes": CLASSES}
        pseudo, pseudo_count, selection = (), 0, None
        if args.student:
            unlabeled = make_shards(root / "unlabeled", PER_EPOCH * probe.pseudo_batch, args.image_size, args.encode)
            prep = prepare_student(args, root, labeled, labeled_count, unlabeled, accel.device.type)
            pseudo, pseudo_count, selection = prep["pseudo"], prep["pseudo_count"], prep["summary"]
            data |= {"unlabeled": unlabeled, "selection": prep["selection"]}
        sizing = bench_plan(args, data, labeled_count, 2, pseudo, pseudo_count)
        per_epoch = sizing.steps_per_epoch(1)  # the stage's steps per epoch on one worker
        epochs = 1 + max(1, -(-args.steps // per_epoch))  # the first epoch is not timed
        plan = bench_plan(args, data, labeled_count, epochs, pseudo, pseudo_count)
        spec, cfg = plan.spec, plan.cfg
        data |= {"size": plan.image_size, "mean": plan.mean, "std": plan.std}
        step_images = cfg.batch_size + (cfg.pseudo_batch if args.student else 0)
        pseudo_rows = cfg.pseudo_batch if args.student else 0
        bare = bare_steps(spec, cfg, CLASSES, args.image_size, pseudo_rows, min(args.steps, 30), accel)
        print(f"bare  {bare:7.0f} img/s on {accel.describe()}", flush=True)
        loops, stages, walls = [], [], []
        for i in range(args.repeat):
            for which in ("loop", "stage") if i % 2 == 0 else ("stage", "loop"):  # alternate who goes first
                if which == "loop":
                    loops.append(hand_loop(spec, cfg, data, (epochs - 1) * per_epoch, per_epoch, accel))
                    print(f"loop  {loops[-1]:7.0f} img/s", flush=True)
                else:
                    stage, wall = bench_stage(plan, root, args.gpu, name=f"bench-{i}")
                    stages.append(stage)
                    walls.append(wall)
                    print(f"stage {stage:7.0f} img/s (fit() wall {wall:.1f} s)", flush=True)
    ratios = [s / lo for s, lo in zip(stages, loops, strict=True)]
    path = "student" if args.student else "teacher"
    result = {
        "bench": "train_student" if args.student else "train",
        "setting": f"{'gpu' if args.gpu else 'cpu'} {args.model} {args.image_size}px {args.encode} {path}",
        "path": path,
        "stage_images_per_s": round(statistics.median(stages), 1),
        "loop_images_per_s": round(statistics.median(loops), 1),
        "bare_images_per_s": round(bare, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ratio_bare": round(statistics.median(stages) / bare, 3),
        "stage_wall_s": round(statistics.median(walls), 1),
        "repeat": args.repeat,
        "steps_timed": (epochs - 1) * per_epoch,
        "step_images": step_images,
        "threads": args.threads,
        "loader_workers": args.loader_workers,
        "model": args.model,
        "image_size": args.image_size,
        "encode": args.encode,
        "selection": selection,
        "device": accel.describe(),
    }
    save_result(result, result["bench"], args)


if __name__ == "__main__":
    main()
