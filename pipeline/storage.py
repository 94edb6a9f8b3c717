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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A write to the run's storage failed (disk full, read-only, permissions); names the path."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
