"""Contamination guard: test images that also appear in the training data, and duplicates in the unlabeled set.

An image is identified by the sha256 of its *decoded* pixels after conversion to the run's channels (``L`` or
``RGB``) at its stored size, not by its file bytes: a test image re-encoded (PNG -> lossless WebP, another PNG
compression level, an added opaque alpha band, 16-bit -> 8-bit) still matches. A lossy re-encode, a resize or a
crop does not: that would need a perceptual hash, and its false positives, which this guard does not attempt.

The test, labeled and validation splits are compared by the digests their scans recorded
(``stages/data/labeled_scan.py``): the driver never holds their images. The unlabeled split is streamed shard by shard
(``scan_shard``, one task per shard in ``stages/data_check.py``): each shard comes back as its
test matches (with keys) and one 64-bit hash per image, and ``DuplicateCounter`` counts duplicates among those in
bounded memory (exact up to ``limit`` images, a consistent hash sample beyond it).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from stages.core.errors import BadSample
from stages.data.shards import decode_image, image_field, iter_raw_samples

EXAMPLES = 3  # example keys kept per finding: enough to look one up, small enough for run.json
HASH_DTYPE = np.dtype([("hash", "<u8"), ("shard", "<u4"), ("index", "<u4")])


def image_digest(image: Image.Image) -> bytes:
    """sha256 of the decoded pixels, with mode and size (so equal bytes of a different shape never match)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


def index_digests(keys: Sequence[str], digests: Iterable[bytes]) -> dict[bytes, str]:
    """Digest -> key of a test image (the first, when the test split itself holds copies)."""
    index: dict[bytes, str] = {}
    for key, digest in zip(keys, digests, strict=True):
        index.setdefault(digest, key)
    return index


def find_digests(keys: Sequence[str], digests: Iterable[bytes], index: Mapping[bytes, str]) -> dict:
    """``{"images", "in_test", "examples"}`` for a scanned split (``stages/data/labeled_scan.py``); examples are
    ``[key, test key]`` pairs."""
    hits = [[k, index[d]] for k, d in zip(keys, digests, strict=True) if d in index]
    return {"images": len(keys), "in_test": len(hits), "examples": hits[:EXAMPLES]}


@dataclasses.dataclass
class ShardScan:
    """One unlabeled shard: its test matches and one 64-bit hash per usable image, in shard order."""

    shard: str
    images: int
    bad: int
    in_test: int
    examples: list[list[str]]
    hashes: np.ndarray  # uint64: the first 8 bytes of each image's digest
    first_bad: list[str] | None = None  # [key, reason] of the first undecodable sample


def scan_shard(shard: str, channels: int, index: Mapping[bytes, str]) -> ShardScan:
    """Decode every image of ``shard`` once; undecodable samples are counted (the first one's key and reason kept for
    the error a large fraction of them makes; the pseudo-label stage lists them all); a truncated shard raises
    ``DataError``."""
    hashes, bad, hits, first_bad = [], 0, [], None
    for sample in iter_raw_samples(shard):
        try:
            digest = image_digest(decode_image(image_field(sample), channels))
        except BadSample as exc:
            bad += 1
            first_bad = first_bad or [sample["__key__"], str(exc)]
            continue
        hashes.append(int.from_bytes(digest[:8], "little"))
        if digest in index:
            hits.append([sample["__key__"], index[digest]])
    hashes_ = np.asarray(hashes, dtype=np.uint64)
    return ShardScan(shard, len(hashes), bad, len(hits), hits[:EXAMPLES], hashes_, first_bad)


class DuplicateCounter:
    """Counts images whose pixels occur more than once, across shards, in memory bounded by ``limit`` entries.

    Each entry is 16 bytes (hash, shard number, index in shard), so the default 8M entries cap it at ~128 MB: exact
    up to 8M unlabeled images. Beyond that only images whose hash has its lowest ``level`` bits zero are kept (all
    copies of an image share the hash, so a kept image keeps its copies), ``level`` rising by one each time the cap is
    hit, and the counts are scaled back up by ``2**level``: an estimate, reported as such (``exact: false``).
    """

    def __init__(self, limit: int = 8_000_000):
        self.limit, self.level, self.images = limit, 0, 0
        self.parts: list[np.ndarray] = []
        self.stored = 0

    def add(self, hashes: np.ndarray, shard: int) -> None:
        self.images += len(hashes)
        part = np.empty(len(hashes), dtype=HASH_DTYPE)
        part["hash"], part["shard"], part["index"] = hashes, shard, np.arange(len(hashes))
        self.parts.append(self._keep(part))
        self.stored += len(self.parts[-1])
        while self.stored > self.limit and self.level < 63:  # 63: copies of one image cannot be split further
            self.level += 1
            self.parts = [self._keep(p) for p in self.parts]
            self.stored = sum(len(p) for p in self.parts)

    def _keep(self, part: np.ndarray) -> np.ndarray:
        if not self.level:
            return part
        return part[(part["hash"] & np.uint64((1 << self.level) - 1)) == 0]

    def result(self, shards: Sequence[str]) -> dict:
        """``duplicates`` (images beyond the first of each group), ``duplicate_groups``, and up to ``EXAMPLES``
        groups as ``shard#index`` positions (keys are not kept: 16 bytes an image is what makes millions affordable)."""
        entries = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=HASH_DTYPE)
        # the copies of an image become neighbours, in shard order whatever order the shards were scanned in
        entries = entries[np.lexsort((entries["index"], entries["shard"], entries["hash"]))]
        _, first, counts = np.unique(entries["hash"], return_index=True, return_counts=True)
        scale = 1 << self.level
        examples = [
            [f"{shards[int(e['shard'])]}#{int(e['index'])}" for e in entries[f : f + n]]
            for f, n in zip(first[counts > 1][:EXAMPLES], counts[counts > 1][:EXAMPLES], strict=True)
        ]
        return {
            "duplicates": (len(entries) - len(counts)) * scale,
            "duplicate_groups": int((counts > 1).sum()) * scale,
            "duplicates_exact": self.level == 0,
            "duplicates_sampled_fraction": 1 / scale,
            "duplicate_examples": examples,
        }


def merge_scans(scans: Iterable[ShardScan], shards: Sequence[str], counter: DuplicateCounter) -> dict:
    """The unlabeled report from per-shard scans, taken in any order (as Ray tasks finish); the same report
    whatever the order, since examples are picked by shard order."""
    number = {s: i for i, s in enumerate(shards)}
    images = bad = in_test = 0
    examples: list[tuple[int, list[str]]] = []
    empty: list[int] = []
    bad_examples: list[tuple[int, list[str]]] = []
    for scan in scans:
        images, bad, in_test = images + scan.images, bad + scan.bad, in_test + scan.in_test
        examples += [(number[scan.shard], e) for e in scan.examples]
        if not scan.images and not scan.bad:
            empty.append(number[scan.shard])
        if scan.first_bad:
            bad_examples.append((number[scan.shard], [scan.shard, *scan.first_bad]))
        counter.add(scan.hashes, number[scan.shard])
    first = [e for _, e in sorted(examples, key=lambda x: x[0])[:EXAMPLES]]
    report = {"images": images, "undecodable": bad, "in_test": in_test, "examples": first}
    report["empty_shards"] = [shards[i] for i in sorted(empty)]
    report["undecodable_example"] = min(bad_examples)[1] if bad_examples else None  # [shard, key, reason]
    return report | counter.result(shards)
