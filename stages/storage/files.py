"""Run storage: one root for every node, atomic writes, sha256 manifests, and the stable run layout.

The storage root is a local folder (the default), a shared filesystem on a cluster, or an object-store URL
(``s3://bucket/runs``, ``gs://…``, any URL fsspec opens; ``file://`` counts as a local folder). Every writer and
reader of a run goes through the functions here with a *location*: a ``Path`` (or plain string) for a local
file, a URL string otherwise. ``join`` keeps that kind: a local location joins to a ``Path``, a URL to a URL, so
a URL is never turned into a local ``s3:/bucket`` folder by ``pathlib``. Credentials come from the usual places
(environment, profile files); they are never written into the run.

Why here. Storage is the bottom floor: ``stages/`` (checkpoints, sidecars, model files) and ``pipeline/`` (run
files, report, cluster client) both read and write through it, so it lives in the lower package and imports
nothing of either. It is one module, not its own package: it has one concern and no parts.

Why not ``universal-pathlib`` (``UPath``, looked at for this move, 0.3.10 on PyPI). It would give one pathlib API
for ``join``/``name``/``parent``/``exists``/``open``, but those are already one function each here, and the
branches left outside this module (14 ``is_url`` calls) are not about path syntax: they choose *behaviour*
(build the report on a node-local copy and upload it; hand Ray Train an fsspec filesystem; skip ``os.replace`` on
a store that cannot rename). ``UPath`` keeps those choices, adds a dependency whose API still moves between minor
versions, and would make every ``Location`` a non-``Path`` object that Ray, pyarrow and torch would have to be
handed ``str()`` of. So ``Location = str | Path`` stays, with ``join`` keeping its kind.

Layout (users and later tools rely on it)::

    <storage>/<run>/config.yaml                  resolved config
    <storage>/<run>/run.json                     status, rounds completed, per-stage timings
    <storage>/<run>/round-NNN/model.safetensors  weights (no pickle)
    <storage>/<run>/round-NNN/model.json         timm name, kwargs, num_classes, input size, mean/std
    <storage>/<run>/round-NNN/metrics.json       test top-1, per-class top-1, train images, ...
    <storage>/<run>/round-NNN/train_metrics.jsonl  one JSON line per training epoch
    <storage>/<run>/round-NNN/pseudo_labels/     soft labels from the previous model (Parquet per shard)
    <storage>/<run>/round-NNN/selection/         what was kept (Parquet per shard), the compact training shards
                                                 (a tar per shard with kept samples) + selection.json/png
    <storage>/<run>/round-NNN/eval/<split>/      the model's predictions per test/val/corrupted shard (Parquet)
    <storage>/<run>/round-NNN/manifest.json      stages completed, inputs, sha256 of each file
    <storage>/<run>/ray_train/                   Ray Train's checkpoints (one run per round and inputs)
    <storage>/<run>/report.html                  the run report (pipeline/report/page.py), rewritten after every round
    <storage>/<run>/tensorboard/                 TensorBoard events (pipeline/report/tensorboard.py)
    <storage>/.scan-cache/                       labeled/test/val shard scans by shard identity
    (stages/data/labeled_scan.py)

Atomic writes. On a local folder every file is written to a temporary name in its directory and renamed, so a
reader never sees half a file; temporaries left by a killed process (``.<name>.*.tmp``) are swept by
``remove_temp_files`` before a stage reruns. On an object store a file is written to a node-local temporary and
uploaded as one object: a PUT is all-or-nothing, so there are no partial objects and no temporaries under the
URL. Either way ``manifest.json`` is written after the files it lists and records each file's size and sha256,
read back through the same functions, so a resume can tell a complete file from a damaged or missing one.
A write that fails (disk full, read-only, quota, a refused upload) raises ``StorageError`` naming the file.

What an object store cannot do: rename (so ``train_metrics.jsonl`` is rewritten whole on each append rather than
appended to) and locking. There is no run lock on either kind of storage: two processes running the same run at
once write the same files, each write whole, and the manifests keep only what verifies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Location = str | Path  # a local path, or a URL string fsspec opens

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(OSError):
    """The run's storage cannot be used: a write failed (disk full, read-only, permissions, a refused upload), or
    the storage URL cannot be opened (unknown protocol, missing fsspec extra, unreachable bucket); names the path."""


def is_url(location: Location) -> bool:
    """A URL for fsspec (``s3://``, ``gs://``, ...); ``file://`` URLs and plain paths are local."""
    text = str(location)
    return bool(_URL_RE.match(text)) and not text.startswith("file://")


def local_path(location: Location) -> Path:
    """The ``Path`` of a local location (``file://`` prefix removed)."""
    return location if isinstance(location, Path) else Path(location.removeprefix("file://"))


def join(location: Location, *parts: str) -> Location:
    """``location/part/...``: a ``Path`` for a local location, a URL string for a URL."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return local_path(location).joinpath(*parts)


def name(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else local_path(location).name


def parent(location: Location) -> Location:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_url(location) else local_path(location).parent


def relative(location: Location, root: Location) -> str:
    """``location`` relative to ``root`` (``round-001/model.json`` style, ``/`` separated)."""
    if is_url(location):
        prefix = str(root).rstrip("/") + "/"
        if not str(location).startswith(prefix):
            raise ValueError(f"{location} is not under {root}")
        return str(location)[len(prefix) :]
    return str(local_path(location).relative_to(local_path(root)))


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)`` for a URL; a ``StorageError`` naming the URL when fsspec cannot
    open it (unknown protocol, the protocol's package not installed: ``pip install 'noisy-student[s3]'``)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise StorageError(f"cannot open storage {url}: {exc} (s3:// needs s3fs, gs:// needs gcsfs)") from exc
    except (ValueError, TypeError) as exc:
        raise StorageError(f"cannot open storage {url}: {exc}") from exc


def _fs_path(location: str):
    """The filesystem and path of a URL, with any listing fsspec cached for it dropped: other processes and nodes
    write to the same store, so a cached listing can be stale."""
    fs, path = filesystem(location)
    fs.invalidate_cache(path)
    return fs, path


def check_storage(location: Location) -> None:
    """Cheap check at config load (no network, no import): fsspec knows the URL's protocol. Whether its package
    (s3fs, gcsfs) is installed is checked where the run starts (``probe_storage``): ``submit`` validates a config
    on a laptop that need not have the cluster's packages."""
    if not is_url(location):
        return
    import fsspec

    protocol = str(location).split("://", 1)[0]
    if protocol not in fsspec.available_protocols():
        raise StorageError(f"cannot open storage {location}: unknown protocol {protocol!r} (not one fsspec knows)")


def probe_storage(location: Location) -> None:
    """Before any work, on a URL: write (and remove) a small object under the root, so that a missing bucket,
    wrong credentials or an unreachable endpoint stop the run with one line instead of failing its first stage."""
    if not is_url(location):
        return
    fs, root = filesystem(str(location))  # the protocol's package missing: a StorageError saying which to install
    path = f"{root.rstrip('/')}/.write-check"
    try:
        fs.pipe_file(path, b"ok\n")
        fs.rm_file(path)
    except Exception as exc:  # fsspec back ends raise OSError subclasses, botocore/aiohttp errors, ...
        raise StorageError(f"cannot write to storage {location}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0] or type(exc).__name__


TEMP_SUFFIX = ".tmp"
# errnos that mean "this storage cannot take the write", whatever wrote it (ours, pyarrow's, Ray Train's)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})


def write_error(path: Location, exc: BaseException) -> StorageError:
    """One line naming ``path`` and the reason (``No space left on device``), for a failed write of ``path``."""
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "errno", None)
    # Rust writers (safetensors) say it in words, shutil.copytree in a list of "[Errno N] ..." strings
    if not code and (found := re.search(r"os error (\d+)|\[Errno (\d+)\]", str(exc))):
        code = int(found.group(1) or found.group(2))
    reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    error = StorageError(f"cannot write {path}: {reason}")
    error.errno = code  # kept for callers; the message stays the one line above
    return error


def storage_error(exc: BaseException, where: Location) -> StorageError | None:
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
def atomic_target(path: Location) -> Iterator[Path]:
    """Yields a local temporary path to write; when the block succeeds it becomes ``path`` whole.

    Local: the temporary sits beside ``path`` and is renamed onto it. URL: the temporary is in a node-local
    folder and is uploaded as one object (never under the URL). On any failure the temporary is removed; an
    ``OSError`` becomes a ``StorageError`` naming ``path``.
    """
    if is_url(path):
        with _upload_target(str(path)) as tmp:
            yield tmp
        return
    path = local_path(path)
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


@contextlib.contextmanager
def _upload_target(url: str) -> Iterator[Path]:
    scratch = Path(tempfile.mkdtemp(prefix="ns-upload-"))
    tmp = scratch / name(url)
    try:
        yield tmp
        upload(tmp, url)
    except OSError as exc:
        raise write_error(url, exc) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def upload(src: Path, url: str) -> None:
    """Copy the local file ``src`` to ``url`` as one object (a failed upload leaves no object behind)."""
    fs, path = filesystem(url)
    try:
        try:
            fs.put_file(str(src), path)
        except FileNotFoundError:  # a store with real folders (sftp, hdfs, ...) whose folder is not there yet
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(src), path)
    except OSError as exc:
        raise write_error(url, exc) from exc
    except Exception as exc:  # a back end's own error (botocore, aiohttp): still one line naming the object
        raise StorageError(f"cannot write {url}: {_reason(exc)}") from exc


