"""``bench/scale.py``'s pure parts: its shards are written once per setting and reused, the config it writes is
one ``load_config`` accepts (one round, one epoch each, a fixed K), and its byte ratios. No pipeline run here: the
bench runs a real round, minutes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from stages.data.shards import expand_shards, iter_raw_samples

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"labeled": 12, "unlabeled": 20, "test": 6}


@pytest.fixture(scope="module")
def scale():
    saved = list(sys.path)  # the bench scripts reorder sys.path for their own imports
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = saved
    return module


def test_shards_are_written_once_per_setting_and_reused(scale, tmp_path, monkeypatch):
    first = scale.ensure_shards(tmp_path, SIZES, 16, 3, per_shard=8)
    assert {s: len(p) for s, p in first.items()} == {"labeled": 2, "unlabeled": 3, "test": 1}
    labeled, unlabeled = next(iter_raw_samples(first["labeled"][0])), next(iter_raw_samples(first["unlabeled"][0]))
    assert set(labeled) - {"__key__", "__url__"} == {"jpg", "cls"}
    assert set(unlabeled) - {"__key__", "__url__"} == {"jpg"}
    assert labeled["jpg"] != unlabeled["jpg"] != next(iter_raw_samples(first["test"][0]))["jpg"]  # own seeds
    stamps = {p: os.stat(p).st_mtime_ns for paths in first.values() for p in paths}

    def written_again(*args):
        raise AssertionError(f"shard written again: {args[0]}")

    monkeypatch.setitem(scale.make_shards.__globals__, "_write_shard", written_again)
    assert scale.ensure_shards(tmp_path, SIZES, 16, 3, per_shard=8) == first
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    monkeypatch.undo()
    bigger = scale.ensure_shards(tmp_path, {**SIZES, "unlabeled": 24}, 16, 3, per_shard=8)
    assert bigger["labeled"] == first["labeled"] and bigger["test"] == first["test"]
    assert Path(bigger["unlabeled"][0]).parent != Path(first["unlabeled"][0]).parent  # a folder per setting
    assert all(os.path.exists(p) for p in first["unlabeled"])


def test_the_config_is_valid_one_round_of_one_epoch_each_with_a_fixed_k(scale, tmp_path):
    shards = scale.ensure_shards(tmp_path / "data", SIZES, 16, 3, per_shard=8)
    tree = scale.scale_tree(shards, tmp_path / "runs", 16, 3, "resnet10t", 4)
    cfg = load_config(scale.write_config(tree, [], tmp_path / "scale.yaml"))
    data = cfg.data
    assert (cfg.rounds, data.channels, data.image_size, data.num_classes) == (1, 3, 16, 3)
    assert expand_shards(data.labeled) == shards["labeled"] and expand_shards(data.test) == shards["test"]
    assert expand_shards(data.unlabeled) == shards["unlabeled"]
    assert not data.has_validation and data.prepare_digits == "" and data.augment == "digits"
    for part in (cfg.teacher, cfg.student):
        assert (part.epochs, part.min_steps, part.max_steps) == (1, 0, 0)
    assert (cfg.select.per_class, cfg.select.floor) == (4, 0.0)
    assert [cfg.spec(r).model for r in (0, 1)] == ["resnet10t", "resnet10t"]
    assert cfg.robustness.corruptions == ()
    assert cfg.storage == str(tmp_path / "runs")

    changed = load_config(scale.write_config(tree, ["student.epochs=2"], tmp_path / "other.yaml"))
    assert changed.student.epochs == 2
    with pytest.raises(SystemExit, match="one round"):
        scale.write_config(tree, ["rounds=2"], tmp_path / "two.yaml")


def test_byte_figures_sum_the_epochs_and_divide_read_by_trained(scale):
    keys = ("labeled_read_bytes", "labeled_trained_bytes", "pseudo_read_bytes", "pseudo_trained_bytes")
    rows = [dict(zip(keys, (300, 100, 1000, 50), strict=True)), dict(zip(keys, (100, 100, 200, 50), strict=True))]
    figures = scale.byte_figures(rows)
    assert figures["labeled_read_bytes"] == 400 and figures["pseudo_trained_bytes"] == 100
    assert (figures["labeled_ratio"], figures["pseudo_ratio"], figures["all_ratio"]) == (2.0, 12.0, 5.333)
    assert scale.byte_figures([{"labeled_read_bytes": 5, "labeled_trained_bytes": 5}])["pseudo_ratio"] is None
