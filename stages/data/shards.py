"""WebDataset shards: expanding shard patterns, streaming samples, decoding images, writing shards.

A sample is one image (``.png``, ``.jpg``, ``.jpeg`` or ``.webp``) plus, for labeled and test data, ``.cls``
holding the integer class as text. Shards are opened through fsspec, so local paths, ``file://``, ``s3://``,
``gs://`` and ``http(s)://`` all work (object stores need their fsspec driver, e.g. ``s3fs``), and the tar
stream is parsed by the webdataset library.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys

from stages.core.errors import BadSample, DataError
from stages.storage.files import is_url

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale as Pillow opens it
UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)  # what Pillow raises for a bad image
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's archive metadata (skip_meta), not sample files


def expand_shards(patterns: Sequence[str], what: str = "data set") -> list[str]:
    """Expand brace patterns and local globs into a sorted, de-duplicated shard list.

    Every local shard a brace pattern names must exist, and every glob must match at least one file: otherwise
    ``DataError`` names the shard or pattern, so that nothing starts on partial data. Local shards come back as
    absolute paths (Ray workers run in other folders). Object-store URLs are kept as written (listing a bucket
    needs credentials); they are checked when opened.
    """
    shards: set[str] = set()
    for pattern in patterns:
        for candidate in braceexpand(pattern):
            shards.update(_expand_candidate(candidate, pattern, what))
    return sorted(shards)


def _expand_candidate(candidate: str, pattern: str, what: str) -> list[str]:
    """The shards one brace-expanded candidate names; a local one matching nothing is a ``DataError``."""
    if is_url(candidate):
        return [candidate]
    local = candidate.removeprefix("file://")
    source = f"{candidate!r}" if candidate == pattern else f"{candidate!r} (from {pattern!r})"
    if glob.has_magic(local):
        matched = glob.glob(local)
        if not matched:
            raise DataError(f"{what}: no shard matches {source} (check the path; cwd is {os.getcwd()})")
        return [os.path.abspath(m) for m in matched]
    if not os.path.isfile(local):
        raise DataError(f"{what}: no shard file {source} (check the path; cwd is {os.getcwd()})")
    return [os.path.abspath(local)]


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Yield the raw samples of one shard as ``{"__key__", "__url__", ext: bytes, ...}``.

    A truncated or corrupt tar raises ``DataError`` naming the shard (samples before the damage are yielded).
    """
    try:
        with fsspec.open(url, "rb") as stream:
            yield from group_by_keys(_iter_tar_files(stream, url))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"shard {url}: truncated or corrupt tar ({exc})") from exc


def _iter_tar_files(stream: IO[bytes], url: str) -> Iterator[dict]:
    """The regular files of a tar stream as webdataset's ``{"fname", "data", "__url__"}`` records.

    tarfile's stream mode ends quietly at a missing, short or unreadable header, so a shard cut at a member
    boundary (or inside a header) would read as a complete shorter shard. A whole archive ends with two zero
    blocks; tarfile has consumed the first when it stops, so the next block of its (decompressed) stream must be
    the second. Checking there, rather than at the end of the file, also catches a damaged header mid-archive.
    """
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if info.isreg() and not _META_RE.match(info.name):
            member = tar.extractfile(info)
            assert member is not None  # a regular file always has a payload
            yield {"fname": info.name, "data": member.read(), "__url__": url}
        tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
    assert tar.fileobj is not None  # set by tarfile.open(fileobj=...)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("no end-of-archive marker after the last member: the file is cut short or damaged")


def image_field(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"no image (.{'/.'.join(IMAGE_EXTENSIONS)}) in sample; fields: {sorted(sample)}")


