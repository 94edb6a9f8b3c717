"""stages/data/shards.py and stages/data/digits.py: shard patterns and ids, decoding, labels, damaged shards, the digits
split."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import BadSample, DataError
from stages.data.digits import split_digits
from stages.data.shards import (
    decode_image,
    expand_shards,
    image_field,
    iter_raw_samples,
    load_labeled,
    parse_label,
    write_shards,
)
from stages.storage.layout import shard_id


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _png(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    return _encode(Image.new("L", size, value), "PNG")


def _labeled_samples(n: int, prefix: str = "s") -> list[dict]:
    return [{"__key__": f"{prefix}{i:04d}", "png": _png(i), "cls": str(i % 10).encode()} for i in range(n)]


# ---------------------------------------------------------------- expand_shards


def test_brace_pattern_expands_in_order(digits_root):
    shards = expand_shards([f"{digits_root}/labeled/labeled-{{000000..000003}}.tar"])
    assert shards == [f"{digits_root}/labeled/labeled-{i:06d}.tar" for i in range(4)]


def test_glob_expands_sorted_and_duplicates_are_dropped(digits_root):
    expected = [f"{digits_root}/test/test-{i:06d}.tar" for i in range(4)]
    # The same shards named twice (a glob and a brace pattern) must not be read twice.
    shards = expand_shards([f"{digits_root}/test/*.tar", f"{digits_root}/test/test-{{000001..000002}}.tar"])
    assert shards == expected


def test_file_url_prefix_is_accepted(digits_root):
    assert expand_shards([f"file://{digits_root}/test/test-000000.tar"]) == [f"{digits_root}/test/test-000000.tar"]


def test_patterns_written_out_of_order_come_back_sorted(digits_root):
    shards = expand_shards([f"{digits_root}/labeled/labeled-{{000003,000000}}.tar"])
    assert shards == sorted(shards)


@pytest.mark.parametrize("pattern", ["nothing-here-*.tar", "missing-{000000..000003}.tar", "missing.tar"])
def test_a_pattern_matching_nothing_is_an_error_naming_it(tmp_path, digits_root, pattern):
    full = f"{tmp_path}/{pattern}"
    with pytest.raises(DataError) as info:
        # the first pattern matches: the error must still name the one that does not
        expand_shards([f"{digits_root}/test/*.tar", full], what="test")
    assert full in str(info.value)
    assert str(info.value).startswith("test:")


def test_a_brace_pattern_with_a_missing_shard_is_an_error(digits_root):
    with pytest.raises(DataError, match="000004"):
        expand_shards([f"{digits_root}/labeled/labeled-{{000000..000004}}.tar"])


def test_a_brace_alternative_whose_glob_matches_nothing_is_an_error(digits_root):
    pattern = f"{digits_root}/{{labeled,nowhere}}/*.tar"
    with pytest.raises(DataError, match="nowhere") as info:
        expand_shards([pattern], what="labeled")
    assert pattern in str(info.value) and str(info.value).startswith("labeled:")


def test_object_store_urls_are_kept_unchecked_and_sorted():
    # listing a bucket needs credentials: URLs are checked when a shard is opened, not here
    assert expand_shards(["s3://bucket/u-{000002,000000,000002}.tar"]) == [
        "s3://bucket/u-000000.tar",
        "s3://bucket/u-000002.tar",
    ]


# ---------------------------------------------------------------- shard_id


def test_shard_id_is_stable():
    # Sidecars are named by shard id; a change orphans every existing pseudo-label file on resume.
    assert shard_id("/data/a/train-000001.tar") == "train-000001-d7886940"
    assert shard_id("/data/a/train-000001.tar") == shard_id("/data/a/train-000001.tar")


def test_shard_id_differs_for_the_same_basename_in_different_folders():
    ids = {shard_id(f"/data/{d}/train-000001.tar") for d in ("a", "b")} | {shard_id("s3://bucket/train-000001.tar")}
    assert len(ids) == 3
    assert all(i.startswith("train-000001-") for i in ids)


def test_shard_id_is_file_name_safe():
    sid = shard_id("s3://bucket/a b/x y?.tar")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", sid), sid
    assert not sid.endswith(".tar")


# ---------------------------------------------------------------- decode_image

W, H = 7, 13  # odd sizes catch width/height swaps
RGB = (10, 200, 30)
GRAY_OF_RGB = 124  # ITU-R 601-2 luma as PIL computes it: (10*299 + 200*587 + 30*114) / 1000 = 123.81 -> 124


def _palette_image() -> Image.Image:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, *RGB] + [0] * (3 * 254))
    return image


# (source image, formats, expected L value, expected RGB value); lossy formats get a tolerance below.
DECODE_CASES = {
    "L": (lambda: Image.new("L", (W, H), 77), ("PNG", "JPEG", "WEBP"), 77, (77, 77, 77)),
    "RGB": (lambda: Image.new("RGB", (W, H), RGB), ("PNG", "JPEG", "WEBP"), GRAY_OF_RGB, RGB),
    "RGBA": (lambda: Image.new("RGBA", (W, H), (*RGB, 255)), ("PNG", "WEBP"), GRAY_OF_RGB, RGB),
    "LA": (lambda: Image.new("LA", (W, H), (77, 255)), ("PNG",), 77, (77, 77, 77)),
    "P": (_palette_image, ("PNG",), GRAY_OF_RGB, RGB),
    "1": (lambda: Image.new("1", (W, H), 1), ("PNG",), 255, (255, 255, 255)),
    # 16-bit data is scaled, not clipped: 200 * 257 is 8-bit 200 on the 16-bit scale.
    "I;16": (lambda: Image.new("I;16", (W, H), 200 * 257), ("PNG",), 200, (200, 200, 200)),
}


def _transparent_palette_image() -> Image.Image:
    image = _palette_image()
    image.info["transparency"] = 1  # palette entry 1 (the RGB colour) is fully transparent
    return image


# (source image, formats, expected L value, expected RGB value) after compositing onto black
ALPHA_CASES = {
    "RGBA-transparent": (lambda: Image.new("RGBA", (W, H), (*RGB, 0)), ("PNG", "WEBP"), 0, (0, 0, 0)),
    "RGBA-half": (lambda: Image.new("RGBA", (W, H), (200, 100, 50, 128)), ("PNG",), 62, (100, 50, 25)),
    "LA-half": (lambda: Image.new("LA", (W, H), (200, 128)), ("PNG",), 100, (100, 100, 100)),
    "P-transparency": (_transparent_palette_image, ("PNG",), 0, (0, 0, 0)),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "case, fmt",
    [(case, fmt) for case, (_, fmts, _, _) in (DECODE_CASES | ALPHA_CASES).items() for fmt in fmts],
)
def test_decode_converts_any_mode_to_l_or_rgb(case, fmt, channels):
    """Every mode becomes L or RGB; 16-bit is scaled, transparency is composited onto black."""
    make, _, gray, rgb = (DECODE_CASES | ALPHA_CASES)[case]
    image = decode_image(_encode(make(), fmt), channels)
    assert image.mode == ("L" if channels == 1 else "RGB")
    assert image.size == (W, H)
    expected = np.array(gray if channels == 1 else rgb, dtype=float)
    tolerance = 3 if fmt == "JPEG" else 1
    np.testing.assert_allclose(np.asarray(image, dtype=float)[H - 1, W - 1], expected, atol=tolerance)


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_scales_16_bit_png_to_8_bit(channels):
    image = decode_image(_encode(Image.new("I;16", (W, H), 40000), "PNG"), channels)
    # 40000 / 65535 * 255 = 155.6; 40000 >> 8 = 156
    assert abs(int(np.asarray(image).reshape(-1)[0]) - 156) <= 1


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", _png(5)[:40], b"\x89PNG\r\n\x1a\n" + b"\0" * 64],
    ids=["empty", "text", "truncated-png", "png-signature-only"],
)
def test_undecodable_bytes_are_a_bad_sample(data):
    with pytest.raises(BadSample, match="undecodable"):
        decode_image(data, 1)


def test_a_sample_without_an_image_is_a_bad_sample():
    with pytest.raises(BadSample, match="no image"):
        image_field({"__key__": "k", "cls": b"3", "txt": b"hello"})
    assert image_field({"__key__": "k", "jpeg": b"J"}) == b"J"
    assert image_field({"__key__": "k", "webp": b"W"}) == b"W"


# ---------------------------------------------------------------- parse_label


def test_parse_label_reads_text_classes():
    assert parse_label({"cls": b"7"}, 10) == 7
    assert parse_label({"cls": b" 3\n"}, 10) == 3
    assert parse_label({"cls": b"0"}, 10) == 0


@pytest.mark.parametrize("raw", [b"10", b"-1", b"99"])
def test_out_of_range_label_is_a_data_error_not_a_skip(raw):
    with pytest.raises(DataError, match=r"class -?\d+, outside \[0, 10\)") as info:
        parse_label({"__key__": "k1", "__url__": "shard-a.tar", "cls": raw}, 10)
    assert "shard-a.tar" in str(info.value) and "k1" in str(info.value)


@pytest.mark.parametrize("sample", [{"cls": b"three"}, {"cls": b""}, {}], ids=["text", "empty", "missing"])
def test_unparsable_or_missing_label_is_a_bad_sample(sample):
    with pytest.raises(BadSample):
        parse_label(sample, 10)


# ---------------------------------------------------------------- load_labeled


def test_load_labeled_reads_the_digits_labeled_split(digits_root):
    shards = expand_shards([f"{digits_root}/labeled/*.tar"])
    data = load_labeled(shards, num_classes=10, channels=1)
    assert len(data) == 100 and data.skipped == []
    assert np.bincount(data.labels, minlength=10).tolist() == [10] * 10
    assert {im.mode for im in data.images} == {"L"} and {im.size for im in data.images} == {(8, 8)}
    assert len(set(data.keys)) == 100


def _shard_with_bad(tmp_path: Path, good: int) -> str:
    samples = _labeled_samples(good)
    samples.insert(3, {"__key__": "broken", "png": b"not a png", "cls": b"1"})
    return write_shards(samples, tmp_path, "mixed", 1)[0]


def test_load_labeled_counts_skips_within_the_allowed_fraction(tmp_path):
    shard = _shard_with_bad(tmp_path, good=9)  # 1 bad of 10 read = exactly 0.1
    data = load_labeled([shard], 10, 1, max_bad_fraction=0.1)
    assert len(data) == 9
    assert [(s["key"], s["shard"]) for s in data.skipped] == [("broken", shard)]
    assert "undecodable" in data.skipped[0]["reason"]
    assert data.labels.tolist() == [i % 10 for i in range(9)]


def test_load_labeled_fails_above_the_allowed_fraction(tmp_path):
    shard = _shard_with_bad(tmp_path, good=9)
    with pytest.raises(DataError, match=r"1 of 10 samples unusable") as info:
        load_labeled([shard], 10, 1, max_bad_fraction=0.05, what="labeled")
    assert "broken" in str(info.value)


def test_load_labeled_refuses_an_out_of_range_class(tmp_path):
    samples = _labeled_samples(4)
    samples[2]["cls"] = b"12"
    shard = write_shards(samples, tmp_path, "range", 1)[0]
    with pytest.raises(DataError, match="class 12") as info:
        load_labeled([shard], 10, 1, max_bad_fraction=1.0)
    assert shard in str(info.value)


def test_a_labeled_set_missing_a_class_is_a_warning_with_counts(digits_root, tmp_path, tiny_config, caplog):
    from pipeline.rounds import preflight

    shards = sorted((digits_root / "labeled").glob("*.tar"))
    no_sevens = [s for p in shards for s in iter_raw_samples(str(p)) if s["cls"] != b"7"]
    shard = write_shards([{k: v for k, v in s.items() if k != "__url__"} for s in no_sevens], tmp_path, "no7", 1)[0]
    preflight(tiny_config(f"data.labeled=[{shard}]"), progress=False)  # a warning, not an error: the run may go on
    assert "no samples of class(es) [7]" in caplog.text
    assert "per-class counts: [10, 10, 10, 10, 10, 10, 10, 0, 10, 10]" in caplog.text


def test_an_empty_shard_is_a_data_error(tmp_path, digits_root):
    good = f"{digits_root}/labeled/labeled-000000.tar"
    empty = write_shards([], tmp_path, "empty", 1)[0]  # a valid tar with no members
    with pytest.raises(DataError) as info:
        load_labeled([good, empty], 10, 1)
    assert empty in str(info.value)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(zero))):
        load_labeled([str(zero)], 10, 1)


# ---------------------------------------------------------------- damaged shards


def _truncated(src: str, dst: Path, cut: int) -> str:
    data = Path(src).read_bytes()
    dst.write_bytes(data[:cut])
    return str(dst)


def test_a_shard_cut_inside_a_member_is_a_data_error_naming_it(tmp_path, digits_root):
    src = f"{digits_root}/labeled/labeled-000000.tar"
    shard = _truncated(src, tmp_path / "cut.tar", 1024 * 10 + 700)  # 700 bytes into the 11th member: in its data
    seen = []
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        seen.extend(s["__key__"] for s in iter_raw_samples(shard))
    assert shard in str(info.value)
    assert len(seen) >= 4  # the samples before the damage were yielded
    with pytest.raises(DataError, match=re.escape(shard)):
        load_labeled([shard], 10, 1)


def test_a_shard_cut_in_half_is_a_data_error_naming_it(tmp_path, digits_root):
    src = f"{digits_root}/labeled/labeled-000000.tar"
    shard = _truncated(src, tmp_path / "half.tar", Path(src).stat().st_size // 2)
    with pytest.raises(DataError, match=re.escape(shard)):
        list(iter_raw_samples(shard))


def _member_offsets(src: str) -> list[int]:
    with tarfile.open(src) as tar:
        return [m.offset for m in tar.getmembers()]


def _member_end(src: str) -> int:
    """Where the end-of-archive blocks start: after the last member's padded data."""
    with tarfile.open(src) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("where", ["member-boundary", "inside-header", "after-one-zero-block", "no-end-blocks"])
