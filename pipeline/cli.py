"""Noisy Student rounds on Ray: ``python -m pipeline COMMAND --help`` describes each command.

Only this module prints; errors a user can fix (bad config, bad data, unwritable storage) end in one line
``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.cluster.jobs import JobError
from pipeline.cluster.run_store import RunStoreError
from pipeline.own_data import add_commands
from pipeline.report import ReportError
from pipeline.report.text import columns as _columns
from stages.core.errors import ConfigError, DataError, ExportError
from stages.storage.files import StorageError, is_url, modified, read_json
from stages.storage.layout import RunLayout, locate_run, round_index

DEFAULT_CONFIG = "configs/digits.yaml"


def _add_run_options(p) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--rounds", type=int, help="student rounds after the round-0 teacher (overrides config)")
    p.add_argument("--run", help="run name; an existing run with the same config is resumed (default <name>-<time>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set student.epochs=5 (repeatable)",
    )


def _add_iterate(sub) -> None:
    p = sub.add_parser(
        "iterate",
        help="run (or resume) Noisy Student rounds in-process on Ray",
        description="Runs on RAY_ADDRESS if set, else on a local Ray started here.",
    )
    _add_run_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_iterate)


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search the round-1 student's recipe on validation (Ray Tune + ASHA); writes best.yaml and a trial table",
        description="Trains (or reuses, --run) a base run of rounds 0-1, then samples the knobs of "
        "stages/tuning.SPACE for the round-1 student from the base run's teacher and soft labels, scoring on "
        "validation only; writes <run>/tune/{best.yaml,trials.csv,trials.md,tune.json}.",
    )
    _add_run_options(p)
    p.add_argument("--trials", type=int, default=24, help="trials to sample (default 24)")
    p.add_argument("--budget-minutes", type=float, default=20.0, help="search time limit (default 20)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (and torch threads) per trial (default 1)")
    p.add_argument("--out", help="output folder (default <storage>/<run>/tune)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_tune)


def _add_address(p) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard / Jobs address, e.g. http://HOST:8265 (default: RAY_ADDRESS); the auth token is read "
        "from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )


def _add_jobs(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="submit the run to a Ray cluster as a Ray Job",
        description="Validates the config here, resolves relative paths against this folder (preparing the "
        "default data if the config asks for it), ships the project and the resolved config as the job's "
        "working_dir, and prints job, run and storage. The job runs `python -m pipeline iterate` on the cluster. "
        "First a short check job, with the same working_dir and interpreter, looks up the project's dependencies "
        "(pyproject.toml) and stops the submission with one error line naming what the cluster's interpreter lacks.",
    )
    _add_address(p)
    _add_run_options(p)
    p.add_argument("--python", default="python", help="interpreter the job runs on the cluster (default python)")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the check job that looks up the dependencies with --python on the cluster (a few seconds)",
    )
    p.set_defaults(func=cmd_submit)
    for name, func, text in (
        ("status", cmd_status, "a submitted job's status, run and storage"),
        ("logs", cmd_logs, "a submitted job's driver log"),
        ("stop", cmd_stop, "stop a submitted job (a later iterate/submit with the same RUN resumes it)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job", metavar="JOB", help="the job id printed by submit")
        _add_address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream the log until the job ends")
        p.set_defaults(func=func)


def _add_run_location(p) -> None:
    p.add_argument("run", metavar="RUN", help="run name under --storage, or a path to a run folder")
    p.add_argument("--storage", default="runs", help="storage root: folder, file://, s3://, gs:// (default runs)")


def _add_storage_commands(sub) -> None:
    p = sub.add_parser("rounds", help="list a run's rounds with their metrics, from the run's storage")
    _add_run_location(p)
    p.set_defaults(func=cmd_rounds)

    p = sub.add_parser(
        "download",
        help="copy a round's model, metrics and manifest, verifying every sha256",
        description="Copies <storage>/<RUN>/round-NNN/{model.safetensors,model.json,metrics.json,manifest.json} "
        "to DIR/round-NNN (default: the run's best round by validation top-1, as run.json records it; the latest "
        "finished round when the run has no validation split) and refuses any file whose size or sha256 differs "
        "from the round's manifest.",
    )
    _add_run_location(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--round",
        type=int,
        dest="round_index",
        help="round to download (default: the best round by validation top-1, else the latest finished)",
    )
    which.add_argument("--all", action="store_true", help="every finished round")
    p.add_argument("--to", required=True, help="local folder to download into")
    p.set_defaults(func=cmd_download)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare-digits", help="write scikit-learn's digits as WebDataset shards")
    p.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=4, help="shards per split (default 4)")
    p.add_argument(
        "--labeled-per-class",
        type=int,
        default=10,
        help="labeled images per class, 1..10 (default 10); fewer keep a seeded subset of the default's 10 and move "
        "the rest to unlabeled, with the same validation and test images (2 = digits-hard)",
    )
    p.set_defaults(func=cmd_prepare)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild a run's report.html and TensorBoard events",
        description="Rewrites <run>/report.html (static, offline) and <run>/tensorboard/ from the run's files.",
    )
    p.add_argument("run", metavar="RUN", help="run name under --storage, or a path or URL of a run folder")
    p.add_argument("--storage", default="runs", help="folder or URL (s3://, gs://) holding the runs (default runs)")
    p.set_defaults(func=cmd_report)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="per-round test top-1 of two runs side by side, plus a plot")
    p.add_argument("run_a", metavar="RUN_A", help="run name under --storage, or a path to a run folder")
    p.add_argument("run_b", metavar="RUN_B", help="the run to compare it with")
    p.add_argument("--storage", default="runs", help="folder holding the runs (default runs)")
    p.add_argument("--out", help="plot to write (default compare-<A>-vs-<B>.png beside RUN_A)")
    p.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_iterate(sub)
    _add_tune(sub)
    _add_jobs(sub)
    _add_storage_commands(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_prepare(sub)
    add_commands(sub)  # prepare-folder, predict, export
    return parser


def cmd_prepare(args) -> int:
    from stages.data.digits import write_digits_shards

    if not 1 <= args.labeled_per_class <= 10:
        raise ConfigError(f"--labeled-per-class: must be in [1, 10], got {args.labeled_per_class}")
    counts = write_digits_shards(
        args.out, seed=args.seed, shards_per_split=args.shards, labeled_per_class=args.labeled_per_class
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def ensure_digits(root: str, labeled_per_class: int = 10) -> None:
    """Write the built-in digits data (``labeled_per_class`` labeled images per class: 10, or fewer for digits-hard)
    if the config asks for it and it is not there yet; one ``ConfigError`` line when the folder holds the other
    split."""
    if not root:
        return
    from stages.data.digits import digits_written, write_digits_shards

    try:
        if digits_written(root, labeled_per_class):
            return
    except ValueError as exc:
        raise ConfigError(f"data.prepare_digits: {exc}") from exc
    counts = write_digits_shards(root, labeled_per_class=labeled_per_class)
    print(f"prepared the digits data in {root}: {counts}", file=sys.stderr)


def _load_run(args, prepare: bool = True):
    """The config (with --rounds/--set applied), the default data prepared if asked for, and the run name."""
    from pipeline.config import load_config

    overrides = list(args.overrides) + ([f"rounds={args.rounds}"] if args.rounds is not None else [])
    cfg = load_config(args.config, overrides)
    if prepare:
        ensure_digits(cfg.data.prepare_digits, cfg.data.prepare_labeled_per_class)
    return cfg, args.run or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_iterate(args) -> int:
    from pipeline.plan import run_folder
    from pipeline.rounds import run_pipeline

    cfg, run = _load_run(args)
    start, started = time.perf_counter(), time.time()
    rows = run_pipeline(cfg, run, progress=not args.no_progress)
    print()
    print(format_table(rows))
    run_dir = run_folder(cfg, run)
    layout = RunLayout(run_dir)
    status = read_json(layout.status)
    print(format_per_class(rows, status.get("stuck_classes")))
    print(format_choice(status.get("stop")))
    print(f"\nrun {run} finished in {time.perf_counter() - start:.0f} s; outputs in {run_dir}")
    report = layout.report
    # an object store stamps the upload with its own clock: allow it a little skew
    written = modified(report)
    if written is not None and written >= started - (60 if is_url(report) else 0):
        print(f"report: {report}")
    else:
        print(f"report: not updated (see the warnings above); rebuild it with python -m pipeline report {run_dir}")
    return 0


def cmd_tune(args) -> int:
    import dataclasses

    from pipeline.distributed.tune import base_run_done, run_tune
    from pipeline.plan import check_same_config, run_folder
    from pipeline.rounds import run_pipeline
    from stages.maths.stopping import StopConfig

    cfg, run = _load_run(args)
    if args.run is None:
        run = f"{cfg.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_folder(cfg, run)
    if base_run_done(run_dir):  # read as it is: running it again with rounds: 1 would rewrite its run.json
        check_same_config(cfg, run_dir)
    else:  # the base run: rounds 0 and 1 of this config, an ordinary run
        run_pipeline(dataclasses.replace(cfg, rounds=1, stop=StopConfig()), run, progress=not args.no_progress)
    summary = run_tune(
        cfg,
        run_dir,
        args.trials,
        args.budget_minutes,
        Path(args.out) if args.out else None,
        args.cpus_per_trial,
        progress=not args.no_progress,
    )
    base = summary["baseline"]
    print(f"\n{summary['trials']} trials ({summary['finished']} ran to the end) in {summary['search_seconds']:.0f} s")
    print(f"config's recipe: round-1 student val top-1 {base['val_top1'] * 100:.2f}%")
    best = summary["best"]
    if best is None:
        print("no trial ran to the end: raise --budget-minutes")
    else:
        print(f"best trial {best['trial']}: val top-1 {best['val_top1'] * 100:.2f}%  {json.dumps(best['knobs'])}")
    for name, path in summary["outputs"].items():
        print(f"{name}: {path}")
    return 0


def cmd_submit(args) -> int:
    from pipeline.cluster import jobs
    from pipeline.config import check_models

    cfg, run = _load_run(args, prepare=False)
    check_models(cfg)  # the checks that build models, here before anything is shipped
    # A relative default-data folder lives beside the submitter (a local cluster shares this disk): prepare it
    # here. An absolute one (e.g. /mnt/runs/data on the cluster's volume) is prepared by the job itself.
    if cfg.data.prepare_digits and not os.path.isabs(os.path.expanduser(cfg.data.prepare_digits)):
        ensure_digits(cfg.data.prepare_digits, cfg.data.prepare_labeled_per_class)
    cfg = jobs.resolve_paths(cfg, Path.cwd())
    submission = jobs.submit(cfg, run, args.address, python=args.python, check=args.check)
    print(f"job: {submission.job_id}")
    print(f"run: {submission.run}")
    print(f"storage: {submission.storage}")
    return 0


def cmd_status(args) -> int:
    from pipeline.cluster import jobs

    info = jobs.job_info(args.address, args.job)
    for key in ("job", "status", "run", "storage", "message"):
        if info[key]:
            print(f"{key}: {info[key]}")
    return 0


def cmd_logs(args) -> int:
    from pipeline.cluster import jobs

    if not args.follow:
        sys.stdout.write(jobs.logs(args.address, args.job))
        return 0
    for chunk in jobs.follow(args.address, args.job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    status = jobs.job_info(args.address, args.job)["status"]
    print(f"\njob {args.job}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_stop(args) -> int:
    from pipeline.cluster import jobs

    sent = jobs.stop(args.address, args.job)
    print(f"job {args.job}: {'stop requested' if sent else 'already finished'}")
    return 0


def cmd_rounds(args) -> int:
    from pipeline.cluster.run_store import RunStore

    store = RunStore(args.run, args.storage)
    status = store.status()
    planned = status.get("rounds_planned")
    total = f" of {planned + 1}" if isinstance(planned, int) else ""
    print(
        f"run {store.name} ({store.location}): {status.get('status', 'unknown')}, "
        f"{status.get('rounds_completed', 0)}{total} rounds done"
    )
    rows = store.rounds()
    finished = [r for r in rows if r["finished"]]
    if finished:
        print(format_table(finished))
        print(format_per_class(finished, status.get("stuck_classes")))
        print(format_choice(status.get("stop")))
    for r in rows:
        if not r["finished"]:
            print(f"round {r['round']}: in progress (done: {', '.join(r['stages_done']) or 'nothing yet'})")
    return 0


def cmd_download(args) -> int:
    from pipeline.cluster.run_store import RunStore

    store = RunStore(args.run, args.storage)
    for folder in store.download(args.to, args.round_index, args.all):
        metrics = json.loads(RunLayout(folder.parent).round(round_index(folder.name)).metrics.read_text())
        print(f"{folder}: {metrics['model']}, test top-1 {metrics['test_top1'] * 100:.2f}% (sha256 verified)")
    print(f"load it with: model, card = stages.models.factory.load_model({str(folder)!r})")
    return 0


def cmd_report(args) -> int:
    from pipeline.report.data import resolve_run
    from pipeline.report.page import build_report, refresh_report
    from pipeline.report.tensorboard import write_tensorboard

    if is_url(args.run) or is_url(args.storage):  # built on a local copy of the run, then uploaded
        try:
            url = str(locate_run(args.run, args.storage))
        except StorageError as exc:
            raise ReportError(str(exc)) from exc
        if (report := refresh_report(url)) is None:
            raise ReportError(f"the report of {url} was not written (see the warnings above)")
        print(report)
        return 0
    run_dir = resolve_run(args.run, args.storage)
    write_tensorboard(run_dir)
    print(build_report(run_dir))
    return 0


def cmd_compare(args) -> int:
    from pipeline.report.data import resolve_run
    from pipeline.report.page import compare_runs

    run_a, run_b = resolve_run(args.run_a, args.storage), resolve_run(args.run_b, args.storage)
    out = Path(args.out) if args.out else run_a.parent / f"compare-{run_a.name}-vs-{run_b.name}.png"
    rows = compare_runs(run_a, run_b, out)
    print(format_comparison(rows, run_a.name, run_b.name))
    print(f"\nplot: {out}")
    return 0


def format_comparison(rows: list[dict], name_a: str, name_b: str) -> str:
    """Per-round test top-1 of two runs; the last column is B minus A in percentage points."""
    header = ("round", f"{name_a} model", f"{name_a} top-1", f"{name_b} model", f"{name_b} top-1", "B - A")
    lines = []
    for m in rows:
        a, b = m["a_top1"], m["b_top1"]
        diff = f"{(b - a) * 100:+.2f} pp" if a is not None and b is not None else "-"
        lines.append(
            (
                str(m["round"]),
                m["a_model"] or "-",
                f"{a * 100:.2f}%" if a is not None else "-",
                m["b_model"] or "-",
                f"{b * 100:.2f}%" if b is not None else "-",
                diff,
            )
        )
    return _columns(header, lines)


def format_per_class(rows: list[dict], stuck: list[dict] | None = None, most: int = 20) -> str:
    """Per class (by name, from ``metrics.json``'s ``classes``): test top-1 in each round and the pseudo-labels the
    last student trained on; a class the rounds left behind (``run.json``'s ``stuck_classes``, found on validation)
    is marked. More than ``most`` classes: the ``most`` with the lowest last-round top-1."""
    last = rows[-1]
    names = last.get("classes") or [str(c) for c in range(len(last["per_class_top1"]))]
    behind = {s["class"] for s in stuck or []}
    pseudo = last.get("pseudo_per_class") or [None] * len(names)
    order = list(range(len(names)))
    if len(order) > most:
        order = sorted(order, key=lambda c: last["per_class_top1"][c] if last["per_class_top1"][c] is not None else -1)
        order = order[:most]
    header = ("class", *(f"round {m['round']}" for m in rows), "pseudo-labels", "")
    lines = [
        (
            names[c],
            *(_pct(m["per_class_top1"][c]) for m in rows),
            "-" if pseudo[c] is None else str(pseudo[c]),
            "stuck (validation)" if names[c] in behind else "",
        )
        for c in order
    ]
    return "per-class test top-1 by round:\n" + _columns(header, lines)


def format_table(rows: list[dict]) -> str:
    """Per round: validation top-1 (what every choice is made on) beside test top-1 (reported, never chosen on)."""
    header = (
        "round",
        "model",
        "params",
        "train images (lab+pseudo)",
        "val top-1 [95% interval]",
        "test top-1 [95% interval]",
        "teacher test top-1",
        "corrupted test top-1",
        "time s",
    )
    lines = []
    for m in rows:
        seconds = sum(m.get("stage_seconds", {}).values())
        lines.append(
            (
                str(m["round"]),
                m["model"],
                f"{m['params'] / 1e6:.2f}M",
                f"{m['train_images']} ({m['labeled_images']}+{m['pseudo_images']})",
                _pct_interval(m.get("val_top1"), m.get("val_top1_interval")),
                _pct_interval(m["test_top1"], m.get("test_top1_interval")),
                _pct(m.get("teacher_top1")),
                _pct((m.get("corruption_top1") or {}).get("mean")),
                f"{seconds:.0f}",
            )
        )
    return _columns(header, lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _pct_interval(value: float | None, interval: list[float] | None) -> str:
    """``95.00% [91.2-97.8]``: a top-1 and its 95% (Wilson) interval, when ``metrics.json`` has one."""
    if value is None or not interval:
        return _pct(value)
    return f"{value * 100:.2f}% [{interval[0] * 100:.1f}-{interval[1] * 100:.1f}]"


def format_choice(stop: dict | None) -> str:
    """The best round (by validation) and, when the stop rule fired, why the run ended early."""
    if not stop:
        return "best round: unknown (run.json has no stop record: a run from before validation splits)"
    line = (
        f"best round: {stop['best_round']} (by {stop['best_by']}: val {_pct(stop['best_val_top1'])}, "
        f"test {_pct(stop['best_test_top1'])}); `download` without --round takes it"
    )
    if stop.get("best_reason"):
        line += f"\nwhy: {stop['best_reason']}"
    if stop.get("noise_warning"):
        line += f"\n{stop['noise_warning']}"
    if stop.get("stopped_early"):
        line = f"stopped early after round {stop['stopped_after_round']}: {stop['reason']}\n" + line
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (ConfigError, DataError, StorageError, ReportError, JobError, RunStoreError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