def atomic_write_bytes(path: Location, data: bytes) -> None:
    if is_url(path):
        with _upload_target(str(path)) as tmp:
            tmp.write_bytes(data)
        return
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_temp_files(folder: Location) -> list[Path]:
    """Remove the temporaries a killed writer left under ``folder`` (never trusted, but they take space).

    A URL has none: its writes upload whole objects from node-local temporaries."""
    if is_url(folder):
        return []
    removed = []
    for tmp in local_path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: Location, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Location, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def copy_file(src: Location, dst: Location) -> None:
    """Copy one file between any two locations, written atomically at ``dst`` (streamed, never whole in memory)."""
    with atomic_target(dst) as tmp, open_read(src) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def append_text(path: Location, text: str) -> None:
    """Append ``text``. An object store cannot append: the object is read and written back whole (small logs only)."""
    if is_url(path):
        atomic_write_text(path, (read_text(path) if exists(path) else "") + text)
        return
    with open(local_path(path), "a") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- reading


def open_read(location: Location):
    """A binary file object for reading (a ``FileNotFoundError`` when it is not there)."""
    if is_url(location):
        fs, path = _fs_path(str(location))
        return fs.open(path, "rb")
    return open(local_path(location), "rb")


def read_bytes(location: Location) -> bytes:
    with open_read(location) as f:
        return f.read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def read_json(path: Location) -> Any:
    return json.loads(read_bytes(path))


