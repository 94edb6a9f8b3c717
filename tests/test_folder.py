"""stages/data/folder.py and prepare-folder in this process: scanning, shard plans, byte-exact copies, skipped files,
re-runs, the CSV form, and bad input refused with one line (the Ray fan-out runs in tests/test_own_data.py)."""

from __future__ import annotations

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
from stages.data.shards import expand_shards, iter_raw_samples
from stages.prepare import prepare_folder
from tests.conftest import tiny_tree


def _png(path, value: int, size=(12, 10), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


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