def decode_image(data: bytes, channels: int) -> Image.Image:
    """Decode an image of any mode to ``L`` (channels=1) or ``RGB`` (channels=3).

    16-bit grayscale is scaled to 8 bits and transparency is composited onto black before the conversion.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UNDECODABLE as exc:
        raise BadSample(f"undecodable image ({exc.__class__.__name__}: {exc})") from exc
    if image.mode in WIDE_GRAY_MODES:
        image = _wide_gray_to_l(image)
    image = _composite_on_black(image)
    return image.convert("L" if channels == 1 else "RGB")


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """Keep the top 8 of 16 bits; ``convert("L")`` would clip everything above 255 to white instead."""
    # Mode "I" (32-bit) is how older Pillow opened 16-bit PNGs: it is read as 16-bit data, wider values clip.
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))


def _composite_on_black(image: Image.Image) -> Image.Image:
    """Flatten an alpha band or a transparent colour (``P``/``L``/``RGB`` with tRNS) onto a black background.

    Dropping alpha instead would keep whatever colour the encoder left under transparent pixels.
    """
    if not {"A", "a"} & set(image.getbands()) and "transparency" not in image.info:
        return image
    black = Image.new("RGBA", image.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")


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

    def take(self, rows: Sequence[int]) -> LabeledSet:
        return LabeledSet([self.keys[i] for i in rows], [self.images[i] for i in rows], self.labels[rows], self.skipped)


def labeled_samples(
    url: str, num_classes: int, channels: int, skipped: list[dict]
) -> Iterator[tuple[str, Image.Image, int]]:
    """``(key, decoded image, label)`` of each usable sample of one labeled shard; each unusable one is appended to
    ``skipped`` (shard, key, reason). A label out of range raises ``DataError`` (``parse_label``)."""
    for sample in iter_raw_samples(url):
        try:
            image = decode_image(image_field(sample), channels)
            label = parse_label(sample, num_classes)
        except BadSample as exc:
            skipped.append({"shard": url, "key": sample["__key__"], "reason": str(exc)})
            continue
        yield sample["__key__"], image, label


def load_labeled(
    shards: Iterable[str], num_classes: int, channels: int, max_bad_fraction: float = 0.0, what: str = "labeled"
) -> LabeledSet:
    """Read and decode a labeled split. Bad samples are counted and listed; too many of them is an error."""
    keys, images, labels, skipped = [], [], [], []
    for url in shards:
        n_before = len(keys) + len(skipped)
        for key, image, label in labeled_samples(url, num_classes, channels, skipped):
            keys.append(key)
            images.append(image)
            labels.append(label)
        if len(keys) + len(skipped) == n_before:
            raise DataError(f"{what}: shard {url} holds no samples")
    check_usable(len(keys), skipped, max_bad_fraction, what)
    return LabeledSet(keys, images, np.asarray(labels, dtype=np.int64), skipped)


def check_usable(usable: int, skipped: list[dict], max_bad_fraction: float, what: str) -> None:
    """A split with no usable sample, or more unusable ones than ``max_bad_fraction``, is a ``DataError``; the
    unusable ones within that are logged one by one."""
    total = usable + len(skipped)
    if not usable:
        raise DataError(f"{what}: no usable samples in {total} read")
    if len(skipped) > max_bad_fraction * total:
        first = skipped[0]
        raise DataError(
            f"{what}: {len(skipped)} of {total} samples unusable (allowed fraction {max_bad_fraction}); "
            f"first: {first['shard']} {first['key']}: {first['reason']}"
        )
    for item in skipped:
        log.warning("%s: skipped %s in %s: %s", what, item["key"], item["shard"], item["reason"])


def write_shards(samples: Sequence[dict], out_dir: str | Path, prefix: str, num_shards: int) -> list[str]:
    """Write samples (``__key__`` plus ``ext -> bytes``) into ``num_shards`` tar shards, contiguous chunks, each with
    webdataset's ``TarWriter`` (bytes as given, mtime 0: identical inputs give identical shards), written atomically."""
    from webdataset import TarWriter

    from stages.storage.files import atomic_target

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(samples)), num_shards)):
        path = out_dir / f"{prefix}-{i:06d}.tar"
        with atomic_target(path) as tmp, open(tmp, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=0)
            for j in chunk:
                sample = samples[int(j)]
                writer.write(
                    {"__key__": sample["__key__"], **{k: v for k, v in sample.items() if not k.startswith("__")}}
                )
            writer.close()
        paths.append(str(path))
    return paths


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))
