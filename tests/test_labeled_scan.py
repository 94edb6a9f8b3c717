"""The labeled, test and validation splits as the driver holds them: keys, labels and pixel digests, never images;
scanned once per shard identity (a resume reads the cache), in Ray tasks or in process with the same result."""

from __future__ import annotations

import os

import numpy as np
import pytest

import stages.data.labeled_scan
from pipeline.distributed.executor import RayExecutor
from stages.core.errors import DataError
from stages.core.stage import InProcess
from stages.data.contamination import image_digest
from stages.data.labeled_scan import LabeledIndex, scan_or_cached, scan_split
from stages.data.shards import expand_shards, load_labeled, write_shards
from stages.data_check import scan_labeled_splits


def test_the_index_holds_what_a_decoded_split_would_give(digits_root):
    shards = expand_shards([f"{digits_root}/labeled/*.tar"])
    index, loaded = scan_split(shards, 10, 1), load_labeled(shards, 10, 1)
    assert index.keys == loaded.keys and (index.labels == loaded.labels).all()
    assert index.digests == [image_digest(im) for im in loaded.images]
    assert not hasattr(index, "images")
    assert index.shards_holding() == shards  # every shard holds some rows
    part = index.take([3, 0])
    assert part.keys == [index.keys[3], index.keys[0]] and part.shards_holding() == [shards[0]]


def test_a_resume_reads_the_cache_and_a_rewritten_shard_is_scanned_again(digits_root, tmp_path, monkeypatch):
    shard = expand_shards([f"{digits_root}/labeled/*.tar"])[0]
    copy = tmp_path / "labeled-000000.tar"
    copy.write_bytes(open(shard, "rb").read())
    first = scan_or_cached(str(copy), 10, 1, str(tmp_path / "cache"))
    assert not first.cached
    scans = []
    real = stages.data.labeled_scan.scan_labeled_shard
    monkeypatch.setattr(stages.data.labeled_scan, "scan_labeled_shard", lambda *a: scans.append(a) or real(*a))
    again = scan_or_cached(str(copy), 10, 1, str(tmp_path / "cache"))
    assert again.cached and scans == []
    assert again.keys == first.keys and (again.labels == first.labels).all() and again.digests == first.digests
    assert not scan_or_cached(str(copy), 10, 3, str(tmp_path / "cache")).cached  # other channels: other pixels
    stat = os.stat(copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten (same size)
    assert not scan_or_cached(str(copy), 10, 1, str(tmp_path / "cache")).cached and len(scans) == 2
    with pytest.raises(DataError, match=r"class [0-9], outside \[0, 5\)"):  # a smaller class count: no stale pass
        scan_or_cached(str(copy), 5, 1, str(tmp_path / "cache"))


def test_ray_tasks_give_the_same_index_and_errors_name_the_split(ray_session, digits_root, tmp_path):
    labeled = expand_shards([f"{digits_root}/labeled/*.tar"])
    test = expand_shards([f"{digits_root}/test/*.tar"])
    splits = {"data.labeled": labeled, "data.test": test}
    inline = scan_labeled_splits(splits, 10, 1, 0.0, "", InProcess(False))
    tasks = scan_labeled_splits(splits, 10, 1, 0.0, str(tmp_path / "c"), RayExecutor(False))
    for name in splits:
        a, b = inline[name], tasks[name]
        assert isinstance(b, LabeledIndex) and a.keys == b.keys and a.digests == b.digests
        assert (a.shard == b.shard).all() and a.shards == b.shards
    empty = write_shards([], tmp_path / "e", "empty", 1)
    bad = write_shards([{"__key__": "x", "png": b"not a png", "cls": b"1"}], tmp_path / "b", "bad", 1)
    with pytest.raises(DataError, match=r"^data.test: shard .*empty-000000.tar holds no samples"):
        scan_labeled_splits({"data.test": empty}, 10, 1, 0.0, "", RayExecutor(False))
    with pytest.raises(DataError, match=r"^data.labeled: no usable samples in 1 read"):
        scan_labeled_splits({"data.labeled": bad}, 10, 1, 1.0, "", RayExecutor(False))
    with pytest.raises(DataError, match=r"^data.labeled: 1 of \d+ samples unusable"):
        scan_labeled_splits({"data.labeled": [*labeled[:1], *bad]}, 10, 1, 0.0, "", RayExecutor(False))
    assert np.array_equal(np.unique(inline["data.test"].labels), np.arange(10))
