"""Acceptance check of a run's report.html: every number equals the run's files, every image loads.

    make report-check RUN=base1                         # = python -m pipeline.report.check base1
    python -m pipeline.report.check runs/base1 --screenshot /tmp/report.png

Opens the report in headless Chromium (Debian's ``chromium`` package), takes a full-page screenshot (default
``<run>/report.png``), checks that every ``<img>`` has a natural width > 0 once the page has loaded, and that every
number cell of the page as Chromium rendered it equals the value its ``data-file``/``data-key`` name in the run.
It also fails on a section the builder could not draw. Exit status 0 when all holds, 1 with one line per problem,
2 with one line when it cannot check (no Chromium, no report). The same number, image and section checks run
without a browser in ``tests/test_report.py``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import yaml

from pipeline.report import ReportError
from pipeline.report.data import resolve_run
from stages.storage.layout import RunLayout, round_name

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAX_SCREENSHOT_HEIGHT = 16384
_NUMBER = re.compile(r"^\s*(-?[\d,]*\.?\d+)")
# Appended to a copy of the page: after load, the natural width of every image and the page height.
_PROBE = """<script>window.addEventListener("load", () => {
  const widths = Array.from(document.images).map(i => (i.complete ? i.naturalWidth : 0));
  document.body.setAttribute("data-probe", JSON.stringify({widths, height: document.documentElement.scrollHeight}));
});</script>"""


class _Collector(HTMLParser):
    """Elements that carry ``data-file`` (with their text), every ``<img src>``, and unsourced numeric ``<td>``s."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.images: list[str] = []
        self.body: dict[str, str | None] = {}
        self._open: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "body":
            self.body = a
        elif tag in ("td", "span"):
            self._open.append({"tag": tag, "attrs": a, "text": ""})

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1]["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1]["tag"] == tag:
            self.cells.append(self._open.pop())


def parse_report(html_text: str) -> _Collector:
    collector = _Collector()
    collector.feed(html_text)
    return collector


def check_numbers(html_text: str, run_dir: str | Path) -> list[str]:
    """Problems (empty when none): a sourced cell whose value or shown text disagrees with its file, a numeric
    ``<td>`` with no source, a round whose test top-1 is missing from the page."""
    run_dir = Path(run_dir)
    page = parse_report(html_text)
    files: dict[str, object] = {}
    problems = []
    sourced = [c for c in page.cells if "data-file" in c["attrs"]]
    for cell in sourced:
        problem = _check_cell(cell["attrs"], cell["text"].strip(), run_dir, files)
        if problem:
            problems.append(problem)
    for cell in page.cells:
        if cell["tag"] == "td" and "data-file" not in cell["attrs"] and _NUMBER.match(cell["text"]):
            problems.append(f"number {cell['text'].strip()!r} in the page has no data-file/data-key")
    shown = {c["attrs"].get("data-round") for c in sourced if c["attrs"].get("data-metric") == "test_top1"}
    layout = RunLayout(run_dir)
    for i in layout.round_indices():
        if layout.round(i).metrics.is_file() and str(i) not in shown:
            problems.append(f"{round_name(i)}: test_top1 is not in the page")
    if not sourced:
        problems.append("the page holds no sourced number at all")
    return problems


def _check_cell(attrs: dict, text: str, run_dir: Path, files: dict) -> str | None:
    where = f"{attrs['data-file']}:{attrs.get('data-key')}"
    try:
        value = _lookup(_load(run_dir, attrs["data-file"], files), attrs.get("data-key") or "")
    except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
        return f"{where}: cannot read it from the run ({exc.__class__.__name__}: {exc})"
    if json.loads(attrs.get("data-value", "null")) != value:
        return f"{where}: page records {attrs.get('data-value')}, the file holds {value!r}"
    if value is None:
        return None if not _NUMBER.match(text) else f"{where}: the file holds null but the page shows {text!r}"
    match = _NUMBER.match(text)
    if not match:
        return f"{where}: shows {text!r}, not a number"
    shown = float(match.group(1).replace(",", ""))
    decimals = len(match.group(1).split(".")[1]) if "." in match.group(1) else 0
    expected = float(value) * float(attrs.get("data-scale", "1"))
    if not math.isclose(shown, expected, abs_tol=0.5 * 10**-decimals + 1e-9):
        return f"{where}: shows {text!r} but the file holds {value!r} (x{attrs.get('data-scale', '1')})"
    return None


def _load(run_dir: Path, rel: str, files: dict) -> object:
    if rel not in files:
        path = (run_dir / rel).resolve()
        if run_dir.resolve() not in path.parents:
            raise ValueError(f"{rel} is outside the run folder")
        text = path.read_text()
        files[rel] = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    return files[rel]


def _lookup(obj: object, key: str) -> object:
    for part in key.split(".") if key else []:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]  # type: ignore[index]
    return obj


