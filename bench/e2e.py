"""End to end: ``make iterate ROUNDS=1`` on the default config against the same work as one plain script.

    python bench/e2e.py                                   # digits, 1 round: the acceptance run
    python bench/e2e.py --set teacher.epochs=2 --set student.epochs=1 --no-save     # a smoke run
    python bench/e2e.py --gpu                             # the pipeline with use_gpu and a label actor on the GPU
    python bench/e2e.py --executor ray                    # the pipeline on Ray whatever the data's size

The data is prepared first (not timed). Then, ``--repeat`` times (who goes first alternating), two fresh processes,
each timed from launch to exit: ``bench/plain_loop.py`` (one process, no Ray: teacher, label, select, student,
evaluate with the stages' plain functions, same recipe, seeds and models) and ``python -m pipeline iterate --config
C --rounds R --run <fresh>`` (its storage in a temporary folder). ``ratio`` is the pipeline's wall time over the
plain script's (median of pairs).

Where the pipeline's work runs is its own choice (``resources.executor``): by default (``--executor auto``) the
digits run stays in its process (``pipeline/distributed/executor.choose_executor``: a small local run, no GPU) and
``--gpu`` puts it on Ray; ``--executor ray`` or ``local`` sets it (and names it in ``setting``). ``executor`` in the
result is what the run recorded in its ``run.json``: the kind and the reason.

The pipeline's time is split from its own records and its log: each stage's seconds (``run.json``), when each stage
started (the ``round-NNN <stage>: starting`` log lines, stamped as they arrive), so that what lies outside the
stages is a number: start-up to a running Ray (interpreter, imports, config, choosing the executor, ``ray.init``; on
the in-process executor, start-up to that choice), the rest of the preflight and the data check, the time between
stages (manifests, checksums, ``run.json``, the report after each round) and after the last stage (report, Ray
shutdown). Inside the stages, ``stages`` compares each stage with the plain script's, and ``train_outside_epochs_s`` /
``label_actor_startup_s`` say how much of that is Ray Train's and the label workers' start-up. Final line
``{"bench": "e2e", ...}``, saved to ``bench/results/``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_result_args, save_result  # noqa: E402

from stages.storage.layout import RunLayout, round_name  # noqa: E402
from stages.train import read_metrics_lines  # noqa: E402

STARTING = re.compile(r"(round-\d{3}) (\w+): starting")
# The pipeline's log line once Ray runs (pipeline.rounds.preflight), or, on the in-process executor, once it is chosen
RAY_UP, EXECUTOR_CHOSEN = "pipeline.rounds: ray:", "pipeline.rounds: executor:"
STARTUP = {RAY_UP: "start-up to a running Ray", EXECUTOR_CHOSEN: "start-up to the in-process executor"}


def ensure_data(config: str, overrides: list[str]) -> None:
    from pipeline.cli import ensure_digits
    from pipeline.config import load_config

    root = load_config(ROOT / config, overrides).data.prepare_digits
    if root:
        ensure_digits(str(ROOT / root) if not Path(root).is_absolute() else root)


def timed_process(
    cmd: list[str], env: dict, started: Callable[[subprocess.Popen], None] | None = None
) -> tuple[float, str, list[tuple[float, str]]]:
    """Run ``cmd`` in the project root; wall seconds, stdout, and stderr lines with their arrival times.
    ``started`` is called with the process as soon as it runs (``bench/scale.py`` samples its memory)."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if started is not None:
        started(proc)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed (exit {proc.returncode}):\n{tail}")
    return wall, stdout, lines


def pipeline_split(wall: float, lines: list[tuple[float, str]], timings: dict) -> tuple[dict, dict]:
    """Per-stage seconds (``run.json``) and the time outside them, from when each stage's start was logged."""
    mark = RAY_UP if any(RAY_UP in line for _, line in lines) else EXECUTOR_CHOSEN
    up = next((t for t, line in lines if mark in line), 0.0)
    starts = [(t, m[1], m[2]) for t, line in lines if (m := STARTING.search(line))]
    stages, split = {}, {}
    if not starts:
        return stages, {"unaccounted": round(wall, 2)}
    split[STARTUP[mark]] = up
    split["data check, run folder"] = starts[0][0] - up
    between = 0.0
    for i, (t, rnd, stage) in enumerate(starts):
        seconds = float(timings[str(int(rnd[6:]))][stage])
        stages[f"{rnd} {stage}"] = seconds
        end = t + seconds
        if i + 1 < len(starts):
            between += starts[i + 1][0] - end
        else:
            split["after the last stage (report, shutdown)"] = wall - end
    split["between stages (manifests, run.json, report per round)"] = between
    return stages, {k: round(v, 2) for k, v in split.items()}