def read_table(location: Location, columns: list[str] | None = None):
    """A Parquet file as a ``pyarrow.Table`` (URLs through fsspec, so every node uses the same credentials)."""
    import pyarrow.parquet as pq

    if not is_url(location):
        return pq.read_table(local_path(location), columns=columns)
    with open_read(location) as f:
        return pq.read_table(f, columns=columns)


def exists(location: Location) -> bool:
    if is_url(location):
        fs, path = _fs_path(str(location))
        return bool(fs.exists(path))
    return local_path(location).exists()


def is_file(location: Location) -> bool:
    if is_url(location):
        fs, path = _fs_path(str(location))
        return bool(fs.isfile(path))
    return local_path(location).is_file()


def size(location: Location) -> int:
    if is_url(location):
        fs, path = _fs_path(str(location))
        return int(fs.size(path))
    return local_path(location).stat().st_size


def stamp(location: Location) -> str:
    """Size and version of a file (local: mtime; object: ETag or modification time): changes when it is rewritten."""
    if not is_url(location):
        stat = local_path(location).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    fs, path = _fs_path(str(location))
    info = fs.info(path)
    keys = ("ETag", "etag", "generation", "LastModified", "mtime", "updated")
    version = next((str(info[k]) for k in keys if info.get(k)), None)
    return f"{info['size']}:{version or sha256_file(location)}"  # no version field: the content itself


def identity(location: Location) -> str:
    """``stamp`` plus, for a local file, its inode: an atomic rewrite (a new file renamed over the old one) changes it
    even within the filesystem's timestamp granularity. What a manifest compares before it re-hashes a file."""
    if is_url(location):
        return stamp(location)
    return f"{stamp(location)}:{local_path(location).stat().st_ino}"


def modified(location: Location) -> float | None:
    """Modification time (seconds since the epoch), or None when unknown or missing."""
    try:
        if not is_url(location):
            return local_path(location).stat().st_mtime
        fs, path = _fs_path(str(location))
        return fs.modified(path).timestamp()
    except (OSError, NotImplementedError):
        return None


def remove_file(location: Location) -> None:
    """Delete a file or object if it is there (a missing one is not an error)."""
    try:
        if not is_url(location):
            local_path(location).unlink(missing_ok=True)
            return
        fs, path = _fs_path(str(location))
        if fs.exists(path):
            fs.rm_file(path)
    except OSError as exc:
        raise write_error(location, exc) from exc


def makedirs(location: Location) -> None:
    """A folder for a local location; nothing for a URL (object stores have no folders; writes make their own)."""
    if not is_url(location):
        local_path(location).mkdir(parents=True, exist_ok=True)


def listdir(location: Location) -> list[str]:
    """Names of the entries directly under ``location`` (empty when it is not there)."""
    if not is_url(location):
        folder = local_path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = _fs_path(str(location))
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def download_tree(url: str, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under ``url`` into ``dest`` (same relative paths), except under top-level folders ``skip``."""
    fs, root = _fs_path(url)
    root = root.rstrip("/")
    for path in fs.find(root):
        rel = path[len(root) + 1 :]
        if rel.split("/", 1)[0] in skip:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(dest / rel))


def upload_tree(src: Path, url: str, replace: bool = False) -> None:
    """Upload every file under the local folder ``src`` to ``url``; ``replace`` first removes what is there."""
    if replace:
        fs, path = _fs_path(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        upload(f, str(join(url, *f.relative_to(src).parts)))


def sha256_file(path: Location, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_read(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
