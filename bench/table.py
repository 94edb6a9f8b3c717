"""The README's benchmark tables, rendered from the result files in ``bench/results/`` (never typed by hand).

    python bench/table.py              # rewrite the block between the markers in README.md (= make bench-table)
    python bench/table.py --check      # exit 1 (and print the difference) when README.md is not what the files give

Every bench saves ``bench/results/<name>-<UTC stamp>.json`` (``bench/bench_common.save_result``): its JSON line plus
the machine it ran on. For each bench, setting and machine the latest file is shown; each row links its file. The
block lies between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``; nothing outside it is touched.
Standard library only, so the check is cheap enough for a test or a pre-commit hook.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import difflib
import functools
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def load_results(folder: Path) -> list[dict]:
    """The latest result per (bench, setting, machine), each with ``_file`` (its path relative to the README)."""
    latest: dict[tuple, dict] = {}
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if "bench" not in result or "machine" not in result:
            raise SystemExit(f"{path}: not a bench result (no 'bench' or 'machine' key)")
        result["_file"] = f"bench/results/{path.name}"
        result.setdefault("setting", Path(result.get("config", "")).stem)  # seeds files before 2026-12-03 had none
        key = (result["bench"], result["setting"], machine(result))
        if key not in latest or result["machine"]["date"] >= latest[key]["machine"]["date"]:
            latest[key] = result
    return sorted(latest.values(), key=lambda r: (r["bench"], r.get("setting", ""), machine(r)))


def machine(result: dict) -> str:
    m = result["machine"]
    gpu = f", {m['gpu']['name']}" if m.get("gpu") else ""
    cpu = m.get("cpu_model") or m.get("cpu", "?")  # bench/seeds.py writes its facts as cpu/torch/ray
    return f"{cpu}, {m.get('cores', '?')} cores{gpu}"


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


# The code each bench measures: a result whose commit is older than the last change to these paths is marked.
ROUND_LOOP = (  # what decides a run's figures: the round stages, their data path, models and maths, the loop
    "stages/train.py",
    "stages/pseudo_label.py",
    "stages/select.py",
    "stages/evaluate.py",
    "stages/pretrain.py",
    "stages/data/loader.py",
    "stages/data/compact.py",
    "stages/data/decode.py",
    "stages/maths",
    "stages/models",
    "pipeline/rounds.py",
    "pipeline/plan.py",
    "pipeline/choices.py",
)
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "pseudo_label": ("stages/pseudo_label.py", "stages/data/decode.py", "stages/data/decoders.py"),
    "train": ("stages/train.py", "stages/data/loader.py"),
    "train_student": ("stages/train.py", "stages/data/loader.py", "stages/data/compact.py"),
    "select": ("stages/select.py", "stages/maths/selection.py", "stages/data/compact.py"),
    "decode": ("stages/data/decoders.py",),
    "gpu_bare": ("stages/data/decoders.py",),
    "distill": ("stages/train.py", "stages/models/distill.py"),
    "e2e": ROUND_LOOP + ("pipeline/distributed",),
    "scale": ROUND_LOOP + ("pipeline/distributed",),
    "seeds": ROUND_LOOP,
    "suggest": ROUND_LOOP + ("pipeline/own_data.py",),
    "rounds_rule": ("stages/maths/round_choice.py",),
}


@functools.cache
def changed_since(commit: str, paths: tuple[str, ...]) -> str | None:
    """The newest commit after ``commit`` that changed ``paths`` (7 hex digits), ``"?"`` when git does not know
    ``commit`` (or there is no git), None when the code is as measured."""
    if not commit:
        return "?"
    try:
        out = subprocess.run(
            ["git", "rev-list", "-1", f"{commit}..HEAD", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out[:7] or None


def _when(result: dict, stale: Callable[[str, tuple[str, ...]], str | None] | None = None) -> str:
    m = result["machine"]
    commit = m.get("commit") or m.get("git_commit") or ""  # seeds files before 2026-12-03: git_commit, git_dirty
    dirty = "+changes" if m.get("dirty") or m.get("git_dirty") else ""  # measured on a tree with uncommitted changes
    cell = f"[{m['date'][:10]}]({result['_file']}) `{commit[:7]}{dirty}`"
    paths = STAGE_CODE.get(result["bench"])
    newer = (stale or changed_since)(commit, paths) if paths else None
    if newer == "?":
        return cell + " (code version unknown)"
    return cell + (f" **older than the code it measures** (changed in `{newer}`)" if newer else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def throughput_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["bench"] == "pseudo_label":
            peers = ", ".join(f"{k} {_n(v['images_per_s'])}" for k, v in r["loops"].items())
            peer = f"{r['loop_best']} {_n(r['loop_best_images_per_s'])}" if r.get("loop_best") else "–"
            detail = f"{r['images']:,} images; loops ({r['stage_cpus']} CPUs each): {peers}"
        elif r["bench"] in ("train", "train_student"):
            peer = f"DataLoader loop {_n(r['loop_images_per_s'])}"
            spread = f" (pairs {min(r['ratios']):.2f}–{max(r['ratios']):.2f})" if len(r["ratios"]) > 1 else ""
            detail = f"median of {r['repeat']}{spread}; {r['steps_timed']} steps of {r['step_images']} images"
        else:
            continue
        ratio = _n(r["ratio"], 2) if r.get("ratio") is not None else "–"
        stage, bare = _n(r["stage_images_per_s"]), _n(r["bare_images_per_s"])
        rows.append([r["bench"], r["setting"], stage, peer, ratio, bare, detail, machine(r), _when(r)])
    return rows


def e2e_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["bench"] != "e2e":
            continue
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["pipeline_split_s"].items())
        ray_train = ", ".join(f"{k} {v:.0f}" for k, v in r["train_outside_epochs_s"]["pipeline"].items())
        actors = ", ".join(f"{k} {v:.0f}" for k, v in r["label_actor_startup_s"].items() if v is not None)
        top1 = "/".join(f"{100 * t:.1f}" for t in r["top1"]["pipeline"])
        rows.append(
            [
                r["setting"],
                f"{r['pipeline_wall_s']:.0f} s",
                f"{r['plain_wall_s']:.0f} s",
                f"{r['ratio']:.2f}",
                f"{r['pipeline_outside_stages_s']:.0f} s ({split})",
                f"train beyond its epochs: {ray_train}; label actor start-up: {actors or '–'}",
                top1,
                machine(r),
                _when(r),
            ]
        )
    return rows


def scale_rows(results: list[dict]) -> list[list[str]]:
    """``bench/scale.py``: one real round at a data size; what grows with the data (driver memory, bytes re-read)."""
    rows = []
    for r in results:
        if r["bench"] != "scale":
            continue
        stages = r["stage_seconds"]
        total = sum(stages.values()) or 1.0
        top = sorted(stages.items(), key=lambda kv: -kv[1])[:4]
        shares = ", ".join(f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in top)
        chance = 1 / r["classes"] if r.get("classes") else None
        near_chance = chance is not None and r.get("top1") and max(r["top1"]) < 3 * chance
        setting = r["setting"] + (
            f" (top-1 {'/'.join(f'{100 * t:.1f}' for t in r['top1'])}%: near chance, 1 epoch; a cost figure, "
            "not an accuracy)"
            if near_chance
            else ""
        )
        rows.append(
            [
                f"{r['labeled']:,} / {r['unlabeled']:,} / {r['test']:,}",
                setting,
                f"{r['driver_peak_rss_mb']:,.0f} MB",
                _n(r["student_bytes_ratio"], 1 if r["student_bytes_ratio"] >= 10 else 3),
                f"{r['seconds']:.0f} s",
                shares,
                machine(r),
                _when(r),
            ]
        )
    return rows


def decode_rows(results: list[dict]) -> list[list[str]]:
    """``bench/decode.py``: CPU decode + resize to the model's size, images/s per core; the fastest three per case."""
    rows = []
    for r in results:
        if r["bench"] != "decode":
            continue
        for case, decoders in r["decoders"].items():
            ranked = sorted(decoders.items(), key=lambda kv: -kv[1]["img_s"])
            fastest = ", ".join(f"{name} {_n(d['img_s'])}" for name, d in ranked[:3])
            pil = _n(decoders["pil"]["img_s"]) if "pil" in decoders else "–"
            default = f"{r['default']} ({r['default_speedup_vs_pil']:.2f}x pil over the cases)"
            rows.append([case, pil, fastest, default, machine(r), _when(r)])
    return rows


