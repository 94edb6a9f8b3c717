"""WebDataset shards: expanding shard patterns, streaming samples, decoding images, writing shards.

A sample is one image (``.png``, ``.jpg``, ``.jpeg`` or ``.webp``) plus, for labeled and test data, ``.cls``
holding the integer class as text. Shards are opened through fsspec, so local paths, ``file://``, ``s3://``,
``gs://`` and ``http(s)://`` all work (object stores need their fsspec driver, e.g. ``s3fs``), and the tar
stream is parsed by the webdataset library.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class DataError(ValueError):
    """Bad input data: a pattern matching nothing, an unreadable shard, a label out of range."""


class BadSample(ValueError):
    """One sample that cannot be used (no image, undecodable image); counted and skipped by callers."""


def is_url(path: str) -> bool:
    return bool(_URL_RE.match(path)) and not path.startswith("file://")


def expand_shards(patterns: Sequence[str], what: str = "data set") -> list[str]:
    """Expand brace patterns and local globs into a sorted, de-duplicated shard list.

    Raises ``DataError`` naming the pattern when one matches no shard, so that nothing starts on partial data.
    """
    shards: list[str] = []
    for pattern in patterns:
        matched: list[str] = []
        for candidate in braceexpand(pattern):
            if is_url(candidate):
                matched.append(candidate)  # listing an object store needs credentials; existence is checked on open
                continue
            local = candidate.removeprefix("file://")
            if glob.has_magic(local):
                matched.extend(sorted(glob.glob(local)))
            elif os.path.isfile(local):
                matched.append(local)
        if not matched:
            raise DataError(f"{what}: no shard matches {pattern!r} (check the path; cwd is {os.getcwd()})")
        shards.extend(matched)
    return list(dict.fromkeys(shards))


def shard_id(url: str) -> str:
    """A stable file-name-safe id for a shard: its base name plus a short hash of the full URL."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(url.rstrip("/")))
    base = re.sub(r"\.tar$", "", base)
    return f"{base}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Yield the raw samples of one shard as ``{"__key__", "__url__", ext: bytes, ...}``.

    A truncated or corrupt tar raises ``DataError`` naming the shard (samples before the damage are yielded).
    """
    try:
        with fsspec.open(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"shard {url}: truncated or corrupt tar ({exc})") from exc


def image_field(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"no image (.{'/.'.join(IMAGE_EXTENSIONS)}) in sample; fields: {sorted(sample)}")


def decode_image(data: bytes, channels: int) -> Image.Image:
    """Decode an image of any mode to ``L`` (channels=1) or ``RGB`` (channels=3)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadSample(f"undecodable image ({exc.__class__.__name__}: {exc})") from exc
    if image.mode in ("RGBA", "LA", "P") and channels == 3:
        image = image.convert("RGBA")  # composite transparency deterministically before dropping alpha
    return image.convert("L" if channels == 1 else "RGB")


def parse_label(sample: dict, num_classes: int) -> int:
    """The ``.cls`` field as an int in ``[0, num_classes)``; raises ``DataError`` (not a skip) when out of range."""
    raw = sample.get("cls")
    if raw is None:
        raise BadSample("no .cls field in a labeled sample")
    try:
        label = int(raw.decode().strip() if isinstance(raw, bytes) else raw)
    except ValueError as exc:
        raise BadSample(f".cls is not an integer: {raw!r}") from exc
    if not 0 <= label < num_classes:
        raise DataError(
            f"shard {sample.get('__url__')}: sample {sample.get('__key__')} has class {label}, "
            f"outside [0, {num_classes}) (set data.num_classes?)"
        )
    return label


def optional_label(sample: dict) -> int:
    """The ``.cls`` of an unlabeled sample for diagnostics, or -1 when absent or unparsable."""
    raw = sample.get("cls")
    try:
        return int(raw.decode().strip()) if raw is not None else -1
    except ValueError:
        return -1


@dataclass(frozen=True)
class LabeledSet:
    """A small labeled set held in memory (labeled and test splits are small by assumption of the method)."""

    keys: list[str]
    images: list[Image.Image]
    labels: np.ndarray
    skipped: list[dict]

    def __len__(self) -> int:
        return len(self.labels)


def load_labeled(
    shards: Iterable[str], num_classes: int, channels: int, max_bad_fraction: float = 0.0, what: str = "labeled"
) -> LabeledSet:
    """Read and decode a labeled split. Bad samples are counted and listed; too many of them is an error."""
    keys, images, labels, skipped = [], [], [], []
    for url in shards:
        n_before = len(keys) + len(skipped)
        for sample in iter_raw_samples(url):
            try:
                image = decode_image(image_field(sample), channels)
                label = parse_label(sample, num_classes)
            except BadSample as exc:
                skipped.append({"shard": url, "key": sample["__key__"], "reason": str(exc)})
                continue
            keys.append(sample["__key__"])
            images.append(image)
            labels.append(label)
        if len(keys) + len(skipped) == n_before:
            raise DataError(f"{what}: shard {url} holds no samples")
    total = len(keys) + len(skipped)
    if not keys:
        raise DataError(f"{what}: no usable samples in {total} read")
    if len(skipped) > max_bad_fraction * total:
        first = skipped[0]
        raise DataError(
            f"{what}: {len(skipped)} of {total} samples unusable (allowed fraction {max_bad_fraction}); "
            f"first: {first['shard']} {first['key']}: {first['reason']}"
        )
    for item in skipped:
        log.warning("%s: skipped %s in %s: %s", what, item["key"], item["shard"], item["reason"])
    return LabeledSet(keys, images, np.asarray(labels, dtype=np.int64), skipped)


def write_shards(samples: Sequence[dict], out_dir: str | Path, prefix: str, num_shards: int) -> list[str]:
    """Write samples (``__key__`` plus ``ext -> bytes``) into ``num_shards`` tar shards, contiguous chunks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(samples)), num_shards)):
        path = out_dir / f"{prefix}-{i:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for j in chunk:
                sample = samples[int(j)]
                for ext, payload in sample.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(payload)
                    info.mtime = 0  # byte-identical shards for identical inputs
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))
