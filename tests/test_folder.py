"""stages/data/folder.py and prepare-folder in this process: scanning, shard plans, byte-exact copies, skipped files,
re-runs, the CSV form, --max-side (stages/data/resize.py), and bad input refused with one line (the Ray fan-out runs
in tests/test_own_data.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from stages.core.errors import ConfigError
from stages.core.stage import InProcess
from stages.data.folder import read_classes, scan_csv, scan_folder
from stages.data.resize import fit_short_side
from stages.data.shards import expand_shards, image_field, iter_raw_samples
from stages.prepare import prepare_folder
from tests.conftest import tiny_tree


def _png(path, value: int, size=(12, 10), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


def _photo(size, mode="RGB", fmt="JPEG", seed=0) -> bytes:
    """A photo-like image (smooth gradients and noise) of ``size`` in ``mode``, encoded as ``fmt``."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h), 255 - x * 200 / w], axis=-1)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    image = image.convert(mode) if mode != "P" else image.convert("RGB").quantize(16)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture
def photos(tmp_path):
    """A large and a small JPEG in labeled/, a small PNG in test/, and in unlabeled/ a small PNG and a large JPEG cut
    short (its header reads, its pixels do not)."""
    src = tmp_path / "photos"
    files = {
        "labeled/cat/big.jpg": _photo((800, 600)),
        "labeled/cat/small.jpg": _photo((100, 80), seed=1),
        "test/cat/0.png": _photo((60, 40), fmt="PNG"),
        "unlabeled/u.png": _photo((50, 50), "L", "PNG"),
        "unlabeled/cut.jpg": _photo((900, 700), seed=2)[:20000],
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def _stored(out) -> dict[str, bytes]:
    """Each sample's image bytes by key, from every shard under ``out``."""
    return {s["__key__"]: image_field(s) for tar in sorted(out.glob("*/*.tar")) for s in iter_raw_samples(str(tar))}


def _keys(src) -> dict[str, str]:
    scan = scan_folder(src)
    return {i.rel: i.key for images in scan.images.values() for i in images}


def test_max_side_shrinks_large_images_keeps_small_ones_byte_for_byte_and_records_it(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare-folder", str(photos), "--out", str(out), "--no-progress", "--max-side", "256"]) == 0
    printed = capsys.readouterr().out
    assert "--max-side 256: 1 image(s) resized" in printed and "MB stored" in printed
    stored, keys = _stored(out), _keys(photos)
    big = Image.open(io.BytesIO(stored[keys["labeled/cat/big.jpg"]]))
    assert big.format == "JPEG" and min(big.size) == 256 and abs(big.size[0] - 256 * 800 / 600) <= 1
    for rel in ("labeled/cat/small.jpg", "test/cat/0.png", "unlabeled/u.png"):
        assert stored[keys[rel]] == (photos / rel).read_bytes()  # at or below 256: the very bytes, not re-encoded
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["max_side"] == 256 and summary["resized"] == 1
    assert summary["bytes_out"] < summary["bytes_in"]
    small = sum((photos / r).stat().st_size for r in ("labeled/cat/small.jpg", "test/cat/0.png", "unlabeled/u.png"))
    assert summary["bytes_in"] == small + (photos / "labeled/cat/big.jpg").stat().st_size  # what was written
    # a large image that fails to decode while shrinking is skipped and listed, as without --max-side
    (cut,) = [s for s in summary["skipped"] if s["path"].endswith("cut.jpg")]
    assert "undecodable image" in cut["reason"] and summary["skipped_count"] == 1

    assert main(["prepare-folder", str(photos), "--out", str(tmp_path / "o2"), "--max-side", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --max-side -1: must be 0 (keep every image's bytes) or a short side in pixels"]


def test_a_shard_written_with_another_max_side_is_rewritten_the_same_one_is_kept(photos, tmp_path):
    out = tmp_path / "out"
    prepare_folder(str(photos), str(out), InProcess(False), progress=False, max_side=256)
    shards = sorted(out.glob("*/*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    again = prepare_folder(str(photos), str(out), InProcess(False), progress=False, max_side=256)
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps and again["resized"] == 1  # nothing written
    prepare_folder(str(photos), str(out), InProcess(False), progress=False, max_side=64)
    assert sorted(out.glob("*/*.tar")) == shards
    assert all(json.loads(p.with_suffix(".json").read_text())["max_side"] == 64 for p in shards)  # every one rewritten
    stored, keys = _stored(out), _keys(photos)
    assert min(Image.open(io.BytesIO(stored[keys["labeled/cat/big.jpg"]])).size) == 64
    assert min(Image.open(io.BytesIO(stored[keys["labeled/cat/small.jpg"]])).size) == 64
    summary = prepare_folder(str(photos), str(out), InProcess(False), progress=False)  # off again: the source bytes
    assert summary["max_side"] == 0 and summary["resized"] == 0 and summary["bytes_in"] == summary["bytes_out"]
    assert _stored(out)[keys["labeled/cat/big.jpg"]] == (photos / "labeled/cat/big.jpg").read_bytes()


@pytest.mark.parametrize(
    "mode, fmt, ext, stored_as",
    [
        ("RGBA", "PNG", "png", ("PNG", "RGBA", "png")),  # alpha: stays PNG, with its alpha
        ("P", "PNG", "png", ("PNG", "RGB", "png")),  # palette: resampled in RGB, PNG
        ("RGB", "PNG", "png", ("PNG", "RGB", "png")),  # a PNG source stays PNG
        ("L", "JPEG", "jpeg", ("JPEG", "L", "jpeg")),  # its extension kept
        ("RGB", "WEBP", "webp", ("JPEG", "RGB", "jpg")),  # an opaque photo of another format: JPEG
        ("RGBA", "WEBP", "webp", ("PNG", "RGBA", "png")),
    ],
)
def test_max_side_keeps_alpha_in_png_and_stores_opaque_photos_as_jpeg(mode, fmt, ext, stored_as):
    source = _photo((200, 150), mode, fmt)
    data, new_ext = fit_short_side(source, ext, 64)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode, new_ext) == stored_as and image.size == (85, 64)
    if "A" in image.mode:  # the gradient in alpha survives the resize
        alpha = np.asarray(image.getchannel("A"), dtype=float)
        assert alpha[:, 0].mean() > 240 and alpha[:, -1].mean() < 80
    assert fit_short_side(source, ext, 150) == (source, ext) and fit_short_side(source, ext, 0)[0] is source


@pytest.fixture
def tree(tmp_path):
    """labeled/{cat,ant,dog}, test/{cat,ant,dog}, nested unlabeled/, plus a broken image and a note."""
    src = tmp_path / "src"
    n = 0
    for split, per_class in (("labeled", 3), ("test", 2)):
        for c in ("cat", "ant", "dog"):
            for i in range(per_class):
                n += 1
                _png(src / split / c / f"{i}.png", n)
    for i in range(7):
        _png(src / "unlabeled" / f"part{i % 2}" / "deep" / f"u{i}.png", 100 + i, mode="RGB")
    (src / "unlabeled" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "labeled" / "cat" / "notes.txt").write_text("about the cats")
    return src


def test_classes_are_sorted_names_like_imagefolder_and_unlabeled_is_any_depth(tree):
    scan = scan_folder(tree)
    assert scan.classes == ("ant", "cat", "dog")
    labeled = {i.rel: i.label for i in scan.images["labeled"]}
    assert labeled["labeled/ant/0.png"] == 0 and labeled["labeled/dog/2.png"] == 2
    assert len(scan.images["unlabeled"]) == 8 and {i.label for i in scan.images["unlabeled"]} == {-1}
    assert [s["path"].endswith("notes.txt") for s in scan.skipped] == [True]


def test_prepare_copies_bytes_exactly_lists_what_it_skips_and_reruns_skip_finished_shards(tree, tmp_path):
    out = tmp_path / "out"
    summary = prepare_folder(str(tree), str(out), InProcess(False), shard_bytes=4096, progress=False)
    assert summary["classes"] == ["ant", "cat", "dog"] and summary["channels"] == 3
    assert {s: i["samples"] for s, i in summary["splits"].items()} == {"labeled": 9, "test": 6, "unlabeled": 7}
    assert summary["skipped_count"] == 2  # the note and the broken jpeg, each with its reason
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((s["path"], s["reason"]) for s in summary["skipped"])}
    assert "not an image" in reasons["notes.txt"] and "undecodable" in reasons["broken.jpg"]
    assert json.loads((out / "classes.json").read_text()) == {"0": "ant", "1": "cat", "2": "dog"}

    scan = scan_folder(tree)
    source = {i.key: (i.path, i.label) for split in scan.images.values() for i in split}
    data = yaml.safe_load((out / "data.yaml").read_text())["data"]
    assert summary["splits"]["labeled"]["shards"] > 1  # 4 KB shards: several per split
    for split in ("labeled", "test", "unlabeled"):
        for shard in expand_shards(data[split]):
            for sample in iter_raw_samples(shard):
                path, label = source[sample["__key__"]]
                ext = path.rsplit(".", 1)[-1]
                assert sample[ext] == open(path, "rb").read()  # copied, not re-encoded
                assert sample.get("cls") == (str(label).encode() if label >= 0 else None)

    shards = sorted(out.glob("*/*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    first = {p: p.read_bytes() for p in shards}
    prepare_folder(str(tree), str(out), InProcess(False), shard_bytes=4096, progress=False)
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # nothing rewritten
    victim = shards[0]
    victim.unlink()
    prepare_folder(str(tree), str(out), InProcess(False), shard_bytes=4096, progress=False)
    assert victim.read_bytes() == first[victim]  # the same plan writes the same bytes
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards if p != victim)
    damaged = bytearray(first[victim])  # damaged in place at the same size: its receipt's sha256 finds it
    damaged[700] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    prepare_folder(str(tree), str(out), InProcess(False), shard_bytes=4096, progress=False)
    assert victim.read_bytes() == first[victim]

    # the data section loads into a config as it is written
    cfg = load_config(None, base={**tiny_tree(tmp_path, tmp_path / "runs"), "data": data})
    assert cfg.data.classes == ("ant", "cat", "dog") and cfg.data.num_classes == 3 and cfg.data.channels == 3


def test_a_csv_lists_the_same_kind_of_source(tree, tmp_path):
    rows = ["path,label,split"]
    rows += [f"src/labeled/{c}/{i}.png,{c},labeled" for c in ("cat", "dog") for i in range(3)]
    rows += [f"src/test/{c}/0.png,{c},test" for c in ("cat", "dog")]
    rows += ["src/unlabeled/part0/deep/u0.png,,unlabeled", "src/unlabeled/part1/deep/u1.png,cat,unlabeled"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    scan = scan_csv(tmp_path / "list.csv")
    assert scan.classes == ("cat", "dog")
    assert sorted(i.label for i in scan.images["unlabeled"]) == [-1, 0]  # a given label is kept as a diagnostic
    summary = prepare_folder(None, str(tmp_path / "out"), InProcess(False), str(tmp_path / "list.csv"), progress=False)
    assert {s: i["samples"] for s, i in summary["splits"].items()} == {"labeled": 6, "test": 2, "unlabeled": 2}


def test_labeled_only_csv_rows_added_with_the_runs_classes_through_the_cli(tree, tmp_path, capsys):
    """What ``suggest-labels`` hands back: labeled rows only, numbered by a run's ``classes.json``; the CLI sizes the
    work from the same scan, so it must not ask for test rows either."""
    rows = ["path,label,split"] + [f"src/labeled/dog/{i}.png,dog,labeled" for i in range(2)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.json").write_text('["ant", "cat", "dog"]')
    argv = ["prepare-folder", "--csv", str(tmp_path / "list.csv"), "--labeled-only", "--no-progress"]
    assert main([*argv, "--classes", str(tmp_path / "classes.json"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["splits"]["labeled"]["samples"] == 2 and summary["classes"] == ["ant", "cat", "dog"]
    assert main([*argv[:-2], "--no-progress", "--out", str(tmp_path / "out2")]) == 2  # without --labeled-only
    assert "no test rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda src: (src / "labeled" / "ant" / "0.png").rename(src / "labeled" / "0.png"), "outside any class folder"),
        (lambda src: (src / "labeled" / "emu").mkdir(), "class folder with no images"),
        (lambda src: (src / "labeled" / "emu").mkdir() or (src / "labeled" / "emu" / "x.txt").write_text("x"), "emu"),
        (lambda src: (src / "train").mkdir(), "unknown split folder"),
    ],
)
def test_a_bad_folder_is_one_line(tree, tmp_path, capsys, damage, words):
    damage(tree)
    assert main(["prepare-folder", str(tree), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and words in err[-1], err
    assert not (tmp_path / "out").exists()


def test_a_csv_row_whose_file_is_missing_is_one_line(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label,split\ngone.png,cat,labeled\n")
    assert main(["prepare-folder", "--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "list.csv:2: no file" in line and "gone.png" in line


def test_classes_json_disagreeing_with_num_classes_is_one_line(tmp_path, capsys):
    (tmp_path / "classes.json").write_text(json.dumps({"0": "ant", "1": "cat", "2": "dog"}))
    tree_ = tiny_tree(tmp_path, tmp_path / "runs")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.classes={tmp_path / 'classes.json'}", "data.num_classes=10"], base=tree_)
    assert str(info.value).startswith("config.data.num_classes: 10, but ") and "names 3 classes" in str(info.value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree_))
    assert main(["iterate", "--config", str(tmp_path / "c.yaml"), "--set", f"data.classes={tmp_path}/none.json"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: config.data.classes: cannot read") and "\n" not in line


def test_class_names_inline_or_from_a_file():
    assert read_classes(["b", "a"]) == ("b", "a")
    with pytest.raises(ValueError, match="repeat"):
        read_classes(["a", "a"])
    tree_ = tiny_tree(Path("/d"), Path("/r"))
    cfg = load_config(None, ["data.classes=[x, y, z]"], base={**tree_, "data": {**tree_["data"], "num_classes": 3}})
    assert cfg.data.names() == ["x", "y", "z"]
    assert load_config(None, base=tree_).data.names() == [str(c) for c in range(10)]