def select_rows(results: list[dict]) -> list[list[str]]:
    return [
        [r["setting"], f"{r['seconds']:.1f} s", _n(r["rows_per_s"]), f"{r['peak_rss_mb']:,} MB", machine(r), _when(r)]
        for r in results
        if r["bench"] == "select"
    ]


def accuracy_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["bench"] == "distill":
            best = max(r["methods"], key=lambda k: r["methods"][k]["top1"])
            scores = ", ".join(f"{k} {100 * v['top1']:.2f}%" for k, v in r["methods"].items())
            teacher = f"teacher {r['teacher']} {100 * r['teacher_top1']:.2f}%"
            rows.append(["distill", r["setting"], f"{best} {100 * r['methods'][best]['top1']:.2f}%", teacher, scores])
        elif r["bench"] == "seeds":
            rounds = " → ".join(
                f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in zip(r["test_top1_mean"], r["test_top1_std"], strict=True)
            )
            chosen = (
                f"chosen round ({r['best_by'][0]}) {100 * r['chosen_round_test_top1_mean']:.2f} ± "
                f"{100 * r['chosen_round_test_top1_std']:.2f}%"
                if "chosen_round_test_top1_mean" in r
                else "–"
            )
            worst = r.get("worst_class_top1_mean")
            extra = f"; worst class (last round) {100 * worst[-1]:.2f}%" if worst and worst[-1] is not None else ""
            rows.append(
                ["seeds", f"{r['config']} {len(r['seeds'])} seeds", chosen, f"test per round {rounds}{extra}", ""]
            )
        elif r["bench"] == "rounds_rule":
            regret = r["rules"][r["default"]]["mean_regret"]
            today = r["today"]["mean_regret"]
            rows.append(
                [
                    "rounds_rule",
                    f"{len(r['runs'])} runs, ladders {'/'.join(r['ladders'])}",
                    f"default {r['default']}: mean regret {regret['pool']:.2f} (pool) / {regret['split']:.2f} (halves)",
                    f"today's rule {today['pool']:.2f} / {today['split']:.2f}",
                    ", ".join(f"{k} {v['mean_regret']['pool']:.2f}" for k, v in r["rules"].items()),
                ]
            )
        elif r["bench"] == "suggest":
            g = r["gains"]
            worst, test = g["chosen_worst_class_top1"], g["chosen_test_top1"]
            rows.append(
                [
                    "suggest",
                    f"{r['config']} +{r['n']} labels, {len(r['seeds'])} seeds",
                    f"worst class {100 * worst['gain_mean']:+.2f} ± {100 * worst['gain_std']:.2f} points "
                    f"(suggested {100 * worst['suggested_mean']:.2f}%, random {100 * worst['random_mean']:.2f}%)",
                    f"test {100 * test['gain_mean']:+.2f} ± {100 * test['gain_std']:.2f} points "
                    f"(suggested {100 * test['suggested_mean']:.2f}%, random {100 * test['random_mean']:.2f}%)",
                    f"base {r['base_rounds']} round(s), arms {r['rounds']}",
                ]
            )
        elif r["bench"] == "peers":
            best = max(r["peers"], key=r["peers"].get)
            ours = ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["pipeline"].items()) or "–"
            top = f"{best} {100 * r['peers'][best]:.2f}%"
            rows.append(["peers", r["setting"], top, ours, f"{len(r['peers'])} peers"])
        else:
            continue
        rows[-1] += [machine(r), _when(r)]
    return rows


