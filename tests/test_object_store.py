"""Object-store URLs against a real S3 protocol server on loopback (moto): unlabeled shards read from ``s3://``
by the pseudo-label stage through Ray, and ``rounds`` / ``download`` reading a run from ``s3://``."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from stages.data import DataError, iter_raw_samples

pytestmark = pytest.mark.slow


def test_pseudo_label_streams_unlabeled_shards_from_s3(ray_session, s3_bucket, digits_root, tmp_path):
    from pipeline.ray_pseudo_label import LabelResources, run_pseudo_label
    from stages.models import ModelSpec, create_model, model_card, save_model
    from stages.pseudo_label import PseudoLabelConfig

    fs, bucket = s3_bucket
    local = sorted((digits_root / "unlabeled").glob("*.tar"))
    for path in local:
        fs.put(str(path), f"{bucket}/unlabeled/{path.name}")
    urls = [f"s3://{bucket}/unlabeled/{p.name}" for p in local]
    spec = ModelSpec("resnet10t")
    save_model(create_model(spec, 10, 1, noised=False), tmp_path / "t", model_card(spec, 10, 1, 16, (0.0,), (0.5,)))

    summary = run_pseudo_label(
        str(tmp_path / "t"), urls, str(tmp_path / "pl"), PseudoLabelConfig(topk=3), 1, LabelResources(threads=1)
    )
    rows = pq.read_table(summary["sidecars"]).to_pydict()
    expected = sorted(s["__key__"] for p in local for s in iter_raw_samples(str(p)))
    assert sorted(rows["key"]) == expected, "every s3 sample labeled exactly once"
    assert set(rows["shard"]) == set(urls)


def test_a_missing_s3_shard_is_named(s3_bucket):
    fs, bucket = s3_bucket
    with pytest.raises(DataError, match=rf"s3://{bucket}/unlabeled/nope-000000.tar"):
        list(iter_raw_samples(f"s3://{bucket}/unlabeled/nope-000000.tar"))


def test_rounds_and_download_from_s3(finished_run, s3_bucket, tmp_path, capsys):
    """Rounds published to s3:// (``publish:``) are listed and downloaded from there, sha256-verified."""
    from pipeline.run_store import publish_round

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
    from pipeline.run_store import RunStore

    cfg, run_dir, _ = finished_run
    store = RunStore(run_dir.name, cfg.publish)
    assert store.status()["status"] == "finished"
    assert [p.name for p in store.download(tmp_path / "dl", all_rounds=True)] == ["round-000", "round-001"]


def test_object_store_storage_is_refused_with_the_way_out(tiny_config):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"storage: 's3://b/runs' is an object-store URL.*publish: s3://b/runs"):
        tiny_config("storage=s3://b/runs")
