"""The contamination guard (stages/data/contamination.py, stages/data_check.py): test images in the
training
data are found by their decoded pixels and refused with one line; unlabeled duplicates are counted in bounded memory."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.distributed.executor import RayExecutor
from stages.core.errors import DataError
from stages.core.stage import InProcess
from stages.data.contamination import DuplicateCounter, image_digest
from stages.data.labeled_scan import scan_split
from stages.data.shards import decode_image, expand_shards, iter_raw_samples, write_shards
from stages.data_check import CheckSettings, check_data, scan_data


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_the_digest_sees_through_re_encoding_but_not_a_changed_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    image = Image.fromarray(pixels)
    same = {
        "png level 0": _encode(image, "PNG", compress_level=0),
        "png level 9": _encode(image, "PNG", compress_level=9),
        "lossless webp": _encode(image, "WEBP", lossless=True),
        "rgb png": _encode(image.convert("RGB"), "PNG"),
        "opaque rgba png": _encode(image.convert("RGBA"), "PNG"),
        "16-bit png": _encode(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG"),
    }
    digest = image_digest(decode_image(same["png level 0"], 1))
    assert len(set(same.values())) == len(same)  # the files all differ ...
    for name, data in same.items():
        assert image_digest(decode_image(data, 1)) == digest, name  # ... the decoded pixels do not
    changed = pixels.copy()
    changed[0, 0] ^= 1
    assert image_digest(Image.fromarray(changed)) != digest
    assert image_digest(Image.fromarray(pixels.reshape(4, 16))) != digest  # same bytes, another shape


def test_duplicates_are_exact_under_the_limit_and_a_consistent_sample_above_it():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    shards = [np.concatenate([distinct[:2000], distinct[:300]]), np.concatenate([distinct[2000:], distinct[:100]])]
    exact = DuplicateCounter()
    for i, hashes in enumerate(shards):
        exact.add(hashes, i)
    found = exact.result(["a.tar", "b.tar"])
    assert (found["duplicates"], found["duplicate_groups"], found["duplicates_exact"]) == (400, 300, True)
    first = found["duplicate_examples"][0]
    assert first[0].startswith("a.tar#") and len(first) in (2, 3)
    sampled = DuplicateCounter(limit=1000)  # 4,400 hashes: the sample halves until at most 1,000 stay
    for i, hashes in enumerate(shards):
        sampled.add(hashes, i)
    estimate = sampled.result(["a.tar", "b.tar"])
    assert not estimate["duplicates_exact"] and estimate["duplicates_sampled_fraction"] <= 0.25
    assert sampled.stored <= 1000 and 200 <= estimate["duplicates"] <= 800  # copies stay together in the sample


def _samples(shards) -> list[dict]:
    """Raw samples without webdataset's ``__url__``, ready for ``write_shards``."""
    return [{k: v for k, v in s.items() if k != "__url__"} for shard in shards for s in iter_raw_samples(str(shard))]


@pytest.fixture
def contaminated(digits_root, tmp_path):
    """Digits shards with 2 test images re-encoded into the labeled set, 1 into the unlabeled set, and 2 extra copies
    of one unlabeled image: ``(labeled_shards, unlabeled_shards, test_shards, test_keys)``."""
    test_shards = expand_shards([f"{digits_root}/test/*.tar"])
    tests = _samples(test_shards)[:3]
    webp = [_encode(decode_image(t["png"], 1), "WEBP", lossless=True) for t in tests]
    labeled = _samples(sorted((digits_root / "labeled").glob("*.tar")))
    labeled += [{"__key__": f"leak-{i}", "webp": webp[i], "cls": tests[i]["cls"]} for i in range(2)]
    unlabeled = _samples(sorted((digits_root / "unlabeled").glob("*.tar"))[:1])
    unlabeled += [{"__key__": "leak-u", "webp": webp[2]}]
    unlabeled += [{"__key__": f"copy-{i}", "png": unlabeled[5]["png"]} for i in (1, 2)]
    return (
        write_shards(labeled, tmp_path / "l", "labeled", 2),
        write_shards(unlabeled, tmp_path / "u", "unlabeled", 3),
        test_shards,
        [t["__key__"] for t in tests],
    )


def _check(shards, tiny_config, allow=False, **kwargs):
    labeled_shards, unlabeled_shards, test_shards, _ = shards
    settings = CheckSettings(1, allow)
    labeled, test = scan_split(labeled_shards, 10, 1), scan_split(test_shards, 10, 1)
    split = {"labeled": labeled_shards, "unlabeled": unlabeled_shards, "test": test_shards}
    return check_data(settings, labeled, test, split, InProcess(False), **kwargs)


def test_test_images_in_the_training_data_are_refused_with_one_line(contaminated, tiny_config):
    with pytest.raises(DataError) as info:
        _check(contaminated, tiny_config)
    message = str(info.value)
    print(f"\ninjected: 2 test images (lossless WebP) into labeled, 1 into unlabeled\nobserved: {message}")
    assert "\n" not in message and "3 training image(s)" in message and "labeled 2, unlabeled 1" in message
    assert f"leak-0 = test {contaminated[3][0]}" in message and "data.allow_test_overlap: true" in message


