"""What the driver knows about a labeled split (labeled, test, validation) without holding one image of it.

A labeled shard is scanned once (``scan_labeled_shard``: decode every image, parse its ``.cls``) into a
``ShardIndex``: per usable sample its key, its label and the sha256 of its decoded pixels (``image_digest``, what the
contamination guard compares), plus the unusable samples with their reasons. That is ~160 bytes a sample in Python
(16-character keys, measured), so a driver holds the index of a million labeled images in ~160 MB, where the
decoded images would take hundreds of GB at 224 px. The scans run as per-shard Ray tasks
(``stages/data_check.py``) and are cached per shard identity (``stages.storage.files.stamp``: size and
mtime, or an object's ETag): ``<cache>/<sha of the shard URL>.parquet`` holds the index, its footer the identity,
the channels and the unusable samples; a label at or above the run's class count forces a rescan (which reports it).
A run that finds a matching cache file (a resume, or another run over the same data) does not decode the shard again.

``merge_indexes`` joins the shards of a split in shard order and enforces what ``stages.data.shards.load_labeled``
did for an in-memory split: a shard with no sample, a split with no usable sample, too many unusable ones (one-line
``DataError`` each); a label outside ``[0, num_classes)`` is a ``DataError`` from the scan itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from stages.core.errors import DataError
from stages.data.contamination import image_digest
from stages.data.shards import check_usable, labeled_samples
from stages.storage.artifacts import inputs_digest, read_footer, read_verified, write_table
from stages.storage.files import Location, StorageError, join, stamp

log = logging.getLogger(__name__)

SCAN_FORMAT = "labeled_scan/v2"


@dataclasses.dataclass(frozen=True)
class LabeledIndex:
    """A labeled split as keys, labels and pixel digests (no images); ``shard[i]`` is row i's index in ``shards``."""

    keys: list[str]
    labels: np.ndarray
    digests: list[bytes]
    shard: np.ndarray
    shards: list[str]
    skipped: list[dict]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: Sequence[int]) -> LabeledIndex:
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self,
            keys=[self.keys[i] for i in rows],
            labels=self.labels[rows],
            digests=[self.digests[i] for i in rows],
            shard=self.shard[rows],
        )

    def shards_holding(self) -> list[str]:
        """The shards at least one of this index's rows comes from, in shard order."""
        return [self.shards[i] for i in np.unique(self.shard)]


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """One scanned labeled shard: usable samples in shard order, and the unusable ones (shard, key, reason)."""

    shard: str
    keys: list[str]
    labels: np.ndarray
    digests: list[bytes]
    skipped: list[dict]
    cached: bool = False


def scan_labeled_shard(shard: str, num_classes: int, channels: int) -> ShardIndex:
    """Decode every image of ``shard`` once; a truncated shard or a label out of range raises ``DataError``."""
    keys, labels, digests, skipped = [], [], [], []
    for key, image, label in labeled_samples(shard, num_classes, channels, skipped):
        keys.append(key)
        labels.append(label)
        digests.append(image_digest(image))
    return ShardIndex(shard, keys, np.asarray(labels, dtype=np.int64), digests, skipped)


def cache_path(cache_dir: Location, shard: str) -> Location:
    return join(cache_dir, hashlib.sha256(shard.encode()).hexdigest()[:32] + ".parquet")


def scan_made_by(shard: str, identity: str, channels: int) -> str:
    """What a cached scan depends on: the shard, its identity when scanned (``stamp``) and the channels."""
    return inputs_digest(format=SCAN_FORMAT, shard=shard, stamp=identity, channels=channels)


def read_cached(cache_dir: Location, shard: str, identity: str, num_classes: int, channels: int) -> ShardIndex | None:
    """The cached index of ``shard`` when it was scanned at ``identity`` (``stamp``) with these settings and its rows
    are whole, else None."""
    path = cache_path(cache_dir, shard)
    footer = read_footer(path, SCAN_FORMAT)
    if footer is None or footer.made_by != scan_made_by(shard, identity, channels):
        return None
    table = read_verified(path, footer)
    if table is None:
        return None
    labels = table.column("label").to_numpy().astype(np.int64)
    if len(labels) and labels.max() >= num_classes:
        return None  # scanned under a larger class count: scan again, so the out-of-range label is reported
    keys, digests = table.column("key").to_pylist(), table.column("digest").to_pylist()
    return ShardIndex(shard, keys, labels, digests, json.loads(footer.meta["skipped"]), cached=True)


def write_cached(cache_dir: Location, index: ShardIndex, identity: str, channels: int) -> None:
    """Best effort: a cache that cannot be written costs the next run a rescan, not this one its result."""
    table = pa.table(
        {
            "key": pa.array(index.keys, pa.string()),
            "label": pa.array(index.labels, pa.int32()),
            "digest": pa.array(index.digests, pa.binary(32)),
        }
    )
    made_by = scan_made_by(index.shard, identity, channels)
    try:
        write_table(
            table,
            cache_path(cache_dir, index.shard),
            format=SCAN_FORMAT,
            made_by=made_by,
            skipped=json.dumps(index.skipped),
        )
    except (OSError, StorageError) as exc:
        log.warning("could not cache the scan of %s: %s", index.shard, exc)


def scan_or_cached(shard: str, num_classes: int, channels: int, cache_dir: str) -> ShardIndex:
    """The index of one shard: from the cache when its identity matches, else scanned (and cached under the
    identity it had before the scan, so a shard rewritten meanwhile is scanned again next time)."""
    try:
        identity = stamp(shard) if cache_dir else ""
    except OSError:  # a shard that cannot be stat'ed: the scan reports it as one DataError line
        identity = ""
    if not identity:
        return scan_labeled_shard(shard, num_classes, channels)
    if (cached := read_cached(cache_dir, shard, identity, num_classes, channels)) is not None:
        return cached
    index = scan_labeled_shard(shard, num_classes, channels)
    write_cached(cache_dir, index, identity, channels)
    return index


def merge_indexes(parts: Sequence[ShardIndex], shards: Sequence[str], max_bad_fraction: float, what: str):
    """The split's ``LabeledIndex`` in shard order (``parts`` in any order), checked as a loaded split was."""
    by_shard = {p.shard: p for p in parts}
    ordered = [by_shard[s] for s in shards]
    for part in ordered:
        if not part.keys and not part.skipped:
            raise DataError(f"{what}: shard {part.shard} holds no samples")
    skipped = [item for p in ordered for item in p.skipped]
    keys = [k for p in ordered for k in p.keys]
    check_usable(len(keys), skipped, max_bad_fraction, what)
    return LabeledIndex(
        keys=keys,
        labels=np.concatenate([p.labels for p in ordered]).astype(np.int64),
        digests=[d for p in ordered for d in p.digests],
        shard=np.concatenate([np.full(len(p.keys), i, dtype=np.int64) for i, p in enumerate(ordered)]),
        shards=list(shards),
        skipped=skipped,
    )


def scan_split(
    shards: Sequence[str], num_classes: int, channels: int, max_bad_fraction: float = 0.0, what: str = "labeled"
) -> LabeledIndex:
    """A split's ``LabeledIndex``, scanned in this process without a cache (``load_labeled`` without the images)."""
    parts = [scan_labeled_shard(s, num_classes, channels) for s in shards]
    return merge_indexes(parts, shards, max_bad_fraction, what)