def test_a_shard_cut_anywhere_before_its_end_blocks_is_a_data_error(tmp_path, digits_root, where):
    src = f"{digits_root}/labeled/labeled-000000.tar"
    offsets = _member_offsets(src)
    end = _member_end(src)  # where the first end-of-archive block starts
    cut = {
        "member-boundary": offsets[6],
        "inside-header": offsets[6] + 100,
        "after-one-zero-block": end + 512,
        "no-end-blocks": end,
    }[where]
    shard = _truncated(src, tmp_path / f"{where}.tar", cut)
    with pytest.raises(DataError, match=re.escape(shard)):
        list(iter_raw_samples(shard))


def test_a_damaged_header_mid_shard_is_a_data_error(tmp_path, digits_root):
    src = f"{digits_root}/labeled/labeled-000000.tar"
    data = bytearray(Path(src).read_bytes())
    data[_member_offsets(src)[6] + 148] ^= 0xFF  # the header checksum: tarfile would stop there quietly
    shard = tmp_path / "damaged.tar"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(shard))):
        list(iter_raw_samples(str(shard)))


def test_a_whole_shard_reads_completely_also_gzipped_and_through_a_file_url(tmp_path, digits_root):
    src = f"{digits_root}/labeled/labeled-000000.tar"
    keys = [s["__key__"] for s in iter_raw_samples(src)]
    assert len(keys) == 25
    gz = tmp_path / "labeled.tar.gz"
    gz.write_bytes(gzip.compress(Path(src).read_bytes()))
    assert [s["__key__"] for s in iter_raw_samples(str(gz))] == keys
    assert [s["__key__"] for s in iter_raw_samples(f"file://{src}")] == keys


