"""stages/storage/files.py and the one-line errors of pipeline/distributed/runtime.py: failed writes name their file,
leave no temporary behind, and reach the CLI as one line however Ray wrapped them (fast: no training)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pipeline.distributed.runtime import one_line_errors, user_error
from pipeline.plan import stage_config_digest
from stages.core.errors import DataError
from stages.models.factory import atomic_save_safetensors, load_weights
from stages.pseudo_label import build_table
from stages.storage.artifacts import verify_entry, write_table
from stages.storage.files import StorageError, atomic_write_bytes, is_url, remove_temp_files, storage_error


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
        "x.parquet": lambda p: write_table(
            build_table("s.tar", ["a"], torch.ones(1, 2) / 2, [-1], 0), p, format="f", made_by="m"
        ),
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
    from stages.storage.artifacts import RoundManifest

    (tmp_path / "metrics.json").write_text("{}")
    RoundManifest(tmp_path).record("evaluate", [tmp_path / "metrics.json"], 1.0, inputs={"config": "x"})
    assert RoundManifest(tmp_path).stage_done("evaluate", {"config": "x"})
    whole = (tmp_path / "manifest.json").read_bytes()
    (tmp_path / "manifest.json").write_bytes(whole[: len(whole) // 2])  # cut short, as by a copy that died
    assert not RoundManifest(tmp_path).stage_done("evaluate", {"config": "x"})


# ---------------------------------------------------------------- one storage root: a local folder or an s3:// URL


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A fresh storage root of each kind; the working folder is empty, so a URL mistaken for a path shows up."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        yield tmp_path / "store"
    else:
        import uuid

        _, bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/unit-{uuid.uuid4().hex[:8]}"
    assert not Path("s3:").exists() and sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])


def test_write_read_verify_on_a_folder_and_a_bucket(root):
    import torch

    from stages.storage import files as storage
    from stages.storage.artifacts import RoundManifest
    from stages.storage.layout import RunLayout

    rdir = RunLayout(storage.join(root, "run")).round(1).dir
    assert isinstance(rdir, str if storage.is_url(root) else Path)  # a URL never becomes a local path
    card, weights = storage.join(rdir, "model.json"), storage.join(rdir, "model.safetensors")
    assert not storage.exists(card) and storage.listdir(rdir) == []
    storage.atomic_write_json(card, {"timm_name": "resnet10t"})
    atomic_save_safetensors({"w": torch.arange(4.0)}, weights)
    assert storage.read_json(card) == {"timm_name": "resnet10t"} and storage.is_file(card)
    assert torch.equal(load_weights(weights)["w"], torch.arange(4.0))
    assert storage.size(card) == len(storage.read_bytes(card))

    # a write that fails half-way leaves no object/file and no temporary
    half = storage.join(rdir, "selection", "half.parquet")
    with pytest.raises(RuntimeError), storage.atomic_target(half) as tmp:
        tmp.write_bytes(b"PAR1 half")
        raise RuntimeError("killed")
    assert not storage.exists(half) and storage.listdir(storage.join(rdir, "selection")) == []

    manifest = RoundManifest(rdir)
    manifest.record("train", [weights, card], 1.0, inputs={"config": "c"})
    assert [e["path"] for e in storage.read_json(storage.join(rdir, "manifest.json"))["stages"]["train"]["files"]] == [
        "model.json",
        "model.safetensors",
    ]
    assert RoundManifest(rdir).stage_done("train", {"config": "c"})
    assert not RoundManifest(rdir).stage_done("train", {"config": "other"})
    # an object store has no empty folders: the failed write left nothing at all there
    assert storage.listdir(rdir) == ["manifest.json", "model.json", "model.safetensors"] + (
        [] if storage.is_url(root) else ["selection"]
    )

    # same size, other bytes: caught by the sha256 read back from storage; then missing
    storage.atomic_write_json(card, {"timm_name": "resnet10X"})
    assert "sha256 differs" in verify_entry(RoundManifest(rdir).stage("train")["files"][0], rdir)
    assert not RoundManifest(rdir).stage_done("train", {"config": "c"})
    storage.atomic_write_bytes(card, b"{}")
    assert "bytes, manifest says" in verify_entry(RoundManifest(rdir).stage("train")["files"][0], rdir)

    log = storage.join(rdir, "train_metrics.jsonl")
    storage.append_text(log, "a\n")
    storage.append_text(log, "b\n")
    assert storage.read_text(log) == "a\nb\n"
    assert storage.remove_temp_files(rdir) == []


def test_a_bad_storage_url_is_one_line_at_config_load_or_preflight(tiny_config, s3_bucket):
    from stages.core.errors import ConfigError
    from stages.storage.files import probe_storage

    with pytest.raises(ConfigError, match=r"^config\.storage: cannot open storage nope://b/runs: unknown protocol"):
        tiny_config("storage=nope://b/runs")
    assert tiny_config("storage=s3://b/runs").storage == "s3://b/runs"  # accepted: no network at load
    # a known protocol whose package is missing: one line where the run starts, naming what to install
    import fsspec

    missing = next(p for p in ("gs", "abfs", "hf", "oci") if p in fsspec.available_protocols() and not _has(p))
    with pytest.raises(StorageError, match=rf"^cannot open storage {missing}://b/runs: .*install"):
        probe_storage(f"{missing}://b/runs")
    with pytest.raises(StorageError, match=r"^cannot write to storage s3://no-such-bucket/runs: .*bucket"):
        probe_storage("s3://no-such-bucket/runs")
    fs, bucket = s3_bucket
    probe_storage(f"s3://{bucket}/runs")
    assert not fs.exists(f"{bucket}/runs/.write-check")


def _has(protocol: str) -> bool:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
        return True
    except ImportError:
        return False


def test_locate_run_is_the_one_way_to_a_run(root, tmp_path, monkeypatch):
    """A name under the storage root first, else a run folder or URL given whole; neither is one line naming both."""
    from stages.storage.files import atomic_write_text, join
    from stages.storage.layout import RunNotFoundError, locate_run

    atomic_write_text(join(root, "r1", "config.yaml"), "name: r1\n")
    found = locate_run("r1", root)
    assert str(found).rstrip("/") == str(join(root, "r1")).rstrip("/")
    assert isinstance(found, str if is_url(root) else Path) and (is_url(root) or found.is_absolute())
    assert locate_run(str(found)) == found  # the run's own folder or URL, whatever the storage root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope': .*nope.* holds a run's config.yaml"):
        locate_run("nope", root)
