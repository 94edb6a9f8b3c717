"""Artifacts that say what made them: the one way every stage decides whether a file it finds can be trusted.

A later stage, a resumed run or a second run over the same data meets files written earlier: by this plan, by an
older plan (another teacher, another config), or cut short or damaged. Three records answer "may I use it?":

* **A table's footer** (``write_table`` / ``trusted_table``). Every Parquet artifact (pseudo-label, selection and
  evaluation sidecars, the labeled-scan cache) carries in its schema metadata its ``format``, ``made_by`` (the
  digest of everything that decided its content: the teacher's weights, the config, the shard's identity, the plan)
  and ``content`` (a digest of its rows, computed once as it is written). A table is trusted only when its footer
  names the inputs the current plan would use, and, when asked (``verify``: a stage resuming after an
  interruption), when its rows still hash to ``content``: a changed teacher relabels, changed labels reselect, and
  a file damaged in place, even at the same size, is redone.
* **A file's receipt** (``file_receipt`` / ``file_matches``): ``{"bytes", "sha256"}`` of a non-table file (a compact
  training tar, a converted shard), recorded by whatever vouches for it (the selection sidecar's footer, the
  converter's record beside the shard) right after the file is written.
* **The round manifest** (``RoundManifest``): the stages a round finished, their inputs and, per file, its size,
  its stamp (size, modification time and inode, or an object's ETag) and its sha256. A finished stage is done when its
  inputs match and every file still has its recorded size and stamp; only a file whose stamp moved is hashed again.
  No resume re-hashes gigabytes of untouched files.

``inputs_digest`` is how every ``made_by`` is spelled: a short sha256 of the named parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

from stages.storage.files import (
    Location,
    atomic_write_bytes,
    atomic_write_json,
    exists,
    identity,
    is_file,
    join,
    open_read,
    read_json,
    relative,
    sha256_file,
    size,
)
from stages.storage.layout import MANIFEST

log = logging.getLogger(__name__)


def inputs_digest(**parts: Any) -> str:
    """A short, stable digest of named inputs (JSON of the parts, keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ---------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Footer:
    """What a table artifact records about itself."""

    format: str
    made_by: str
    rows: int
    content: str
    meta: dict[str, str]


_RESERVED = ("format", "made_by", "rows", "content")


def table_digest(table) -> str:
    """A digest of a table's values, column by column: independent of chunking, schema metadata and the field
    names Parquet gives list items, so a table read back hashes as it did when it was written."""
    import pyarrow as pa

    h = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns, strict=True):
        h.update(name.encode() + b"\0")
        _feed(h, column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    return h.hexdigest()


def _feed(h, array) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if array.null_count:
        h.update(b"nulls" + np.asarray(array.is_null()).tobytes())
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        h.update(np.asarray(pc.list_value_length(array).fill_null(0), dtype=np.int64).tobytes())
        _feed(h, pc.list_flatten(array))
    elif pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind):
        wide = array.cast(pa.large_binary()).fill_null(b"")
        offsets = np.frombuffer(wide.buffers()[1], dtype=np.int64, count=len(wide) + 1, offset=wide.offset * 8)
        h.update(np.diff(offsets).tobytes())
        if len(wide) and wide.buffers()[2] is not None:
            h.update(memoryview(wide.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    elif pa.types.is_fixed_size_binary(kind):
        width = kind.byte_width
        data = array.buffers()[1]
        h.update(memoryview(data)[array.offset * width : (array.offset + len(array)) * width] if data else b"")
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        h.update(np.asarray(array.fill_null(0) if array.null_count else array).tobytes())
    else:  # any other type: its values as text (slow, but no sidecar of ours has one)
        h.update(json.dumps(array.to_pylist(), default=str).encode())


def write_table(table, path: Location, *, format: str, made_by: str, **meta: Any) -> Footer:
    """Write ``table`` atomically as Parquet with its footer; a failed write is a ``StorageError`` naming ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    footer = Footer(format, made_by, table.num_rows, table_digest(table), {k: str(v) for k, v in meta.items()})
    kv = {"format": format, "made_by": made_by, "rows": str(footer.rows), "content": footer.content} | footer.meta
    # Serialised in memory, then written by Python's own file object: a write that fails (a full disk) closes its
    # file whatever happens, where pyarrow's writer could keep a descriptor to the deleted temporary open.
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(kv), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return footer


def read_footer(path: Location, format: str) -> Footer | None:
    """The footer of a complete table in ``format``: None when missing, half-written, of another format, or holding
    another number of rows than it records. Only the footer is read (a few ranged reads on an object store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_read(path) as f:
            parquet = pq.ParquetFile(f)
            num_rows, kv = parquet.metadata.num_rows, parquet.schema_arrow.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    meta = {k.decode(): v.decode() for k, v in kv.items() if k != b"ARROW:schema"}
    if meta.get("format") != format or meta.get("rows") != str(num_rows) or "content" not in meta:
        return None
    return Footer(
        format,
        meta.get("made_by", ""),
        num_rows,
        meta["content"],
        {k: v for k, v in meta.items() if k not in _RESERVED},
    )


def read_verified(path: Location, footer: Footer, columns: list[str] | None = None):
    """The table at ``path`` when its rows hash to the footer's ``content``, else None (damaged in place)."""
    import pyarrow as pa

    from stages.storage.files import read_table

    try:
        table = read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        log.warning("%s cannot be read back (%s); it will be written again", path, exc)
        return None
    if table_digest(table) != footer.content:
        log.warning("%s does not hash to the digest it was written with; it will be written again", path)
        return None
    return table.select(columns) if columns else table


def trusted_table(path: Location, format: str, made_by: str, verify: bool = True) -> Footer | None:
    """The footer of a table that these inputs made (``made_by``) and, with ``verify``, whose rows are whole."""
    footer = read_footer(path, format)
    if footer is None or footer.made_by != made_by:
        return None
    if verify and read_verified(path, footer) is None:
        return None
    return footer


# ---------------------------------------------------------------- other files


def file_receipt(path: Location) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file just written, for whatever vouches for it to record."""
    return {"bytes": size(path), "sha256": sha256_file(path)}


def file_matches(path: Location, receipt: dict, verify: bool = True) -> bool:
    """Whether ``path`` is there with the receipt's size and, with ``verify``, its sha256."""
    if not is_file(path) or size(path) != int(receipt.get("bytes", -1)):
        return False
    return not verify or sha256_file(path) == receipt.get("sha256")


def write_receipt(path: Location, file: Location, *, format: str, made_by: str, **meta: Any) -> dict:
    """A JSON receipt at ``path`` for ``file`` (written before it): format, what made it, size and sha256."""
    receipt = {"format": format, "made_by": made_by, **file_receipt(file), **meta}
    atomic_write_json(path, receipt)
    return receipt


def trusted_receipt(path: Location, file: Location, format: str, made_by: str, verify: bool = True) -> dict | None:
    """The receipt at ``path`` when it is of ``format``, names ``made_by``, and ``file`` still matches it."""
    try:
        receipt = read_json(path) if exists(path) else None
    except (OSError, ValueError):
        return None
    if not receipt or receipt.get("format") != format or receipt.get("made_by") != made_by:
        return None
    return receipt if file_matches(file, receipt, verify) else None


# ---------------------------------------------------------------- the round manifest


def file_entry(path: Location, root: Location) -> dict:
    """A manifest entry: the path relative to ``root``, size, stamp and sha256 (hashed once, here)."""
    return {"path": relative(path, root), "bytes": size(path), "stamp": identity(path), "sha256": sha256_file(path)}


def verify_entry(entry: dict, root: Location, rehash: bool = False) -> str | None:
    """None when the file matches its entry, else the reason. A file whose size and stamp are unchanged since it was
    recorded is not read again unless ``rehash`` (``download`` re-hashes what it hands over)."""
    path = join(root, entry["path"])
    if not is_file(path):
        return f"{path} is missing"
    if (found := size(path)) != entry["bytes"]:
        return f"{path} has {found} bytes, manifest says {entry['bytes']}"
    if not rehash and entry.get("stamp") and identity(path) == entry["stamp"]:
        return None
    if sha256_file(path) != entry["sha256"]:
        return f"{path} sha256 differs from the manifest"
    return None


class RoundManifest:
    """``round-NNN/manifest.json``: the stages a round finished, their inputs, and every file they wrote.

    A stage counts as done only when it is recorded here from the same inputs and all its files still verify
    (``verify_entry``); anything else is redone, with every stage after it.
    """

    def __init__(self, round_dir: Location):
        self.dir = join(round_dir)
        self.path = join(round_dir, MANIFEST)
        self.data: dict = {"round": None, "stages": {}}
        if exists(self.path):
            try:
                self.data = read_json(self.path)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {"round": None, "stages": {}}  # a damaged manifest is never trusted: redo its stages

    def stage_done(self, stage: str, inputs: dict | None = None) -> bool:
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("status") != "done" or entry.get("inputs", {}) != (inputs or {}):
            return False
        return all(verify_entry(f, self.dir) is None for f in entry.get("files", []))

    def stage(self, stage: str) -> dict:
        return self.data["stages"][stage]

    def result(self, stage: str) -> dict:
        """What a finished stage returned (its summary); empty when it has not finished."""
        return self.data["stages"].get(stage, {}).get("result", {})

    def digest(self, stage: str) -> str:
        """The recorded digest of a finished stage's outputs (what later stages name as their input)."""
        return self.data["stages"][stage]["digest"]

    def file_sha(self, stage: str, path: Location) -> str | None:
        """The recorded sha256 of one of a finished stage's files, or None."""
        rel = relative(path, self.dir)
        files = self.data["stages"].get(stage, {}).get("files", [])
        return next((f["sha256"] for f in files if f["path"] == rel), None)

    def record(self, stage: str, files: list, seconds: float, inputs: dict | None = None, **info: Any) -> None:
        """Record ``stage`` done: its inputs, each file's entry (hashed once, here) and ``digest``, one digest of
        them all that later stages name as their input."""
        entries = [file_entry(f, self.dir) for f in sorted(files, key=str)]
        self.data["stages"][stage] = {
            "status": "done",
            "inputs": inputs or {},
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": entries,
            "digest": files_digest(entries),
            **info,
        }
        atomic_write_json(self.path, self.data)

    def forget(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            atomic_write_json(self.path, self.data)


def files_digest(entries: list[dict]) -> str:
    """One digest for a set of recorded files (their relative paths and sha256s)."""
    h = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e["path"]):
        h.update(f"{entry['path']}:{entry['sha256']}".encode())
    return h.hexdigest()
