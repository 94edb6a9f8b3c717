"""pipeline/storage.py and the one-line errors of pipeline/rounds.py: failed writes name their file, leave no
temporary behind, and reach the CLI as one line however Ray wrapped them (fast: no training)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pipeline.rounds import one_line_errors, stage_config_digest, user_error
from pipeline.storage import StorageError, atomic_write_bytes, remove_temp_files, storage_error
from stages.data import DataError
from stages.models import atomic_save_safetensors
from stages.pseudo_label import build_table, write_sidecar


def _fail_replace(monkeypatch, code: int) -> None:
    def replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, code):
    import torch

    target = tmp_path / "out"
    _fail_replace(monkeypatch, code)
    writers = {
        "run.json": lambda p: atomic_write_bytes(p, b"{}"),
        "model.safetensors": lambda p: atomic_save_safetensors({"w": torch.zeros(3)}, p),
        "x.parquet": lambda p: write_sidecar(build_table("s.tar", ["a"], torch.ones(1, 2) / 2, [-1], 0, []), p),
    }
    for name, write in writers.items():
        with pytest.raises(StorageError) as info:
            write(target / name)
        assert str(info.value) == f"cannot write {target / name}: {os.strerror(code)}"
    assert not list(target.iterdir()), "a failed write left a file behind"


def test_remove_temp_files_sweeps_only_temporaries(tmp_path):
    (tmp_path / "pseudo_labels").mkdir()
    keep = [tmp_path / "manifest.json", tmp_path / "pseudo_labels" / "a.parquet", tmp_path / "x.tmp"]
    gone = [tmp_path / ".manifest.json.k2j3.tmp", tmp_path / "pseudo_labels" / ".a.parquet.0a9z.tmp"]
    for p in keep + gone:
        p.write_text("x")
    assert sorted(remove_temp_files(tmp_path)) == sorted(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_storage_errno_becomes_a_storage_error_and_others_do_not(tmp_path):
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert str(full) == f"cannot write under {tmp_path}: No space left on device"
    named = storage_error(OSError(errno.EROFS, "Read-only file system", "/r/x.json"), tmp_path)
    assert str(named) == "cannot write /r/x.json: Read-only file system"
    assert storage_error(OSError(errno.ECONNRESET, "reset"), tmp_path) is None
    assert storage_error(ValueError("x"), tmp_path) is None


def test_errors_raised_in_ray_tasks_and_train_workers_reach_the_cli_as_their_own_line(ray_session, tmp_path):
    from ray.train import WorkerGroupError

    def fail(exc):
        raise exc

    remote = ray_session.remote(fail)
    for inner in (StorageError("cannot write /r/a.parquet: No space left on device"), DataError("shard x: truncated")):
        with pytest.raises(ray_session.exceptions.RayTaskError) as info:
            ray_session.get(remote.remote(inner))
        assert str(info.value).count("\n") > 2  # what the CLI would print without unwrapping: a remote traceback
        clear = user_error(info.value, tmp_path)
        assert type(clear) is type(inner) and str(clear) == str(inner)
    # Ray Train gathers worker exceptions; one from a writer we do not own (a plain open()) has no path of ours.
    wrapped = WorkerGroupError("rank 0 failed", {0: OSError(errno.ENOSPC, "No space left on device")})
    with pytest.raises(StorageError, match=f"^cannot write under {tmp_path}: No space left on device$"):
        with one_line_errors(tmp_path):
            raise wrapped
    with pytest.raises(WorkerGroupError):  # anything else keeps its own traceback
        with one_line_errors(tmp_path):
            raise WorkerGroupError("rank 0 failed", {0: RuntimeError("a bug")})


def test_rounds_name_and_storage_do_not_make_finished_stages_stale(tiny_config):
    base = tiny_config()
    for same in ("rounds=3", "name=other", f"storage={Path('/elsewhere')}", "data.allow_test_overlap=true"):
        assert stage_config_digest(tiny_config(same)) == stage_config_digest(base), same
    assert stage_config_digest(tiny_config("student.epochs=3")) != stage_config_digest(base)


def test_a_damaged_manifest_is_never_trusted(tmp_path):
    from pipeline.storage import RoundManifest

    (tmp_path / "metrics.json").write_text("{}")
    RoundManifest(tmp_path).record("evaluate", [tmp_path / "metrics.json"], 1.0, inputs={"config": "x"})
    assert RoundManifest(tmp_path).stage_done("evaluate", {"config": "x"})
    whole = (tmp_path / "manifest.json").read_bytes()
    (tmp_path / "manifest.json").write_bytes(whole[: len(whole) // 2])  # cut short, as by a copy that died
    assert not RoundManifest(tmp_path).stage_done("evaluate", {"config": "x"})