def run_pipeline(args, storage: Path, name: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "iterate", "--config", args.config, "--rounds", str(args.rounds)]
    cmd += ["--run", name, "--no-progress", "--set", f"storage={storage}"]
    if args.gpu:
        cmd += ["--set", "resources.use_gpu=true", "--set", "resources.gpus_per_label_actor=1"]
    if args.executor != "auto":
        cmd += ["--set", f"resources.executor={args.executor}"]
    for s in args.overrides:
        cmd += ["--set", s]
    wall, _, lines = timed_process(cmd, env)
    run = RunLayout(storage / name)
    status = json.loads(run.status.read_text())
    stages, split = pipeline_split(wall, lines, status["rounds"])
    outside, startup, top1 = {}, {}, []
    for r in range(args.rounds + 1):
        layout, rnd = run.round(r), round_name(r)
        epochs = read_metrics_lines(layout.train_metrics.read_text())
        outside[rnd] = round(stages[f"{rnd} train"] - sum(e["seconds"] for e in epochs), 2)
        manifest = json.loads(layout.manifest.read_text())
        if r:
            startup[rnd] = manifest["stages"]["pseudo_label"]["result"].get("startup_seconds")
        top1.append(json.loads(layout.metrics.read_text())["test_top1"])
    return {
        "wall": wall,
        "stages": stages,
        "split": split,
        "outside": outside,
        "startup": startup,
        "top1": top1,
        "executor": status.get("executor"),
    }


def run_plain(args, env: dict) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "plain_loop.py"), "--config", args.config, "--rounds", str(args.rounds)]
    cmd += [*(["--gpu"] if args.gpu else []), *(x for s in args.overrides for x in ("--set", s))]
    wall, stdout, _ = timed_process(cmd, env)
    out = json.loads(stdout.strip().splitlines()[-1])
    stages = {k: v for k, v in out["plain_stage_seconds"].items() if k != "setup"}
    outside = {r: round(stages[f"{r} train"] - s, 2) for r, s in out["train_epoch_seconds"].items()}
    return {"wall": wall, "stages": stages, "outside": outside, "top1": out["top1"]}


def summarize(args, pipes: list[dict], plains: list[dict]) -> dict:
    """The median pair (by ratio) stands for the run; every pair's walls and ratio are kept."""
    ratios = [p["wall"] / q["wall"] for p, q in zip(pipes, plains, strict=True)]
    i = ratios.index(statistics.median_low(ratios))
    pipe, plain = pipes[i], plains[i]
    stages = {
        k: {"pipeline": round(v, 2), "plain": plain["stages"].get(k), "extra": round(v - plain["stages"].get(k, 0), 2)}
        for k, v in pipe["stages"].items()
    }
    inside = sum(pipe["stages"].values())
    return {
        "bench": "e2e",
        "setting": f"{'gpu' if args.gpu else 'cpu'} {Path(args.config).stem} rounds={args.rounds}"
        + (f" executor={args.executor}" if args.executor != "auto" else "")
        + "".join(f" {s}" for s in args.overrides),
        "config": args.config,
        "rounds": args.rounds,
        "overrides": args.overrides,
        "pipeline_wall_s": round(pipe["wall"], 1),
        "plain_wall_s": round(plain["wall"], 1),
        "ratio": round(statistics.median(ratios), 3),  # pipeline wall / plain wall: the goal is <= 1.5
        "ratios": [round(r, 3) for r in ratios],
        "pipeline_walls_s": [round(p["wall"], 1) for p in pipes],
        "plain_walls_s": [round(q["wall"], 1) for q in plains],
        "pipeline_outside_stages_s": round(pipe["wall"] - inside, 2),
        "plain_outside_stages_s": round(plain["wall"] - sum(plain["stages"].values()), 2),
        "pipeline_split_s": pipe["split"],
        "stages": stages,
        "train_outside_epochs_s": {"pipeline": pipe["outside"], "plain": plain["outside"]},
        "label_actor_startup_s": pipe["startup"],
        "executor": pipe["executor"],  # where the pipeline's work ran, as its run.json records it
        "top1": {"pipeline": pipe["top1"], "plain": plain["top1"]},
        "repeat": args.repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpu", action="store_true", help="the pipeline with use_gpu, the plain script on the GPU")
    parser.add_argument("--repeat", type=int, default=1, help="plain and pipeline alternated this many times")
    parser.add_argument(
        "--executor",
        choices=("auto", "local", "ray"),
        default="auto",
        help="the pipeline's resources.executor (default auto: the config's choice, as `make iterate` runs it)",
    )
    add_result_args(parser)
    args = parser.parse_args()
    ensure_data(args.config, args.overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    pipes, plains = [], []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for i in range(args.repeat):
            for which in ("plain", "pipeline") if i % 2 == 0 else ("pipeline", "plain"):  # alternate who goes first
                if which == "plain":
                    plains.append(run_plain(args, env))
                    print(f"plain script {plains[-1]['wall']:6.1f} s, top-1 {plains[-1]['top1']}", flush=True)
                else:
                    name = f"e2e-{time.strftime('%Y%m%d-%H%M%S')}-{i}"
                    pipes.append(run_pipeline(args, Path(tmp) / "runs", name, env))
                    print(f"pipeline     {pipes[-1]['wall']:6.1f} s, top-1 {pipes[-1]['top1']}", flush=True)
    result = summarize(args, pipes, plains)
    pipeline = f"pipeline {result['pipeline_wall_s']} s ({(result['executor'] or {}).get('kind')})"
    print(f"\n{pipeline}, plain {result['plain_wall_s']} s: ratio {result['ratio']}")
    for part, seconds in result["pipeline_split_s"].items():
        print(f"  outside the stages: {part:<55} {seconds:6.1f} s")
    for stage, row in result["stages"].items():
        print(
            f"  {stage:<22} pipeline {row['pipeline']:6.1f} s, plain {row['plain']:6.1f} s, extra {row['extra']:5.1f} s"
        )
    save_result(result, "e2e", args)


if __name__ == "__main__":
    main()