def check_sections(html_text: str) -> list[str]:
    """Sections the report builder could not draw (it shows their error in their place rather than failing)."""
    failed = re.findall(r'<section><h2>([^<]*)</h2>\s*<p class="note section-failed">([^<]*)', html_text)
    return [f"section {title!r}: {html.unescape(error)}" for title, error in failed]


def check_images(html_text: str) -> list[str]:
    """Every ``<img>`` is an embedded PNG that decodes to a non-empty picture (what a browser needs offline)."""
    from PIL import Image

    problems = []
    images = parse_report(html_text).images
    for i, src in enumerate(images):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"image {i}: not an embedded PNG ({src[:40]!r})")
            continue
        try:
            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
                im.load()
                if im.width <= 0 or im.height <= 0:
                    problems.append(f"image {i}: empty ({im.size})")
        except (OSError, ValueError) as exc:
            problems.append(f"image {i}: does not decode ({exc})")
    if not images:
        problems.append("the page holds no image")
    return problems


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        if exe := shutil.which(name):
            return exe
    raise ReportError("chromium not found: install Debian's chromium package (apt-get install -y chromium)")


def render(report: Path, screenshot: Path, width: int = 1280) -> tuple[str, list[int]]:
    """The DOM of the loaded page as Chromium sees it and each image's natural width; writes a full-page PNG."""
    exe = find_chromium()
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
        # no background networking: on an offline machine Chromium's update, sync and lookups only fail, many a time
        quiet = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
        base = [exe, "--headless", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}/profile", *quiet]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            base.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        dom = _chromium(base + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()])
        probed = parse_report(dom).body.get("data-probe")
        if not probed:
            raise ReportError("chromium rendered the page but its load handler never ran (no data-probe)")
        probe_data = json.loads(probed)
        height = min(int(probe_data["height"]) + 20, MAX_SCREENSHOT_HEIGHT)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        _chromium(base + [f"--window-size={width},{height}", f"--screenshot={screenshot}", report.resolve().as_uri()])
    return dom, probe_data["widths"]


def _chromium(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        raise ReportError(f"chromium did not finish in {exc.timeout} s") from exc
    if done.returncode != 0:
        raise ReportError(f"chromium failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report.check", description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="run name under --storage, or a path to a run folder")
    parser.add_argument("--storage", default="runs", help="folder holding the runs (default runs)")
    parser.add_argument("--screenshot", help="PNG to write (default <run>/report.png)")
    args = parser.parse_args(argv)
    try:
        run_dir = resolve_run(args.run, args.storage)
        report = RunLayout(run_dir).report
        if not report.is_file():
            raise ReportError(f"{report} does not exist; build it with python -m pipeline report {run_dir}")
        screenshot = Path(args.screenshot) if args.screenshot else RunLayout(run_dir).report_screenshot
        dom, widths = render(report, screenshot)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = [f"image {i}: natural width 0 in Chromium" for i, w in enumerate(widths) if w <= 0]
    if not widths:
        problems.append("Chromium found no image in the page")
    problems += check_numbers(dom, run_dir) + check_sections(dom)
    for line in problems:
        print(f"FAIL {line}")
    cells = sum("data-file" in c["attrs"] for c in parse_report(dom).cells)
    verdict = "FAILED" if problems else "ok"
    print(f"{verdict}: {len(widths)} images loaded in Chromium, {cells} numbers checked; screenshot {screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