def gpu_rows(results: list[dict]) -> list[list[str]]:
    """One row per step of each ``bench/gpu_check.sh`` run (``bench/gpu_record.py``): what it showed, or why not."""
    by_file = {r["_file"]: r for r in results}
    rows = []
    for run in (r for r in results if r["bench"] == "gpu"):
        for step in run["steps"]:
            if step["name"] == "tests":
                shown = "; ".join([run["tests"]["outcome"], *run["tests"]["figures"], *run["tests"]["failures"][:1]])
            else:
                shown = "; ".join(_gpu_figures(by_file[f]) for f in step["results"] if f in by_file) or "–"
            seconds = f"{step['seconds']} s" if step["rc"] is not None else "–"
            rows.append([run["setting"], step["name"], step["status"], seconds, shown, machine(run), _when(run)])
    return rows


def _gpu_figures(r: dict) -> str:
    if r["bench"] == "pseudo_label":
        peer = f", loop {_n(r['loop_best_images_per_s'])} ({r['loop_best']})" if r.get("loop_best") else ""
        return (
            f"{r['setting']}: stage {_n(r['stage_images_per_s'])} img/s ({_n(r['stage_after_startup_images_per_s'])}"
            f" after {r['stage_startup_s']} s start-up){peer}, bare {_n(r['bare_images_per_s'])}; "
            f"stage/bare {r['ratio_bare']:.3f}"
        )
    if r["bench"] in ("train", "train_student"):
        return (
            f"{r['setting']}: stage {_n(r['stage_images_per_s'])} img/s, loop {_n(r['loop_images_per_s'])}, bare "
            f"{_n(r['bare_images_per_s'])}; stage/loop {r['ratio']:.2f}, stage/bare {r['ratio_bare']:.2f}"
        )
    if r["bench"] == "e2e":
        return f"pipeline {r['pipeline_wall_s']:.0f} s, plain {r['plain_wall_s']:.0f} s, ratio {r['ratio']:.2f}"
    if r["bench"] == "gpu_bare":
        feeds = ", ".join(
            f"{name} {_n(d['images_per_s'])} ({d['of_bare']:.2f})" if d["measured"] else f"{name} not measured"
            for name, d in r["decoders"].items()
        )
        return f"{r['setting']}: bare {_n(r['bare_images_per_s'])} img/s; decoders (of bare) {feeds}"
    return r.get("setting", r["bench"])


