"""Distillation losses against plain Noisy Student: one student round on the digits default, each loss in turn.

    python bench/distill.py [--epochs 5] [--methods kd,at] [--config configs/digits.yaml] [--set key=value ...]

One teacher (round 0 of the config's ladder, ``--teacher-epochs``, default the config's) pseudo-labels the
unlabeled shards (``stages.pseudo_label.label_shards``) and the config's selection runs once
(``stages.select.select_shards``), both in this process; then every method trains the round-1 student from the
same seed (the round's own, ``pipeline.choices.round_seeds``) on the same selected data for ``--epochs`` student
epochs, in this process (the plan from ``pipeline.plan.plan_for``, trained by ``stages.train.train_model`` on the
in-process executor: the pipeline's training stage without Ray), and is evaluated on the test shards. Methods:
``noisy_student`` (no distillation term), one per registered loss (``kd``, ``dml``, ``fitnet``, ``at``, ``sp``,
``fsp``; weights in ``METHODS``, which says why), each beside the offline pseudo-label loss, and ``uncertainty``
(kd + at + sp, weights learned). The teacher, its sidecars and the selection are kept in ``--work`` (default
``runs/bench-distill``, laid out as a run: ``round-000`` the teacher, ``round-001`` its labels and selection) and
reused while the teacher settings are unchanged.

Prints a table of test top-1 per method, then one JSON line ``{"bench": "distill", "teacher_top1": t,
"methods": {name: {"top1": ..., "seconds": ..., "terms": ...}}, ...}``, also saved to ``bench/results/``
(``--no-save`` for smoke runs).
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import add_result_args, fit_in_process, model_top1, save_result, save_round_model  # noqa: E402

from pipeline.cli import ensure_digits  # noqa: E402
from pipeline.config import PipelineConfig, load_config  # noqa: E402
from pipeline.plan import plan_for, select_config  # noqa: E402
from stages.core.stage import InProcess  # noqa: E402
from stages.data.compact import pseudo_sources  # noqa: E402
from stages.data.shards import expand_shards, load_labeled  # noqa: E402
from stages.models.distill import DistillTermConfig, describe, needs_teacher  # noqa: E402
from stages.models.factory import model_sha  # noqa: E402
from stages.pseudo_label import label_shards  # noqa: E402
from stages.select import select_shards  # noqa: E402
from stages.storage.layout import TRAIN_METRICS, RunLayout  # noqa: E402

KD, AT, SP = DistillTermConfig("kd", 1.0, 4.0), DistillTermConfig("at", 100.0), DistillTermConfig("sp", 300.0)
# name: (terms, weighting). Weights put each term near the cross-entropy's size (about 1.5 in a first epoch) with the
# default's trained resnet10t teacher: kd T=4 (Hinton's range; term 1.3), dml 1 (the paper's), fitnet and fsp 1
# (their terms are means: 0.25, 0.41). at and sp at a tenth of their papers' beta=1000 / gamma=3000: at is a mean over
# positions of unit-norm maps, about 16x larger on 16x16 inputs' 8x8-and-smaller maps than on CIFAR's 32x32 ones,
# and the papers' weights made at and sp six times the cross-entropy here (raw terms 0.0098 and 0.0035).
METHODS: dict[str, tuple[tuple[DistillTermConfig, ...], str]] = {
    "noisy_student": ((), "fixed"),
    "kd": ((KD,), "fixed"),
    "dml": ((DistillTermConfig("dml", 1.0),), "fixed"),
    "fitnet": ((DistillTermConfig("fitnet", 1.0),), "fixed"),
    "at": ((AT,), "fixed"),
    "sp": ((SP,), "fixed"),
    "fsp": ((DistillTermConfig("fsp", 1.0),), "fixed"),
    "uncertainty": ((KD, AT, SP), "uncertainty"),
}


def teacher_round(cfg: PipelineConfig, labeled: list[str], count: int, unlabeled: list[str], test, work: Path):
    """Round 0, pseudo-labels and selection, reused from ``work`` while the teacher's settings are the same."""
    run = RunLayout(work)
    teacher, labels = run.round(0), run.round(1)
    parts = [dataclasses.asdict(x) for x in (cfg.data, cfg.spec(0), cfg.teacher, cfg.pseudo_label, cfg.select)]
    key = json.dumps({"layout": 2, "seed": cfg.seed, "parts": parts}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stamp = work / "teacher.json"
    if stamp.exists() and json.loads(stamp.read_text())["digest"] == digest:
        print(f"teacher: reusing {teacher.dir}", flush=True)
        return json.loads(stamp.read_text())
    plan = plan_for(cfg, 0, labeled, count, metrics_path=str(work / "teacher" / TRAIN_METRICS))
    weights, seconds = fit_in_process(plan, work / "teacher")
    save_round_model(weights, cfg, 0, teacher.dir)
    teacher_top1 = model_top1(teacher.dir, test)
    print(f"teacher {cfg.spec(0).model}: {100 * teacher_top1:.2f}% in {seconds:.0f} s", flush=True)
    executor, sha = InProcess(progress=False), model_sha(teacher.model)
    d = cfg.data
    resources = cfg.resources.label()
    label_shards(
        teacher.dir, sha, unlabeled, labels.pseudo_labels, cfg.pseudo_label, d.channels, resources, executor, False
    )
    sidecars = [labels.pseudo_label(s) for s in unlabeled]
    select = select_config(cfg, 1, pretrained=False)  # the round's, as the stage has it (no pretraining here)
    summary = select_shards(sidecars, labels.selection, d.num_classes, select, f"{digest}-{sha[:16]}", executor)
    info = {"digest": digest, "teacher_top1": teacher_top1, "teacher_seconds": seconds}
    info["pseudo_count"] = int(summary["copies_out"])
    stamp.write_text(json.dumps(info))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--epochs", type=int, default=5, help="student epochs per method")
    parser.add_argument("--teacher-epochs", type=int, default=0, help="0 = the config's teacher.epochs")
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--work", default="runs/bench-distill", help="teacher, sidecars, selection, per-method runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_result_args(parser)
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    teacher_epochs = [f"teacher.epochs={args.teacher_epochs}"] if args.teacher_epochs else []
    cfg = load_config(args.config, [*args.overrides, *teacher_epochs])
    ensure_digits(cfg.data.prepare_digits)
    torch.set_num_threads(cfg.resources.torch_threads or os.cpu_count() or 1)
    d, work = cfg.data, Path(args.work).resolve()
    labeled = expand_shards(d.labeled, "data.labeled")
    unlabeled = expand_shards(d.unlabeled, "data.unlabeled")
    count = len(load_labeled(labeled, d.num_classes, d.channels, d.max_bad_fraction, "data.labeled"))
    test = load_labeled(expand_shards(d.test, "data.test"), d.num_classes, d.channels, d.max_bad_fraction, "data.test")
    info = teacher_round(cfg, labeled, count, unlabeled, test, work)
    pseudo = tuple(pseudo_sources(RunLayout(work).round(1).selection, unlabeled))
    results = {}
    for name in methods:
        terms, weighting = METHODS[name]
        online = any(needs_teacher(t.name) for t in terms)
        student_cfg = dataclasses.replace(
            cfg.student,
            epochs=args.epochs,
            checkpoint_every=args.epochs,
            distill=terms,
            distill_weighting=weighting,
            online_teacher=online,
        )
        method_cfg = dataclasses.replace(cfg, student=student_cfg)
        metrics = str(work / name / TRAIN_METRICS)
        extra = {"pseudo": pseudo, "pseudo_count": info["pseudo_count"], "metrics_path": metrics}
        plan = plan_for(method_cfg, 1, labeled, count, run=RunLayout(work), **extra)  # the teacher: online_teacher's
        weights, seconds = fit_in_process(plan, work / name)
        save_round_model(weights, method_cfg, 1, work / name / "model")
        acc = model_top1(work / name / "model", test)
        results[name] = {
            "top1": round(acc, 4),
            "seconds": round(seconds, 1),
            "terms": describe(terms, weighting) if terms else "pseudo-labels only",
        }
        print(f"{name}: {100 * acc:.2f}% in {seconds:.0f} s", flush=True)
    print()
    print(f"teacher {cfg.spec(0).model}: {100 * info['teacher_top1']:.2f}% test top-1; students {cfg.spec(1).model},")
    print(f"{args.epochs} epochs each on {info['pseudo_count']} pseudo-labeled copies + {count} labeled images")
    print(f"{'method':<15} {'test top-1':>10} {'train s':>8}  terms (beside the pseudo-label loss)")
    for name, r in results.items():
        print(f"{name:<15} {100 * r['top1']:>9.2f}% {r['seconds']:>8.0f}  {r['terms']}")
    save_result(
        {
            "bench": "distill",
            "setting": f"{Path(args.config).stem}, {args.epochs} student epochs"
            + "".join(f" {s}" for s in args.overrides),
            "config": args.config,
            "epochs": args.epochs,
            "teacher": cfg.spec(0).model,
            "student": cfg.spec(1).model,
            "teacher_top1": round(info["teacher_top1"], 4),
            "pseudo_count": info["pseudo_count"],
            "methods": results,
        },
        "distill",
        args,
    )


if __name__ == "__main__":
    main()
