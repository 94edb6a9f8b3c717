"""The command line: help, and bad input refused with one clear line before any work (no run folder made)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import tiny_tree


@pytest.fixture
def config_file(digits_root, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(digits_root, tmp_path / "runs")))
    return path


def _refused(capsys, tmp_path, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    made = [p.name for p in (tmp_path / "runs").glob("*") if p.name != ".scan-cache"]  # the shards' scan cache may be
    assert not made, "a refused run must not create its run folder"
    return err[-1]


def _tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    assert "iterate" in out.stdout and "prepare-digits" in out.stdout


def test_missing_shard_pattern(capsys, tmp_path, config_file):
    line = _refused(
        capsys,
        tmp_path,
        ["iterate", "--config", str(config_file), "--set", f"data.unlabeled=['{tmp_path}/nothing-{{000..003}}.tar']"],
    )
    assert "data.unlabeled" in line and "no shard" in line and "nothing-" in line


def test_empty_data_set(capsys, tmp_path, config_file):
    empty = _tar(tmp_path / "empty.tar", {})
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", f"data.labeled=[{empty}]"])
    assert "holds no samples" in line and "empty.tar" in line


def test_label_out_of_range(capsys, tmp_path, config_file, digits_root):
    shard = tarfile.open(next((digits_root / "labeled").glob("*.tar")))
    data = shard.extractfile(next(m for m in shard.getmembers() if m.name.endswith(".png"))).read()
    bad = _tar(tmp_path / "bad.tar", {"a.png": data, "a.cls": b"12"})
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", f"data.labeled=[{bad}]"])
    assert "class 12" in line and "[0, 10)" in line


def test_unknown_model(capsys, tmp_path, config_file):
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", "ladder.0.model=resnet9000"])
    assert "resnet9000" in line and "unknown timm model" in line


def test_rounds_below_one(capsys, tmp_path, config_file):
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--rounds", "0"])
    assert "rounds" in line and ">= 1" in line


def test_bad_override_type(capsys, tmp_path, config_file):
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", "student.epochs=ten"])
    assert "student.epochs" in line and "expected int" in line


def test_an_empty_unlabeled_shard_is_refused_before_round_0(capsys, tmp_path, config_file, digits_root):
    """The unlabeled shards get the labeled ones' checks before the teacher trains (the data check scans them)."""
    empty = _tar(tmp_path / "empty.tar", {})
    unlabeled = f"data.unlabeled=['{digits_root}/unlabeled/*.tar', '{empty}']"
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", unlabeled])
    assert line == f"error: data.unlabeled: shard {empty} holds no samples; remove it or write it again"


def test_too_many_undecodable_unlabeled_samples_are_refused_before_round_0(capsys, tmp_path, config_file, digits_root):
    junk = _tar(tmp_path / "junk.tar", {f"j{i}.png": b"\x89PNG not an image" for i in range(30)})
    unlabeled = f"data.unlabeled=['{digits_root}/unlabeled/*.tar', '{junk}']"
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", unlabeled])
    assert "data.unlabeled: 30 of 1267 samples unusable (pseudo_label.max_bad_fraction 0.01)" in line
    assert f"first: {junk} j0: " in line and "undecodable" in line


@pytest.mark.slow
def test_data_errors_from_ray_tasks_are_one_line(ray_session, capsys, tmp_path, config_file, digits_root):
    """With the labeled scan forced onto Ray tasks (``resources.executor: ray``), a truncated shard and a label out of
    range still reach the user as one ``error:`` line (exit 2, no run folder), not a remote traceback."""
    shard = next((digits_root / "labeled").glob("*.tar"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: 1024 * 10 + 300])
    ray = ["--set", "resources.executor=ray"]
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", f"data.labeled=[{cut}]", *ray])
    assert str(cut) in line and "truncated" in line
    tar = tarfile.open(shard)
    png = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".png"))).read()
    bad = _tar(tmp_path / "bad.tar", {"a.png": png, "a.cls": b"12"})
    line = _refused(capsys, tmp_path, ["iterate", "--config", str(config_file), "--set", f"data.labeled=[{bad}]", *ray])
    assert "class 12" in line and "[0, 10)" in line and "Traceback" not in line
