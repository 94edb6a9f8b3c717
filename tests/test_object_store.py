"""Object-store URLs against a real S3 protocol server on loopback (moto): unlabeled shards read from ``s3://``
by the pseudo-label stage through Ray, ``rounds`` / ``download`` reading a run from ``s3://``, and a whole run
whose storage root is ``s3://`` (every stage writing into the bucket, then resuming from it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from stages.core.errors import DataError
from stages.data.shards import iter_raw_samples

pytestmark = pytest.mark.slow


def test_pseudo_label_streams_unlabeled_shards_from_s3(ray_session, s3_bucket, digits_root, tmp_path):
    from pipeline.distributed.executor import RayExecutor
    from stages.core.stage import LabelResources
    from stages.models.factory import ModelSpec, create_model, model_card, save_model
    from stages.pseudo_label import PseudoLabelConfig, label_shards
    from stages.storage.layout import sidecar_file

    fs, bucket = s3_bucket
    local = sorted((digits_root / "unlabeled").glob("*.tar"))
    for path in local:
        fs.put(str(path), f"{bucket}/unlabeled/{path.name}")
    urls = [f"s3://{bucket}/unlabeled/{p.name}" for p in local]
    spec = ModelSpec("resnet10t")
    save_model(create_model(spec, 10, 1, noised=False), tmp_path / "t", model_card(spec, 10, 1, 16, (0.0,), (0.5,)))

    label_shards(
        tmp_path / "t",
        "sha",
        urls,
        tmp_path / "pl",
        PseudoLabelConfig(topk=3),
        1,
        LabelResources(threads=1),
        RayExecutor(False),
        progress=False,
    )
    rows = pq.read_table([str(tmp_path / "pl" / sidecar_file(u)) for u in urls]).to_pydict()
    expected = sorted(s["__key__"] for p in local for s in iter_raw_samples(str(p)))
    assert sorted(rows["key"]) == expected, "every s3 sample labeled exactly once"
    assert set(rows["shard"]) == set(urls)


def test_a_missing_s3_shard_is_named(s3_bucket):
    fs, bucket = s3_bucket
    with pytest.raises(DataError, match=rf"s3://{bucket}/unlabeled/nope-000000.tar"):
        list(iter_raw_samples(f"s3://{bucket}/unlabeled/nope-000000.tar"))


def test_rounds_and_download_from_s3(finished_run, s3_bucket, tmp_path, capsys):
    """Rounds published to s3:// (``publish:``) are listed and downloaded from there, sha256-verified."""
    from pipeline.cluster.run_store import publish_round

    _, run_dir, rows = finished_run
    fs, bucket = s3_bucket
    storage = f"s3://{bucket}/runs"
    for r in (0, 1):
        assert publish_round(run_dir, r, storage) == f"{storage}/{run_dir.name}"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/{run_dir.name}/round-001")) == [
        "manifest.json",
        "metrics.json",
        "model.json",
        "model.safetensors",
    ]

    assert main(["rounds", run_dir.name, "--storage", storage]) == 0
    assert f"{rows[-1]['test_top1'] * 100:.2f}%" in capsys.readouterr().out
    assert main(["download", run_dir.name, "--all", "--to", str(tmp_path / "dl"), "--storage", storage]) == 0
    got = tmp_path / "dl" / "round-001" / "model.safetensors"
    assert got.read_bytes() == (run_dir / "round-001" / "model.safetensors").read_bytes()

    # a damaged object in the bucket is refused
    fs.pipe(f"{bucket}/runs/{run_dir.name}/round-001/model.json", b'{"create": {}}')
    assert main(["download", run_dir.name, "--round", "1", "--to", str(tmp_path / "dl2"), "--storage", storage]) == 2
    assert "model.json does not match the manifest" in capsys.readouterr().err
    assert not Path(tmp_path / "dl2" / "round-001").exists()
    publish_round(run_dir, 1, storage)  # publishing again repairs it
    assert main(["download", run_dir.name, "--round", "1", "--to", str(tmp_path / "dl2"), "--storage", storage]) == 0


def test_the_run_publishes_every_round(finished_run, tmp_path):
    """The session's finished run has ``publish:`` set to a folder: both rounds arrived there and verify."""
    from pipeline.cluster.run_store import RunStore

    cfg, run_dir, _ = finished_run
    store = RunStore(run_dir.name, cfg.publish)
    assert store.status()["status"] == "finished"
    assert [p.name for p in store.download(tmp_path / "dl", all_rounds=True)] == ["round-000", "round-001"]


