"""The run report, its CLI commands and the TensorBoard events, on the session's finished one-round run.

Run alone with ``.venv/bin/python -m pytest tests/test_report.py`` (trains the tiny run once, about a minute).
The browser check (``make report-check``) is exercised only where Chromium is installed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.report.check import check_images, check_numbers, check_sections, find_chromium, parse_report
from pipeline.report.data import ReportError
from pipeline.report.page import build_report, refresh_report
from pipeline.report.tensorboard import write_tensorboard
from stages.maths.metrics import prediction_metrics, reliability
from stages.storage.files import read_json

pytestmark = pytest.mark.slow

ROUNDS = (0, 1)


@pytest.fixture(scope="module")
def run_copy(finished_run, tmp_path_factory):
    """A copy of the finished run (without Ray Train's checkpoints) that these tests may rewrite."""
    _, run_dir, _ = finished_run
    storage = tmp_path_factory.mktemp("report-runs")
    shutil.copytree(run_dir, storage / "tiny-a", ignore=shutil.ignore_patterns("ray_train"))
    return storage / "tiny-a"


@pytest.fixture(scope="module")
def report_html(run_copy) -> str:
    return build_report(run_copy).read_text()


def test_round_loop_writes_report_and_events(finished_run):
    _, run_dir, _ = finished_run
    assert (run_dir / "report.html").is_file()
    for sub in ("round-000", "round-001", "rounds"):
        assert list((run_dir / "tensorboard" / sub).glob("events.out.tfevents.*")), sub


def test_images_are_embedded_pngs_that_decode(report_html):
    assert check_sections(report_html) == []  # every section drawn, none replaced by its error
    assert check_images(report_html) == []
    images = parse_report(report_html).images
    assert len(images) >= 9  # accuracy x2, confidence, selection, examples, reliability, timing, models, training
    for src in images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_numbers_equal_the_run_files(report_html, run_copy):
    assert check_numbers(report_html, run_copy) == []
    cells = parse_report(report_html).cells
    for r in ROUNDS:
        metrics = read_json(run_copy / f"round-{r:03d}" / "metrics.json")
        for metric in ("test_top1", "test_ece"):
            (cell,) = [
                c for c in cells if c["attrs"].get("data-metric") == metric and c["attrs"].get("data-round") == str(r)
            ]
            assert json.loads(cell["attrs"]["data-value"]) == metrics[metric]
        (top1,) = [
            c for c in cells if c["attrs"].get("data-metric") == "test_top1" and c["attrs"]["data-round"] == str(r)
        ]
        assert top1["text"] == f"{metrics['test_top1'] * 100:.2f}%"


def test_number_check_catches_a_wrong_or_unsourced_number(report_html, run_copy):
    metrics = read_json(run_copy / "round-001" / "metrics.json")
    shown = f">{metrics['test_top1'] * 100:.2f}%<"
    wrong = f">{metrics['test_top1'] * 100 + 1:.2f}%<"
    assert any("test_top1" in p for p in check_numbers(report_html.replace(shown, wrong), run_copy))
    unsourced = report_html.replace("</table>", "<tr><td>0.25</td></tr></table>", 1)
    assert any("no data-file" in p for p in check_numbers(unsourced, run_copy))


def test_the_reliability_bins_and_the_ece_are_one_computation():
    """Golden values: confidences .95, .95 (one right), .55 (right), .25 (wrong) in 15 bins: ECE = 2/4 * |.5 - .95|
    + 1/4 * |1 - .55| + 1/4 * |0 - .25| = .4; and metrics.json's test_ece is that same number."""
    conf, pred, labels = np.array([0.95, 0.95, 0.55, 0.25]), np.array([1, 1, 0, 2]), np.array([1, 0, 0, 0])
    bins = reliability(conf, pred, labels)
    assert bins["ece"] == pytest.approx(0.4) and bins["top1"] == 0.5
    assert (bins["count"][14], bins["count"][8], bins["count"][3], sum(bins["count"])) == (2, 1, 1, 4)
    assert bins["accuracy"][14] == 0.5 and bins["accuracy"][0] is None
    metrics = prediction_metrics(conf, pred, labels, 3)
    assert metrics["test_ece"] == bins["ece"] and metrics["per_class_top1"] == [1 / 3, 1.0, None]
    assert metrics["confusion"] == [[1, 1, 1], [0, 1, 0], [0, 0, 0]]


def test_report_command_rebuilds_the_page(run_copy, capsys):
    (run_copy / "report.html").unlink()
    assert main(["report", run_copy.name, "--storage", str(run_copy.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(run_copy / "report.html")
    assert check_numbers((run_copy / "report.html").read_text(), run_copy) == []
    assert main(["report", str(run_copy)]) == 0  # a path works too


def test_compare_prints_both_runs_and_writes_a_plot(run_copy, tmp_path, capsys):
    other = tmp_path / "tiny-b"
    shutil.copytree(run_copy, other)
    out = tmp_path / "cmp.png"
    assert main(["compare", str(run_copy), str(other), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-a top-1" in text and "tiny-b top-1" in text
    for r in ROUNDS:
        top1 = read_json(run_copy / f"round-{r:03d}" / "metrics.json")["test_top1"]
        (line,) = [ln for ln in text.splitlines() if ln.split()[:1] == [str(r)]]
        assert line.count(f"{top1 * 100:.2f}%") == 2 and "+0.00 pp" in line
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 0


@pytest.mark.parametrize("argv", [["report", "nope"], ["compare", "nope", "nope2"]])
def test_missing_run_is_one_line_error(argv, tmp_path, capsys):
    assert main(argv + ["--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run 'nope'"), err


def test_tensorboard_events_hold_the_scalars(run_copy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(run_copy / "tensorboard", ignore_errors=True)
    assert len(write_tensorboard(run_copy)) == 3
    assert write_tensorboard(run_copy) == []  # unchanged sources: nothing rewritten, no duplicated points
    for r in ROUNDS:
        acc = EventAccumulator(str(run_copy / "tensorboard" / f"round-{r:03d}"))
        acc.Reload()
        assert {"train/loss", "train/loss_labeled", "train/lr", "train/images_per_s"} <= set(acc.Tags()["scalars"])
        log = [
            json.loads(line) for line in (run_copy / f"round-{r:03d}" / "train_metrics.jsonl").read_text().splitlines()
        ]
        assert [e.step for e in acc.Scalars("train/loss")] == [rec["step"] for rec in log]
        assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([rec["loss"] for rec in log], rel=1e-6)
    acc = EventAccumulator(str(run_copy / "tensorboard" / "rounds"))
    acc.Reload()
    top1 = [read_json(run_copy / f"round-{r:03d}" / "metrics.json")["test_top1"] for r in ROUNDS]
    assert [e.value for e in acc.Scalars("eval/test_top1")] == pytest.approx(top1, rel=1e-6)


def test_refresh_logs_and_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert refresh_report(tmp_path / "not-a-run") is None
    assert "report for" in caplog.text
    with pytest.raises(ReportError, match="no config.yaml"):
        build_report(tmp_path / "not-a-run")


def test_check_without_chromium_is_one_line_error(run_copy, monkeypatch, capsys):
    from pipeline.report import check as report_check

    monkeypatch.setattr(report_check.shutil, "which", lambda name: None)
    assert report_check.main([str(run_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chromium not found" in err[0]


def _has_chromium() -> bool:
    try:
        return bool(find_chromium())
    except ReportError:
        return False


@pytest.mark.skipif(not _has_chromium(), reason="Debian's chromium package is not installed")
def test_check_in_chromium(run_copy, tmp_path, capsys):
    from pipeline.report import check as report_check

    shot = tmp_path / "report.png"
    assert report_check.main([str(run_copy), "--screenshot", str(shot)]) == 0, capsys.readouterr().out
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 1000


def test_validation_sits_beside_test_with_the_best_round_and_corruptions(report_html, run_copy):
    status = read_json(run_copy / "run.json")
    assert 'data-key="val_top1"' in report_html and 'data-key="corruption_top1.mean"' in report_html
    stop = status["stop"]
    assert f"best round {stop['best_round']} by {stop['best_by']}" in report_html and stop["best_by"] == "mcnemar"
    assert html.escape(stop["best_reason"]) in report_html  # why that round, as run.json records it
    assert 'data-key="val_top1_interval.0"' in report_html and 'data-key="test_top1_interval.1"' in report_html
    assert check_numbers(report_html, run_copy) == []