SECTIONS: list[tuple[str, list[str], Callable[[list[dict]], list[list[str]]]]] = [
    (
        "Stages against their best hand-written peer (images/s; ratio = stage ÷ best peer; above 1: stage faster)",
        ["bench", "setting", "stage", "best peer", "ratio", "bare", "how", "machine", "date, commit"],
        throughput_rows,
    ),
    (
        "End to end: `python -m pipeline iterate` against one plain script (ratio = pipeline wall ÷ plain wall)",
        ["setting", "pipeline", "plain", "ratio", "outside the stages", "Ray start-up inside stages", "top-1 %"]
        + ["machine", "date, commit"],
        e2e_rows,
    ),
    (
        "On a GPU: each step of one `bench/gpu_check.sh` run (cut at its time limit = not measured)",
        ["run", "step", "outcome", "seconds", "what it showed", "machine", "date, commit"],
        gpu_rows,
    ),
    (
        "Scale: one real round (`bench/scale.py`; student bytes ratio = unlabeled bytes read ÷ bytes trained on)",
        ["labeled / unlabeled / test", "setting", "driver peak RSS", "student bytes ratio", "wall", "largest stages"]
        + ["machine", "date, commit"],
        scale_rows,
    ),
    (
        "CPU decode + resize per core (`bench/decode.py`, images/s; default = the fastest over the cases)",
        ["case", "pil", "fastest three", "default", "machine", "date, commit"],
        decode_rows,
    ),
    ("Selection at scale", ["setting", "stage", "rows/s", "peak RSS", "machine", "date, commit"], select_rows),
    ("Accuracy benches", ["bench", "setting", "best", "beside it", "all", "machine", "date, commit"], accuracy_rows),
]


def render(results: list[dict]) -> str:
    """The block between the markers (markers excluded)."""
    lines = ["<!-- generated by bench/table.py from bench/results/*.json: rerun a bench, then make bench-table -->"]
    for title, header, rows_of in SECTIONS:
        rows = rows_of(results)
        if rows:
            lines += ["", f"**{title}**", "", *_table(header, rows)]
    if len(lines) == 1:
        lines += ["", "_No results in `bench/results/` yet: run the benches (each saves its result there)._"]
    return "\n".join(lines)


def replace_block(text: str, block: str, where: str = "README.md") -> str:
    """``text`` with everything between the markers replaced by ``block`` (a blank line either side)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{where}: needs exactly one {START} ... {END} block")
    head, rest = text.split(START)
    tail = rest.split(END)[1]
    return f"{head}{START}\n{block}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README differs from the results")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    wanted = replace_block(text, render(load_results(args.results)), str(args.readme))
    if not args.check:
        if wanted != text:
            args.readme.write_text(wanted)
            print(f"{args.readme}: benchmark tables rewritten from {args.results}")
        return 0
    if wanted == text:
        return 0
    diff = difflib.unified_diff(text.splitlines(), wanted.splitlines(), "README.md", "from bench/results", lineterm="")
    print("\n".join(diff))
    print(f"{args.readme}: the benchmark tables differ from {args.results}; run make bench-table", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
