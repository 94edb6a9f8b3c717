"""Run storage: atomic writes, sha256 manifests, and the stable run layout.

Layout (users and later tools rely on it)::

    <storage>/<run>/config.yaml                  resolved config
    <storage>/<run>/run.json                     status, rounds completed, per-stage timings
    <storage>/<run>/round-NNN/model.safetensors  weights (no pickle)
    <storage>/<run>/round-NNN/model.json         timm name, kwargs, num_classes, input size, mean/std
    <storage>/<run>/round-NNN/metrics.json       test top-1, per-class top-1, train images, ...
    <storage>/<run>/round-NNN/pseudo_labels/     soft labels from the previous model (Parquet per shard)
    <storage>/<run>/round-NNN/selection/         what was kept (Parquet per shard) + selection.json/png
    <storage>/<run>/round-NNN/manifest.json      stages completed, inputs, sha256 of each file
    <storage>/<run>/report.html                  the run report (pipeline/report.py), rewritten after every round
    <storage>/<run>/tensorboard/                 TensorBoard events (pipeline/tb_events.py)

Every file is written to a temporary name in its directory and renamed, so a reader never sees half a file;
``manifest.json`` records each file's size and sha256 so a resume can tell a complete file from a damaged one.
A write that fails (disk full, read-only, quota) raises ``StorageError`` naming the file and removes its temporary;
temporaries left by a killed process (``.<name>.*.tmp``) are swept by ``remove_temp_files`` before a stage reruns.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A write to the run's storage failed (disk full, read-only, permissions); names the path."""


TEMP_SUFFIX = ".tmp"
# errnos that mean "this storage cannot take the write", whatever wrote it (ours, pyarrow's, Ray Train's)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})


def write_error(path: str | Path, exc: BaseException) -> StorageError:
    """One line naming ``path`` and the reason (``No space left on device``), for a failed write of ``path``."""
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "errno", None)
    if not code and (found := re.search(r"os error (\d+)", str(exc))):  # Rust writers (safetensors) say it in words
        code = int(found.group(1))
    reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    error = StorageError(f"cannot write {path}: {reason}")
    error.errno = code  # kept for callers; the message stays the one line above
    return error


def storage_error(exc: BaseException, where: str | Path) -> StorageError | None:
    """``exc`` as a ``StorageError`` when it is an ``OSError`` saying the storage is full or read-only, else None.

    For writers we do not own (pyarrow inside Ray Train, a plain ``open``): the path is the error's own file name
    when it has one, else the folder ``where``.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return write_error(exc.filename or f"under {where}", exc)
    return None


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; renames it onto ``path`` when the block succeeds.

    On any failure the temporary is removed; an ``OSError`` becomes a ``StorageError`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporaries a killed writer left under ``folder`` (never trusted, but they take space)."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path) -> dict:
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_entry(entry: dict, root: Path) -> str | None:
    """None when the file matches its manifest entry, else a reason."""
    path = root / entry["path"]
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
    if sha256_file(path) != entry["sha256"]:
        return f"{path} sha256 differs from the manifest"
    return None


class RoundManifest:
    """``round-NNN/manifest.json``: which stages finished, with the sha256 of every file they wrote.

    A stage counts as done only when it is recorded here and all its files still verify; anything else is redone.
    """

    def __init__(self, round_dir: str | Path):
        self.dir = Path(round_dir)
        self.path = self.dir / "manifest.json"
        self.data: dict = {"round": None, "stages": {}}
        if self.path.exists():
            try:
                self.data = read_json(self.path)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {"round": None, "stages": {}}  # a damaged manifest is never trusted: redo its stages

    def stage_done(self, stage: str, inputs: dict | None = None) -> bool:
        """Recorded as done, made from the same ``inputs``, and every file it wrote still verifies."""
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("status") != "done" or entry.get("inputs", {}) != (inputs or {}):
            return False
        return all(verify_entry(f, self.dir) is None for f in entry.get("files", []))

    def stage(self, stage: str) -> dict:
        return self.data["stages"][stage]

    def record(self, stage: str, files: list[Path], seconds: float, inputs: dict | None = None, **info: Any) -> None:
        self.data["stages"][stage] = {
            "status": "done",
            "inputs": inputs or {},
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": [file_entry(Path(f), self.dir) for f in sorted(files)],
            **info,
        }
        atomic_write_json(self.path, self.data)

    def forget(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            atomic_write_json(self.path, self.data)


def round_dir(run_dir: str | Path, round_index: int) -> Path:
    return Path(run_dir) / f"round-{round_index:03d}"
