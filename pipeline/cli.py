"""Command line: ``python -m pipeline {iterate,report,compare,prepare-digits} --help``.

Only this module prints; errors a user can fix (bad config, bad data, unwritable storage) end in one line
``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.report_data import ReportError
from pipeline.storage import StorageError
from stages.data import DataError

DEFAULT_CONFIG = "configs/digits.yaml"


def _add_iterate(sub) -> None:
    p = sub.add_parser(
        "iterate",
        help="run (or resume) Noisy Student rounds in-process on Ray",
        description="Runs on RAY_ADDRESS if set, else on a local Ray started here.",
    )
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_iterate)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare-digits", help="write scikit-learn's digits as WebDataset shards")
    p.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=4, help="shards per split (default 4)")
    p.set_defaults(func=cmd_prepare)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild a run's report.html and TensorBoard events",
        description="Rewrites <run>/report.html (static, offline) and <run>/tensorboard/ from the run's files.",
    )
    p.add_argument("run", metavar="RUN", help="run name under --storage, or a path to a run folder")
    p.add_argument("--storage", default="runs", help="folder holding the runs (default runs)")
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
    _add_report(sub)
    _add_compare(sub)
    _add_prepare(sub)
    return parser


def cmd_prepare(args) -> int:
    from stages.digits import write_digits_shards

    counts = write_digits_shards(args.out, seed=args.seed, shards_per_split=args.shards)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def ensure_digits(root: str) -> None:
    """Write the default data set if the config asks for it and it is not there yet."""
    if root and not all(any((Path(root) / s).glob("*.tar")) for s in ("labeled", "unlabeled", "test")):
        from stages.digits import write_digits_shards

        counts = write_digits_shards(root)
        print(f"prepared the default digits data in {root}: {counts}", file=sys.stderr)


def cmd_iterate(args) -> int:
    from pipeline.rounds import run_pipeline

    overrides = list(args.overrides) + ([f"rounds={args.rounds}"] if args.rounds is not None else [])
    cfg = load_config(args.config, overrides)
    ensure_digits(cfg.data.prepare_digits)
    run = args.run or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    start, started = time.perf_counter(), time.time()
    rows = run_pipeline(cfg, run, progress=not args.no_progress)
    print()
    print(format_table(rows))
    run_dir = Path(cfg.storage).resolve() / run
    print(f"\nrun {run} finished in {time.perf_counter() - start:.0f} s; outputs in {run_dir}")
    report = run_dir / "report.html"
    if report.is_file() and report.stat().st_mtime >= started:
        print(f"report: {report}")
    else:
        print(f"report: not updated (see the warnings above); rebuild it with python -m pipeline report {run_dir}")
    return 0


def cmd_report(args) -> int:
    from pipeline.report import build_report
    from pipeline.report_data import resolve_run
    from pipeline.tb_events import write_tensorboard

    run_dir = resolve_run(args.run, args.storage)
    write_tensorboard(run_dir)
    print(build_report(run_dir))
    return 0


def cmd_compare(args) -> int:
    from pipeline.report import compare_runs
    from pipeline.report_data import resolve_run

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


def format_table(rows: list[dict]) -> str:
    header = ("round", "model", "params", "train images (lab+pseudo)", "test top-1", "teacher top-1", "time s")
    lines = []
    for m in rows:
        seconds = sum(m.get("stage_seconds", {}).values())
        teacher = f"{m['teacher_top1'] * 100:.2f}%" if m.get("teacher_top1") is not None else "-"
        lines.append(
            (
                str(m["round"]),
                m["model"],
                f"{m['params'] / 1e6:.2f}M",
                f"{m['train_images']} ({m['labeled_images']}+{m['pseudo_images']})",
                f"{m['test_top1'] * 100:.2f}%",
                teacher,
                f"{seconds:.0f}",
            )
        )
    return _columns(header, lines)


def _columns(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (ConfigError, DataError, StorageError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
