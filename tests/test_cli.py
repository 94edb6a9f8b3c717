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
    png = next(iter(tarfile.open(next((digits_root / "labeled").glob("*.tar"))).getmembers()))
    data = tarfile.open(next((digits_root / "labeled").glob("*.tar"))).extractfile(png).read()
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
