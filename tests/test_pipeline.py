"""One full Noisy Student round through Ray (Ray Train + Ray Data + selection tasks) on the real digits data.

The run itself is the session fixture ``finished_run`` in conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.rounds import run_pipeline
from stages.data.shards import expand_shards, load_labeled
from stages.evaluate import evaluate
from stages.maths.stopping import StopConfig
from stages.models.factory import load_model
from stages.storage.artifacts import RoundManifest, verify_entry
from stages.storage.files import read_json

pytestmark = pytest.mark.slow


def test_run_writes_the_documented_layout(finished_run):
    cfg, run_dir, rows = finished_run
    assert (run_dir / "config.yaml").is_file()
    status = read_json(run_dir / "run.json")
    assert status["status"] == "finished" and status["rounds_completed"] == 2
    check = status["data_check"]  # the contamination guard ran before round 0 and left its counts
    assert (check["labeled"]["in_test"], check["unlabeled"]["in_test"], check["unlabeled"]["images"]) == (0, 0, 1237)
    assert [r["round"] for r in rows] == [0, 1]
    for r in (0, 1):
        rdir = run_dir / f"round-{r:03d}"
        card = json.loads((rdir / "model.json").read_text())
        assert card["create"] == {"model_name": "resnet10t", "num_classes": 10, "in_chans": 1}
        metrics = read_json(rdir / "metrics.json")
        assert 0.0 <= metrics["test_top1"] <= 1.0 and len(metrics["per_class_top1"]) == 10
        manifest = RoundManifest(rdir)
        for stage, entry in manifest.data["stages"].items():
            assert entry["status"] == "done", stage
            assert all(verify_entry(f, rdir) is None for f in entry["files"]), stage
    assert rows[0]["train_images"] == 100
    assert rows[1]["train_images"] == 100 + rows[1]["pseudo_images"] > 100


def test_every_round_is_scored_on_validation_and_corrupted_test_and_the_best_is_chosen_on_validation(finished_run):
    cfg, run_dir, rows = finished_run
    status = read_json(run_dir / "run.json")
    assert status["validation"]["source"] == "shards" and status["validation"]["images"] == 100
    assert status["data_check"]["validation"]["in_unlabeled"] == 0
    for m in rows:
        assert 0.0 <= m["val_top1"] <= 1.0 and m["val_images"] == 100
        c = m["corruption_top1"]
        assert set(c["per_corruption"]) == set(cfg.robustness.corruptions)
        assert c["mean"] == pytest.approx(sum(c["per_corruption"].values()) / len(c["per_corruption"]))
    assert rows[1]["teacher_val_top1"] == rows[0]["val_top1"]
    assert rows[0]["seeds"]["train"] != rows[1]["seeds"]["train"]  # each round's model its own seed
    stop = status["stop"]
    val = [m["val_top1"] for m in rows]
    assert stop["val_top1"] == val and not stop["stopped_early"]
    for m in rows:  # each top-1 with its 95% interval around it
        for split in ("val", "test"):
            lo, hi = m[f"{split}_top1_interval"]
            assert lo <= m[f"{split}_top1"] <= hi and hi - lo > 0.02  # 100 and 360 images: several points wide
    # The recorded choice is the default rule's on the rounds' own validation sidecars, image by image.
    from stages.evaluate import val_predictions
    from stages.maths.round_choice import choose_round

    preds = [val_predictions(sorted((run_dir / f"round-{r:03d}" / "eval" / "val").glob("*.parquet"))) for r in (0, 1)]
    assert preds[0][0] == preds[1][0]  # the same images, in the same order
    assert [p.top1 for _, p in preds] == pytest.approx(val)
    choice = choose_round([p for _, p in preds], "mcnemar")
    assert (stop["best_by"], stop["best_round"], stop["best_reason"]) == ("mcnemar", choice.round, choice.reason)


def test_pseudo_labels_cover_every_unlabeled_sample_once(finished_run):
    _, run_dir, _ = finished_run
    tables = [pq.read_table(p) for p in sorted((run_dir / "round-001" / "pseudo_labels").glob("*.parquet"))]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == 1237
    selected = [pq.read_table(p) for p in sorted((run_dir / "round-001" / "selection").glob("*.parquet"))]
    assert set(k for t in selected for k in t.column("key").to_pylist()) <= set(keys)


def test_recorded_accuracy_matches_a_fresh_evaluation(finished_run, digits_root):
    cfg, run_dir, rows = finished_run
    model, card = load_model(run_dir / "round-001")
    test = load_labeled(expand_shards(cfg.data.test), 10, 1)
    assert evaluate(model, card, test)["test_top1"] == pytest.approx(rows[1]["test_top1"])


def test_rerun_resumes_without_redoing_any_stage(finished_run):
    cfg, run_dir, rows = finished_run
    before = {r: (run_dir / f"round-{r:03d}" / "manifest.json").read_text() for r in (0, 1)}
    again = run_pipeline(cfg, "one-round", progress=False)
    assert [m["test_top1"] for m in again] == [m["test_top1"] for m in rows]
    assert {r: (run_dir / f"round-{r:03d}" / "manifest.json").read_text() for r in (0, 1)} == before


def test_damaged_model_is_detected_and_its_round_redone(finished_run):
    cfg, run_dir, rows = finished_run
    rdir = run_dir / "round-001"
    entry = next(f for f in RoundManifest(rdir).stage("train")["files"] if f["path"] == "model.safetensors")
    weights = rdir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "bytes" in verify_entry(entry, rdir)
    again = run_pipeline(cfg, "one-round", progress=False)
    # Redone from Ray Train's last checkpoint of that round: the same weights come back, and they verify.
    assert verify_entry(entry, rdir) is None
    assert again[1]["test_top1"] == pytest.approx(rows[1]["test_top1"])


def test_the_stop_rule_ends_the_run_early_and_download_takes_the_best_round(finished_run, tmp_path, capsys):
    """On a copy: 3 rounds planned, but a student gaining less than 1.0 (any student) stops the loop after round 1;
    nothing is retrained (``stop`` and ``rounds`` leave the stages' inputs as they were)."""
    cfg, run_dir, rows = finished_run
    storage = tmp_path / "runs"
    shutil.copytree(run_dir, storage / run_dir.name, ignore=shutil.ignore_patterns("ray_train"))
    stopping = dataclasses.replace(
        cfg, storage=str(storage), publish="", rounds=3, stop=StopConfig(patience=1, min_gain=1.0, test="gain")
    )
    again = run_pipeline(stopping, run_dir.name, progress=False)
    assert [m["round"] for m in again] == [0, 1] and not (storage / run_dir.name / "round-002").exists()
    status = read_json(storage / run_dir.name / "run.json")
    assert status["status"] == "finished" and status["stop"]["stopped_early"]
    assert status["stop"]["stopped_after_round"] == 1
    best = status["stop"]["best_round"]
    capsys.readouterr()
    assert main(["rounds", run_dir.name, "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "stopped early after round 1" in out and f"best round: {best}" in out and "val top-1" in out
    assert main(["download", run_dir.name, "--storage", str(storage), "--to", str(tmp_path / "dl")]) == 0
    assert [p.name for p in (tmp_path / "dl").glob("round-*")] == [f"round-{best:03d}"]
