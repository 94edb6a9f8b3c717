"""Files one run of ``bench/gpu_check.sh`` (its ``summary.txt`` and ``logs.tgz``, as a lent GPU machine returns them).

    python bench/gpu_record.py /work/.device/2        # the folder the device tool fetched the files into

Copies the bench results the run saved into ``bench/results/`` and writes ``bench/results/gpu-<stamp>.json``: the
machine (from those results), each step's exit status and seconds (``rc`` 124: cut at its time limit, so nothing
measured; ``skipped``: no time left), the GPU tests' outcome and the figures they print (bf16 and nvJPEG agreement),
and the result files it holds. ``bench/table.py`` renders these as the README's "On a GPU" table, so a step that
did not finish shows as such instead of leaving a gap.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^== (\w+): (?:rc (\d+) in (\d+) s|skipped, (-?\d+) s left)$")
TEST_FIGURES = re.compile(r"^(GPU \(bf16\)|nvJPEG|epochs ).*$")
TEST_OUTCOME = re.compile(r"^(?:=+ )?((?:\d+ (?:passed|failed|skipped|errors?)(?:, )?)+)")


def parse_summary(text: str) -> list[dict]:
    """Each step of ``summary.txt``: name, status (ok, failed, cut at its limit, skipped), rc, seconds."""
    steps = []
    for line in text.splitlines():
        m = STEP.match(line.strip())
        if not m:
            continue
        name, rc, seconds, _left = m.groups()
        if rc is None:
            steps.append({"name": name, "status": "skipped (no time left)", "rc": None, "seconds": 0})
            continue
        status = {"0": "ok", "124": "cut at its time limit"}.get(rc, "failed")
        steps.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds)})
    return steps


def parse_tests(log: str) -> dict:
    """The pytest outcome line and the figures the GPU tests print."""
    outcome = [m.group(1).strip(", ") for line in log.splitlines() if (m := TEST_OUTCOME.match(line.strip()))]
    figures = [line.strip() for line in log.splitlines() if TEST_FIGURES.match(line.strip())]
    failures = [line.strip() for line in log.splitlines() if line.startswith(("FAILED ", "E   "))]
    return {"outcome": outcome[-1] if outcome else "no outcome line", "figures": figures, "failures": failures[:6]}


def record(folder: Path, results: Path) -> Path:
    summary = (folder / "summary.txt").read_text()
    results.mkdir(parents=True, exist_ok=True)
    logs: dict[str, str] = {}
    saved: list[dict] = []
    with tarfile.open(folder / "logs.tgz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            name = Path(member.name)
            if name.suffix == ".log":
                logs[name.stem] = data.decode(errors="replace")
            elif name.suffix == ".json" and name.parent.name == "results":
                result = json.loads(data)
                (results / name.name).write_bytes(data)
                saved.append({"file": f"bench/results/{name.name}", "bench": result["bench"], **result})
    if not saved:
        raise SystemExit(f"{folder}: the run saved no bench result, so there are no machine facts to file it under")
    machine = dict(saved[0]["machine"])
    machine.pop("command", None)
    steps = parse_summary(summary)
    for step in steps:
        step["results"] = [s["file"] for s in saved if _step_of(s) == step["name"]]
    out = {
        "bench": "gpu",
        "setting": f"gpu_check.sh {machine['date'][:16]}",
        "steps": steps,
        "tests": parse_tests(logs.get("tests", "")),
        "results": [s["file"] for s in saved],
        "header": summary.splitlines()[:3],
        "machine": machine,
    }
    stamp = re.sub(r"[-:]", "", machine["date"])[:15] + "Z"
    path = results / f"gpu-{stamp}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    with io.StringIO() as buf:
        for step in steps:
            buf.write(f"{step['name']:14} {step['status']:24} {step['seconds']:4d} s {' '.join(step['results'])}\n")
        print(buf.getvalue() + f"tests: {out['tests']['outcome']}\nwrote {path}")
    return path


def _step_of(result: dict) -> str:
    """The gpu_check.sh step that writes a result like this one."""
    if result["bench"] == "pseudo_label":
        if step := {"gpu": "pl_gpudecode", "tasks": "pl_tasks"}.get(result.get("decode")):
            return step
        return "pl_4actors" if result.get("actors", 1) > 1 else "pl_1actor"
    return {"gpu_bare": "bare"}.get(result["bench"], result["bench"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where summary.txt and logs.tgz of one gpu_check.sh run lie")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    for name in ("summary.txt", "logs.tgz"):
        if not (args.folder / name).is_file():
            sys.exit(f"{args.folder}: no {name} (the files bench/gpu_check.sh leaves in $OUT)")
    record(args.folder, args.results)


if __name__ == "__main__":
    main()