def test_allowed_overlap_and_unlabeled_duplicates_are_reported(contaminated, tiny_config, caplog):
    report = _check(contaminated, tiny_config, allow=True)
    lab, unl = report["labeled"], report["unlabeled"]
    print(f"\nobserved: labeled {lab}\nobserved: unlabeled {unl}")
    assert (lab["in_test"], lab["images"]) == (2, 102)
    assert lab["examples"] == [["leak-0", contaminated[3][0]], ["leak-1", contaminated[3][1]]]
    assert (unl["in_test"], unl["examples"]) == (1, [["leak-u", contaminated[3][2]]])
    assert (unl["duplicates"], unl["duplicate_groups"], unl["duplicates_exact"]) == (2, 1, True)
    assert len(unl["duplicate_examples"][0]) == 3
    assert "test top-1 is optimistic" in caplog.text and "repeat another unlabeled image" in caplog.text


def test_the_ray_task_scan_equals_the_in_process_scan(ray_session, contaminated, tiny_config):
    labeled_shards, unlabeled_shards, test_shards, _ = contaminated
    labeled, test = scan_split(labeled_shards, 10, 1), scan_split(test_shards, 10, 1)
    inline = scan_data(1, labeled, test, unlabeled_shards, InProcess(False))
    tasks = scan_data(1, labeled, test, unlabeled_shards, RayExecutor(False))
    assert (inline["ran_as"], tasks["ran_as"]) == ("in-process", "ray")
    assert tasks["unlabeled"] == inline["unlabeled"] and tasks["labeled"] == inline["labeled"]


def test_a_resume_reuses_the_check_until_a_shard_changes(contaminated, tiny_config, monkeypatch):
    import stages.data_check

    first = _check(contaminated, tiny_config, allow=True)
    monkeypatch.setattr(stages.data_check, "scan_data", lambda *a, **k: pytest.fail("scanned again"))
    assert _check(contaminated, tiny_config, allow=True, previous=first) is first
    with pytest.raises(DataError):  # the record is reused, the policy is applied afresh
        _check(contaminated, tiny_config, previous=first)
    shard = Path(contaminated[1][0])
    stat = shard.stat()
    shard.touch()
    assert shard.stat().st_mtime_ns != stat.st_mtime_ns
    with pytest.raises(pytest.fail.Exception, match="scanned again"):
        _check(contaminated, tiny_config, allow=True, previous=first)


def test_the_digits_default_passes_the_check(digits_root, tiny_config):
    """Measured: no test image of the digits split appears in labeled or unlabeled, and no unlabeled image repeats
    (load_digits' 1,797 images are pairwise distinct); the scan takes well under a second."""
    data = tiny_config().data
    split = {name: expand_shards(getattr(data, name)) for name in ("labeled", "unlabeled", "test")}
    labeled, test = scan_split(split["labeled"], 10, 1), scan_split(split["test"], 10, 1)
    start = time.perf_counter()
    report = check_data(CheckSettings(1), labeled, test, split, InProcess(False))
    lab, unl = report["labeled"], report["unlabeled"]
    print(f"\nobserved: digits check in {time.perf_counter() - start:.2f} s: labeled {lab}, unlabeled {unl}")
    assert report["test"] == {"images": 360, "distinct": 360} and report["ran_as"] == "in-process"
    assert (lab["in_test"], unl["in_test"], unl["duplicates"], unl["images"]) == (0, 0, 0, 1237)


def test_the_cli_refuses_the_run_with_one_line_and_makes_no_run_folder(
    ray_session, contaminated, tiny_config, tmp_path, capsys
):
    from pipeline.cli import main
    from pipeline.config import dump_config

    names = ("labeled", "unlabeled", "test")
    splits = [f"data.{name}=[{','.join(shards)}]" for name, shards in zip(names, contaminated[:3], strict=True)]
    config = tmp_path / "leaky.yaml"
    config.write_text(dump_config(tiny_config(*splits)))  # tiny_config's storage is tmp_path / "runs"
    assert main(["iterate", "--config", str(config), "--run", "leaky", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: 3 training image(s) have the same decoded pixels as a test image"), line
    assert not (tmp_path / "runs" / "leaky").exists()  # the storage holds only the scans' cache (.scan-cache)
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {".scan-cache"}


def test_duplicate_examples_do_not_depend_on_the_order_shards_finish_in():
    """Ray tasks finish in any order: the reported groups and their members are in shard order regardless."""
    hashes = {
        0: np.array([7, 1, 2], dtype=np.uint64),
        1: np.array([3, 7], dtype=np.uint64),
        2: np.array([7, 3], dtype=np.uint64),
    }
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        counter = DuplicateCounter()
        for shard in order:
            counter.add(hashes[shard], shard)
        results.append(counter.result(["a", "b", "c"]))
    assert results[0] == results[1] == results[2]
    assert results[0]["duplicate_examples"] == [["b#0", "c#1"], ["a#0", "b#1", "c#0"]]
    assert results[0]["duplicates"] == 3