def test_write_shards_is_byte_identical_for_identical_input(tmp_path):
    samples = _labeled_samples(7)
    a = write_shards(samples, tmp_path / "a", "x", 3)
    b = write_shards(samples, tmp_path / "b", "x", 3)
    assert [Path(p).name for p in a] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    keys = [s["__key__"] for p in a for s in iter_raw_samples(p)]
    assert keys == [s["__key__"] for s in samples]  # contiguous chunks, order kept
    assert not list((tmp_path / "a").glob("*.tmp"))


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_split():
    return split_digits(seed=0)


def test_digits_split_sizes(digits_split):
    s = digits_split
    assert (len(s.labeled_x), len(s.unlabeled_x), len(s.test_x), len(s.val_x)) == (100, 1237, 360, 100)
    assert len(s.labeled_y) == 100 and len(s.unlabeled_y) == 1237 and len(s.test_y) == 360 and len(s.val_y) == 100
    assert s.labeled_x.shape[1:] == (8, 8) and s.labeled_x.dtype == np.uint8
    assert s.labeled_x.max() == 255  # 0..16 scaled to 0..255


def test_digits_split_is_stratified(digits_split):
    test_counts = np.bincount(digits_split.test_y, minlength=10)
    assert np.all(np.abs(test_counts - 36) <= 1), test_counts
    assert np.bincount(digits_split.labeled_y, minlength=10).tolist() == [10] * 10
    assert np.bincount(digits_split.val_y, minlength=10).tolist() == [10] * 10