def test_a_run_whose_storage_is_a_bucket(ray_session, s3_bucket, digits_root, tmp_path, monkeypatch, caplog):
    """``storage: s3://…``: every stage writes into the bucket (the pseudo-label actors, the selection, Ray Train's
    checkpoints), nothing lands in the working folder, the rounds load back from the URL and re-evaluate to their
    recorded top-1, and a second run of the same RUN resumes from the manifests it reads back from the bucket."""
    import logging

    from pipeline.cluster.run_store import RunStore
    from pipeline.config import load_config
    from pipeline.rounds import run_pipeline
    from stages.data.shards import expand_shards, load_labeled
    from stages.evaluate import evaluate
    from stages.models.factory import load_model
    from tests.conftest import tiny_tree

    fs, bucket = s3_bucket
    url = f"s3://{bucket}/runs"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(None, [f"storage={url}", "teacher.epochs=1"], base=tiny_tree(digits_root, tmp_path / "unused"))
    rows = run_pipeline(cfg, "in-s3", progress=False)

    files = {p.split("/in-s3/", 1)[1] for p in fs.find(f"{bucket}/runs/in-s3")}
    expected_files = ("config.yaml", "run.json", "report.html", "round-000/train_metrics.jsonl")
    for expected in (*expected_files, "round-001/selection/selection.json"):
        assert expected in files, expected
    for r in (0, 1):
        assert {"manifest.json", "metrics.json", "model.json", "model.safetensors"} <= {
            f.split("/", 1)[1] for f in files if f.startswith(f"round-{r:03d}/")
        }
    n_shards = len(expand_shards(cfg.data.unlabeled))
    for stage in ("pseudo_labels", "selection"):
        assert len([f for f in files if f.startswith(f"round-001/{stage}/") and f.endswith(".parquet")]) == n_shards
    tars = [f for f in files if f.startswith("round-001/selection/") and f.endswith(".tar")]  # compact shards
    assert 0 < len(tars) <= n_shards
    assert any(f.startswith("ray_train/round-001-") and "/checkpoint_" in f for f in files), "Ray Train's checkpoints"
    assert any(f.startswith("tensorboard/round-000/events.") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    assert list(work.iterdir()) == [] and not (tmp_path / "unused").exists(), "nothing written outside the bucket"

    store = RunStore("in-s3", url)
    assert store.status()["status"] == "finished"
    test = load_labeled(expand_shards(cfg.data.test), 10, 1, 0.0, "test")
    for folder, row in zip(store.download(tmp_path / "dl", all_rounds=True), rows, strict=True):
        model, card = load_model(folder)
        assert np.isclose(evaluate(model, card, test)["test_top1"], row["test_top1"]), folder.name
    model, card = load_model(f"{url}/in-s3/round-001")  # straight from the URL too
    assert np.isclose(evaluate(model, card, test)["test_top1"], rows[1]["test_top1"])

    manifests = {r: fs.cat_file(f"{bucket}/runs/in-s3/round-{r:03d}/manifest.json") for r in (0, 1)}
    weights = fs.info(f"{bucket}/runs/in-s3/round-001/model.safetensors")["ETag"]
    caplog.set_level(logging.INFO, logger="pipeline.rounds")
    again = run_pipeline(cfg, "in-s3", progress=False)
    skipped = [m for m in caplog.messages if m.endswith(": done, skipping")]
    assert len(skipped) == 6, caplog.messages  # train + evaluate of round 0, all four stages of round 1
    assert [r["test_top1"] for r in again] == [r["test_top1"] for r in rows]
    assert {r: fs.cat_file(f"{bucket}/runs/in-s3/round-{r:03d}/manifest.json") for r in (0, 1)} == manifests
    assert fs.info(f"{bucket}/runs/in-s3/round-001/model.safetensors")["ETag"] == weights
    assert list(work.iterdir()) == []

    # the report rebuilt from the URL by the CLI (on a local copy, uploaded back)
    fs.rm_file(f"{bucket}/runs/in-s3/report.html")
    assert main(["report", "in-s3", "--storage", url]) == 0
    assert b"in-s3" in fs.cat_file(f"{bucket}/runs/in-s3/report.html")
