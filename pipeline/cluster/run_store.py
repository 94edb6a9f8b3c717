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
import shutil
from pathlib import Path
from typing import Any

from stages.storage import files as storage
from stages.storage.files import Location, StorageError
from stages.storage.layout import (
    CONFIG,
    MANIFEST,
    METRICS,
    ROUND_DELIVERABLES,
    STATUS,
    RunLayout,
    locate_run,
    round_name,
)


def _rel(r: int, file: str) -> str:
    """``round-NNN/<file>``, relative to the run."""
    return f"{round_name(r)}/{file}"


def round_files(manifest: dict) -> list[dict]:
    """The manifest entries a download or publish copies: the round's deliverables (``ROUND_DELIVERABLES``: the
    model, its card, its metrics); not the evaluate stage's prediction sidecars under ``eval/``, which can be larger
    than the model and stay with the run. The manifest itself is copied last, by the caller."""
    wanted = set(ROUND_DELIVERABLES) - {MANIFEST}
    return [e for stage in manifest["stages"].values() for e in stage.get("files", []) if e["path"] in wanted]


class RunStoreError(RuntimeError):
    """A run, round or file that is missing, unfinished or damaged in storage; the CLI prints it as one line."""


class RunStore:
    """One run's folder under a storage root, read through ``stages.storage.files`` (a folder or any fsspec URL)."""

    def __init__(self, run: str, storage_root: str = "runs"):
        try:
            storage.check_storage(run if storage.is_url(run) else storage_root)
            location = locate_run(run, storage_root)
        except StorageError as exc:
            raise RunStoreError(str(exc)) from exc
        self.location = location
        self.name = storage.name(location)

    def _path(self, rel: str) -> Location:
        return storage.join(self.location, rel)

    def _exists(self, rel: str) -> bool:
        try:
            return storage.exists(self._path(rel))
        except OSError as exc:
            raise RunStoreError(f"cannot read {self.location}/{rel}: {exc}") from exc

    def read_json(self, rel: str) -> Any:
        try:
            return storage.read_json(self._path(rel))
        except FileNotFoundError as exc:
            raise RunStoreError(f"{self.location}/{rel} is missing") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunStoreError(f"cannot read {self.location}/{rel}: {exc}") from exc

    def status(self) -> dict:
        return self.read_json(STATUS) if self._exists(STATUS) else {}

    def round_indices(self) -> list[int]:
        return RunLayout(self.location).round_indices()

    def manifest(self, r: int) -> dict:
        rel = _rel(r, MANIFEST)
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
                row.update(self.read_json(_rel(r, METRICS)))
                row["finished_at"] = stages["evaluate"].get("finished_at", "")
            rows.append(row)
        return rows

    def best_round(self, finished: list[int]) -> int:
        """The best round ``run.json`` records (chosen on validation top-1, ``pipeline/choices.py``) when it is
        finished; else the latest finished round (a run without a validation split, or from before them)."""
        best = (self.status().get("stop") or {}).get("best_round")
        return best if best in finished else finished[-1]

    def download_round(self, r: int, dest: str | Path) -> Path:
        """Copy round ``r``'s model files, metrics and manifest to ``dest/round-NNN``, verifying each sha256."""
        manifest = self.manifest(r)
        if not self.finished(r):
            done = [s for s, e in manifest["stages"].items() if e.get("status") == "done"]
            raise RunStoreError(
                f"round {r} of {self.location} is not finished (stages done: {', '.join(done) or 'none'})"
            )
        final = Path(dest) / round_name(r)
        partial = Path(dest) / f".{round_name(r)}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for entry in round_files(manifest):
                self._copy_verified(_rel(r, entry["path"]), entry, partial / entry["path"])
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    def _copy_verified(self, rel: str, entry: dict, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with storage.open_read(self._path(rel)) as src, open(target, "wb") as out:
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
        """The chosen round (default: the best one by validation, else the latest finished one), or every finished
        round; plus config and run.json."""
        finished = [r for r in self.round_indices() if self.finished(r)]
        if all_rounds:
            chosen = finished
        elif round_index is not None:
            chosen = [round_index]
        else:
            chosen = [self.best_round(finished)] if finished else []
        if not chosen:
            raise RunStoreError(f"{self.location} has no finished round yet")
        if round_index is not None and round_index not in self.round_indices():
            raise RunStoreError(f"{self.location} has no round {round_index} (rounds: {self.round_indices()})")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for rel in (CONFIG, STATUS):
            if self._exists(rel):
                (dest / rel).write_bytes(storage.read_bytes(self._path(rel)))
        return [self.download_round(r, dest) for r in chosen]


def publish_round(run_dir: Location, round_index: int, target: str) -> str:
    """Upload a finished round's model files, metrics and manifest, plus the run's config and status, to
    ``<target>/<run>/`` (any fsspec URL: ``s3://bucket/runs``, ``gs://…``, a folder), where ``rounds`` and
    ``download`` read them. The run itself may be in a folder or at a URL. Each file is written whole (an object
    store has no partial objects; a folder gets a temporary and a rename); the manifest goes last, so a reader never
    sees a manifest whose files are not there yet. Returns the run's location under ``target``."""
    rel = round_name(round_index)
    source = storage.join(run_dir, rel)
    location = storage.join(target if storage.is_url(target) else storage.local_path(target), storage.name(run_dir))
    try:
        manifest_bytes = storage.read_bytes(storage.join(source, MANIFEST))
        manifest = json.loads(manifest_bytes)
        if not _published(storage.join(location, rel), manifest, manifest_bytes):
            for entry in round_files(manifest):
                storage.copy_file(storage.join(source, entry["path"]), storage.join(location, rel, entry["path"]))
            storage.copy_file(storage.join(source, MANIFEST), storage.join(location, rel, MANIFEST))
        # the run's config and status, also when the round was there already (the status may have moved)
        for name in (CONFIG, STATUS):
            storage.copy_file(storage.join(run_dir, name), storage.join(location, name))
    except (OSError, ImportError, ValueError) as exc:
        raise RunStoreError(f"cannot publish {storage.name(run_dir)}/{rel} to {location}: {exc}") from exc
    return str(location)


def _published(remote_round: Location, manifest: dict, manifest_bytes: bytes) -> bool:
    """The round is already there: same manifest, and every file it lists has the recorded size (a same-size
    corruption is still caught where it matters: ``download`` checks each sha256)."""
    try:
        if storage.read_bytes(storage.join(remote_round, MANIFEST)) != manifest_bytes:
            return False
        entries = round_files(manifest)
        return all(storage.size(storage.join(remote_round, e["path"])) == e["bytes"] for e in entries)
    except FileNotFoundError:
        return False