def test_digits_validation_split_leaves_labeled_and_test_where_they_were(digits_split):
    """The val split is drawn from the former unlabeled pool: labeled and test are the earlier split's images."""
    without_val = split_digits(seed=0, val_per_class=0)
    for name in ("labeled_x", "labeled_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(digits_split, name), getattr(without_val, name))
    assert len(without_val.unlabeled_x) == 1337 and len(without_val.val_x) == 0


def test_digits_split_is_deterministic(digits_split):
    again = split_digits(seed=0)
    for name in ("labeled_x", "labeled_y", "unlabeled_x", "unlabeled_y", "test_x", "test_y", "val_x", "val_y"):
        np.testing.assert_array_equal(getattr(digits_split, name), getattr(again, name))
    other = split_digits(seed=1)
    assert not np.array_equal(other.labeled_x, digits_split.labeled_x)


def test_digits_splits_do_not_share_an_image(monkeypatch):
    # The real digits data has duplicate images, so comparing pixels cannot prove the split is disjoint. Replace
    # the images by ones that encode their own index (base 17 in the first three pixels; 0..16 is the real range)
    # and keep the real labels, so stratification behaves exactly as on the real data.
    import sklearn.datasets

    real = sklearn.datasets.load_digits()
    n = len(real.target)
    images = np.zeros((n, 8, 8))
    for i in range(n):
        images[i, 0, :3] = (i // 289, (i // 17) % 17, i % 17)

    class Fake:
        pass

    fake = Fake()
    fake.images, fake.target = images, real.target
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: fake)
    s = split_digits(seed=0)

    def indices(xs):
        d = np.rint(xs[:, 0, :3].astype(float) * 16 / 255).astype(int)
        return d[:, 0] * 289 + d[:, 1] * 17 + d[:, 2]

    lab, unl, tst, val = indices(s.labeled_x), indices(s.unlabeled_x), indices(s.test_x), indices(s.val_x)
    assert len(set(lab)) == 100 and len(set(unl)) == 1237 and len(set(tst)) == 360 and len(set(val)) == 100
    parts = [set(lab), set(unl), set(tst), set(val)]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    assert set(lab) | set(unl) | set(tst) | set(val) == set(range(n))
    # labels travel with their images
    np.testing.assert_array_equal(s.labeled_y, real.target[lab])
    np.testing.assert_array_equal(s.test_y, real.target[tst])
    np.testing.assert_array_equal(s.val_y, real.target[val])


def test_write_digits_shards_layout_and_labels(digits_root, digits_split):
    for split, n in (("labeled", 100), ("unlabeled", 1237), ("test", 360), ("val", 100)):
        shards = sorted((digits_root / split).glob("*.tar"))
        assert [p.name for p in shards] == [f"{split}-{i:06d}.tar" for i in range(4)]
        samples = [s for p in shards for s in iter_raw_samples(str(p))]
        assert len(samples) == n
        assert all(("cls" in s) == (split != "unlabeled") for s in samples), f"{split}: .cls presence"
    # what is written decodes back to the split's pixels and labels
    labeled = [s for p in sorted((digits_root / "labeled").glob("*.tar")) for s in iter_raw_samples(str(p))]
    for i in (0, 57, 99):
        np.testing.assert_array_equal(np.asarray(decode_image(labeled[i]["png"], 1)), digits_split.labeled_x[i])
        assert parse_label(labeled[i], 10) == digits_split.labeled_y[i]


@pytest.fixture(scope="module")
def hard_root(tmp_path_factory) -> Path:
    from stages.data.digits import write_digits_shards

    root = tmp_path_factory.mktemp("digits-hard")
    assert write_digits_shards(root, labeled_per_class=2) == {"labeled": 20, "unlabeled": 1317, "test": 360, "val": 100}
    return root


def test_digits_hard_has_the_defaults_validation_and_test_images_and_a_subset_of_its_labeled(hard_root, digits_root):
    """2 labeled images per class: the same val and test shards byte for byte; labeled images a subset of the
    default's 10 per class; the default's other labeled images join the unlabeled pool."""
    for split in ("test", "val"):
        for shard in sorted((digits_root / split).glob("*.tar")):
            assert (hard_root / split / shard.name).read_bytes() == shard.read_bytes(), shard.name

    def pixels(root: Path, split: str) -> list[tuple[bytes, int]]:
        return [
            (np.asarray(decode_image(s["png"], 1)).tobytes(), int(s.get("cls", b"-1")))
            for p in sorted((root / split).glob("*.tar"))
            for s in iter_raw_samples(str(p))
        ]

    hard, default = pixels(hard_root, "labeled"), pixels(digits_root, "labeled")
    assert len(hard) == 20 and set(hard) <= set(default)
    assert np.bincount([c for _, c in hard], minlength=10).tolist() == [2] * 10
    moved = {image for image, _ in default} - {image for image, _ in hard}
    hard_pool, default_pool = pixels(hard_root, "unlabeled"), pixels(digits_root, "unlabeled")
    assert len(hard_pool) == 1317 and {i for i, _ in hard_pool} == {i for i, _ in default_pool} | moved
    assert split_digits(seed=0, labeled_per_class=2).labeled_y.tolist() == [c for _, c in hard]


def test_a_digits_folder_holding_the_other_split_is_refused(hard_root, digits_root):
    from stages.data.digits import digits_written

    assert digits_written(hard_root, 2) and digits_written(digits_root, 10)
    assert not digits_written(hard_root / "nowhere", 2)
    with pytest.raises(ValueError) as info:
        digits_written(digits_root, 2)
    assert "holds 100 labeled digits, not 20 (2 per class)" in str(info.value)
    with pytest.raises(ValueError, match="labeled_per_class: must be in"):
        split_digits(labeled_per_class=11)
