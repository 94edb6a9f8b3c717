"""Reading a finished or running run from its storage: ``python -m pipeline rounds`` and ``download``.

The storage root is a local folder, a ``file://`` URL, or any URL fsspec opens (``s3://`` with s3fs installed,
``gs://`` with gcsfs); credentials come from the usual places (environment, profile files), never from the run.
A round is downloaded only when its manifest records the ``evaluate`` stage as done, and every file is checked
against the size and sha256 the manifest recorded: a mismatch is refused and nothing of that round is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import fsspec

ROUND_RE = re.compile(r"^round-(\d{3,})$")
DOWNLOAD_STAGES = ("train", "evaluate")  # model.safetensors + model.json, metrics.json


class RunStoreError(RuntimeError):
    """A run, round or file that is missing, unfinished or damaged in storage; the CLI prints it as one line."""


class RunStore:
    """One run's folder under a storage root, read through fsspec."""

    def __init__(self, run: str, storage: str = "runs"):
        if "://" not in run and Path(run).expanduser().is_dir() and (Path(run).expanduser() / "config.yaml").exists():
            location = str(Path(run).expanduser().resolve())  # a path to the run folder itself
        else:
            base = storage if "://" in storage else str(Path(storage).expanduser().resolve())
            location = f"{base.rstrip('/')}/{run}"
        self.location = location
        try:
            self.fs, self.root = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:
            raise RunStoreError(f"cannot open storage {location}: {exc}") from exc
        if not self._exists("config.yaml"):
            raise RunStoreError(f"no run at {location} (no config.yaml there; check RUN and --storage)")
        self.name = self.root.rstrip("/").rsplit("/", 1)[-1]

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(rel)))
        except OSError as exc:
            raise RunStoreError(f"cannot read {self.location}/{rel}: {exc}") from exc

    def read_json(self, rel: str) -> Any:
        try:
            with self.fs.open(self._path(rel), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError as exc:
            raise RunStoreError(f"{self.location}/{rel} is missing") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunStoreError(f"cannot read {self.location}/{rel}: {exc}") from exc

    def status(self) -> dict:
        return self.read_json("run.json") if self._exists("run.json") else {}

    def round_indices(self) -> list[int]:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return sorted(int(m.group(1)) for n in names if (m := ROUND_RE.match(n)))

    def manifest(self, r: int) -> dict:
        rel = f"round-{r:03d}/manifest.json"
        return self.read_json(rel) if self._exists(rel) else {"stages": {}}

    def finished(self, r: int) -> bool:
        return self.manifest(r)["stages"].get("evaluate", {}).get("status") == "done"

    def rounds(self) -> list[dict]:
        """One row per round folder: stages done, and the round's metrics when it is finished."""
        rows = []
        for r in self.round_indices():
            stages = self.manifest(r)["stages"]
            done = [s for s, e in stages.items() if e.get("status") == "done"]
            row: dict = {"round": r, "stages_done": done, "finished": "evaluate" in done}
            if row["finished"]:
                row.update(self.read_json(f"round-{r:03d}/metrics.json"))
                row["finished_at"] = stages["evaluate"].get("finished_at", "")
            rows.append(row)
        return rows

    def download_round(self, r: int, dest: str | Path) -> Path:
        """Copy round ``r``'s model files, metrics and manifest to ``dest/round-NNN``, verifying each sha256."""
        manifest = self.manifest(r)
        if not self.finished(r):
            done = [s for s, e in manifest["stages"].items() if e.get("status") == "done"]
            raise RunStoreError(
                f"round {r} of {self.location} is not finished (stages done: {', '.join(done) or 'none'})"
            )
        final = Path(dest) / f"round-{r:03d}"
        partial = Path(dest) / f".round-{r:03d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for stage in DOWNLOAD_STAGES:
                for entry in manifest["stages"][stage]["files"]:
                    self._copy_verified(f"round-{r:03d}/{entry['path']}", entry, partial / entry["path"])
            (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    def _copy_verified(self, rel: str, entry: dict, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open(self._path(rel), "rb") as src, open(target, "wb") as out:
                while block := src.read(1 << 20):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
        except FileNotFoundError as exc:
            raise RunStoreError(f"{self.location}/{rel} is missing (listed in the round's manifest)") from exc
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise RunStoreError(
                f"{self.location}/{rel} does not match the manifest ({size} bytes, sha256 {digest.hexdigest()[:12]}…; "
                f"manifest: {entry['bytes']} bytes, sha256 {entry['sha256'][:12]}…); refusing it"
            )

    def download(self, dest: str | Path, round_index: int | None = None, all_rounds: bool = False) -> list[Path]:
        """The chosen round (default: the latest finished one), or every finished round; plus config and run.json."""
        finished = [r for r in self.round_indices() if self.finished(r)]
        if all_rounds:
            chosen = finished
        elif round_index is not None:
            chosen = [round_index]
        else:
            chosen = finished[-1:]
        if not chosen:
            raise RunStoreError(f"{self.location} has no finished round yet")
        if round_index is not None and round_index not in self.round_indices():
            raise RunStoreError(f"{self.location} has no round {round_index} (rounds: {self.round_indices()})")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for rel in ("config.yaml", "run.json"):
            if self._exists(rel):
                with self.fs.open(self._path(rel), "rb") as src:
                    (dest / rel).write_bytes(src.read())
        return [self.download_round(r, dest) for r in chosen]


def publish_round(run_dir: str | Path, round_index: int, target: str) -> str:
    """Upload a finished round's model files, metrics and manifest, plus the run's config and status, to
    ``<target>/<run>/`` (any fsspec URL: ``s3://bucket/runs``, ``gs://…``, a folder), where ``rounds`` and
    ``download`` read them. Each object is written whole (object stores have no partial objects); the manifest
    goes last, so a reader never sees a manifest whose files are not there yet. Returns the run's URL."""
    run_dir = Path(run_dir)
    rel = f"round-{round_index:03d}"
    manifest = json.loads((run_dir / rel / "manifest.json").read_text())
    location = f"{target.rstrip('/')}/{run_dir.name}"
    try:
        fs, root = fsspec.core.url_to_fs(location)
        if _published(fs, f"{root}/{rel}", manifest, (run_dir / rel / "manifest.json").read_bytes()):
            for name in ("config.yaml", "run.json"):  # the round is there already; the run's status may have moved
                _put(fs, run_dir / name, f"{root}/{name}")
            return location
        for stage in DOWNLOAD_STAGES:
            for entry in manifest["stages"][stage]["files"]:
                _put(fs, run_dir / rel / entry["path"], f"{root}/{rel}/{entry['path']}")
        _put(fs, run_dir / rel / "manifest.json", f"{root}/{rel}/manifest.json")
        for name in ("config.yaml", "run.json"):
            _put(fs, run_dir / name, f"{root}/{name}")
    except (OSError, ImportError, ValueError) as exc:
        raise RunStoreError(f"cannot publish {run_dir.name}/{rel} to {location}: {exc}") from exc
    return location


def _put(fs, src: Path, dst: str) -> None:
    fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)  # folders need it; object stores ignore it
    fs.put_file(str(src), dst)


def _published(fs, remote_round: str, manifest: dict, manifest_bytes: bytes) -> bool:
    """The round is already there: same manifest, and every file it lists has the recorded size (a same-size
    corruption is still caught where it matters: ``download`` checks each sha256)."""
    try:
        if fs.cat_file(f"{remote_round}/manifest.json") != manifest_bytes:
            return False
        entries = [e for stage in DOWNLOAD_STAGES for e in manifest["stages"][stage]["files"]]
        return all(fs.size(f"{remote_round}/{e['path']}") == e["bytes"] for e in entries)
    except FileNotFoundError:
        return False
