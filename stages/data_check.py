"""The data check, run before round 0: the labeled splits scanned, test images in the training data refused,
duplicates in the unlabeled set reported.

The labeled, test and validation splits are scanned first (``scan_labeled_splits``: per-shard tasks returning keys,
labels and pixel digests, cached per shard identity, ``stages/data/labeled_scan.py``); the driver never holds their
images, and compares their digests here. The unlabeled shards are scanned by
``stages.data.contamination.scan_shard``, one task per shard on the run's executor (in this process for small data,
Ray tasks with a bounded number in flight otherwise), so a cluster decodes millions of images in parallel and the
driver only merges 16 bytes an image. The report is recorded in ``run.json`` as ``data_check`` and reused on resume
while the shards (names, sizes, modification times) and ``data.channels`` are unchanged.

Test images found in the labeled or unlabeled data stop the run with one ``DataError`` line naming counts and
examples, unless ``data.allow_test_overlap`` is true (then a warning); unlabeled duplicates are only reported.
Validation images are held out the same way: one found in the test split, the labeled training part or the unlabeled
shards (where the pseudo-label stage would feed it back) stops the run too. The unlabeled side costs no second scan:
each scanned image's 64-bit digest prefix is looked up among the validation images' as the scans go by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from stages.core.errors import DataError
from stages.data.contamination import DuplicateCounter, ShardScan, find_digests, index_digests, merge_scans, scan_shard
from stages.data.labeled_scan import LabeledIndex, merge_indexes, scan_or_cached
from stages.storage.files import is_url

log = logging.getLogger(__name__)

METHOD = "sha256 of decoded pixels after conversion to data.channels, at the stored size"


def scan_labeled_splits(
    splits: dict[str, Sequence[str]],
    num_classes: int,
    channels: int,
    max_bad_fraction: float,
    cache_dir: str,
    executor,
) -> dict[str, LabeledIndex]:
    """Each split's ``LabeledIndex`` (``{"data.labeled": shards, "data.test": shards, ...}``, keyed by what the
    errors call the split). Every shard is scanned once, as a task on ``executor``, or read from ``cache_dir``."""
    shards = list(dict.fromkeys(s for names in splits.values() for s in names))
    args = ((s, num_classes, channels, cache_dir) for s in shards)
    start = time.perf_counter()
    parts = {p.shard: p for p in executor.map(scan_or_cached, args, len(shards), "scan labeled")}
    cached = sum(p.cached for p in parts.values())
    log.info(
        "labeled scan (%s, %.1f s): %d shard(s), %d from the cache",
        executor.kind,
        time.perf_counter() - start,
        len(shards),
        cached,
    )
    return {
        what: merge_indexes([parts[s] for s in names], names, max_bad_fraction, what) for what, names in splits.items()
    }


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """The data settings the check depends on (``data.channels``, ``data.allow_test_overlap``, the carve)."""

    channels: int
    allow_test_overlap: bool = False
    carve: tuple[int, int] | None = None  # (val_per_class, val_seed) when validation is carved from data.labeled
    unlabeled_max_bad: float = 1.0  # pseudo_label.max_bad_fraction: undecodable unlabeled samples allowed


def data_inputs(settings: CheckSettings, shards: dict[str, Sequence[str]]) -> str:
    """What a data check depends on: channels and every shard's name, size and modification time."""

    def stat(shard: str) -> list:
        if is_url(shard):
            return [shard]  # object stores: the name only (a listing per shard would cost a request each)
        st = os.stat(shard.removeprefix("file://"))
        return [shard, st.st_size, st.st_mtime_ns]

    listing = {split: [stat(s) for s in names] for split, names in sorted(shards.items())}
    what: dict = {"channels": settings.channels, "shards": listing}
    if settings.carve:  # which labeled images are held out (absent otherwise: earlier runs' checks hold)
        what["carve"] = list(settings.carve)
    blob = json.dumps(what, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def check_data(
    settings: CheckSettings,
    labeled: LabeledIndex,
    test: LabeledIndex,
    shards: dict[str, Sequence[str]],
    executor,
    previous: dict | None = None,
    val: LabeledIndex | None = None,
) -> dict:
    """Scan (or reuse ``previous`` when its inputs match), then enforce ``data.allow_test_overlap``; returns the
    report for ``run.json``. ``shards`` maps ``labeled``/``unlabeled``/``test`` (and ``val``) to the expanded shard
    lists; ``labeled`` is the training part (a carved validation split taken out), ``val`` the validation split."""
    inputs = data_inputs(settings, shards)
    if previous and previous.get("inputs") == inputs:
        log.info("data check: shards unchanged since %s, reusing its result", previous.get("checked_at", "?"))
        report = previous
    else:
        report = scan_data(settings.channels, labeled, test, list(shards["unlabeled"]), executor, val)
        report["inputs"] = inputs
    enforce_unlabeled(report["unlabeled"], settings.unlabeled_max_bad)
    enforce(report, settings.allow_test_overlap)
    enforce_validation(report.get("validation"), settings.allow_test_overlap)
    return report


def enforce_unlabeled(unlabeled: dict, max_bad_fraction: float) -> None:
    """The unlabeled shards pass the checks the labeled ones pass, before the teacher trains: no empty shard, and no
    more than ``max_bad_fraction`` (``pseudo_label.max_bad_fraction``) undecodable samples. One ``DataError`` line
    naming the shard (and the first undecodable sample)."""
    if unlabeled.get("empty_shards"):
        shards = unlabeled["empty_shards"]
        more = f" (and {len(shards) - 1} more)" if len(shards) > 1 else ""
        raise DataError(f"data.unlabeled: shard {shards[0]} holds no samples{more}; remove it or write it again")
    bad, seen = unlabeled.get("undecodable", 0), unlabeled.get("images", 0) + unlabeled.get("undecodable", 0)
    if bad and bad > max_bad_fraction * seen:
        shard, key, reason = unlabeled.get("undecodable_example") or ["?", "?", "?"]
        raise DataError(
            f"data.unlabeled: {bad} of {seen} samples unusable (pseudo_label.max_bad_fraction {max_bad_fraction}); "
            f"first: {shard} {key}: {reason}"
        )


def scan_data(
    channels: int,
    labeled: LabeledIndex,
    test: LabeledIndex,
    unlabeled: list[str],
    executor,
    val: LabeledIndex | None = None,
) -> dict:
    start = time.perf_counter()
    index = index_digests(test.keys, test.digests)
    held_out = HeldOut(val, labeled, index, unlabeled) if val is not None else None
    shared = executor.share(index)  # shipped once, not once per task
    scans = executor.map(scan_shard, ((s, channels, shared) for s in unlabeled), len(unlabeled), "data check")
    if held_out is not None:
        scans = held_out.tap(scans)
    report = {
        "method": METHOD,
        "test": {"images": len(test), "distinct": len(index)},
        "labeled": find_digests(labeled.keys, labeled.digests, index),
        "unlabeled": merge_scans(scans, unlabeled, DuplicateCounter()),
        "ran_as": executor.kind,
        "seconds": round(time.perf_counter() - start, 3),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if held_out is not None:
        report["validation"] = held_out.result()
    u = report["unlabeled"]
    log.info(
        "data check (%s, %.1f s): %d test images; in test: labeled %d of %d, unlabeled %d of %d; "
        "unlabeled duplicates %d in %d groups%s",
        report["ran_as"],
        report["seconds"],
        len(test),
        report["labeled"]["in_test"],
        len(labeled),
        u["in_test"],
        u["images"],
        u["duplicates"],
        u["duplicate_groups"],
        "" if u["duplicates_exact"] else f" (estimated from a {u['duplicates_sampled_fraction']:.2%} hash sample)",
    )
    return report


def enforce(report: dict, allow_test_overlap: bool) -> None:
    """Test images in the training data: a ``DataError`` (one line), or a warning when they are allowed."""
    lab, unl = report["labeled"], report["unlabeled"]
    total = lab["in_test"] + unl["in_test"]
    if unl["duplicates"]:
        log.warning(
            "data.unlabeled: %d image(s) repeat another unlabeled image (%d groups; e.g. %s); reported in run.json",
            unl["duplicates"],
            unl["duplicate_groups"],
            unl["duplicate_examples"][0],
        )
    if not total:
        return
    example = (lab["examples"] or unl["examples"])[0]
    found = (
        f"{total} training image(s) have the same decoded pixels as a test image (labeled {lab['in_test']}, "
        f"unlabeled {unl['in_test']}; e.g. {example[0]} = test {example[1]})"
    )
    if allow_test_overlap:
        log.warning("%s; data.allow_test_overlap is true, so the run goes on and test top-1 is optimistic", found)
        return
    raise DataError(f"{found}: remove them from the training shards, or set data.allow_test_overlap: true")


class HeldOut:
    """Validation images found elsewhere: in the test split, the labeled training part, the unlabeled shards (by
    the 64-bit digest prefix every scanned image already carries, looked up as the scans go by)."""

    def __init__(self, val: LabeledIndex, labeled: LabeledIndex, test_index: dict, unlabeled: list[str]):
        self.val, self.shards = val, unlabeled
        self.in_test = find_digests(val.keys, val.digests, test_index)
        self.in_labeled = find_digests(labeled.keys, labeled.digests, index_digests(val.keys, val.digests))
        self.prefixes = {int.from_bytes(d[:8], "little"): k for k, d in zip(val.keys, val.digests, strict=True)}
        self.in_unlabeled: list[list[str]] = []

    def tap(self, scans):
        wanted = np.fromiter(self.prefixes, dtype=np.uint64, count=len(self.prefixes))
        scan: ShardScan
        for scan in scans:
            for i in np.flatnonzero(np.isin(scan.hashes, wanted)):
                self.in_unlabeled.append([f"{scan.shard}#{int(i)}", self.prefixes[int(scan.hashes[i])]])
            yield scan

    def result(self) -> dict:
        return {
            "images": len(self.val),
            "in_test": self.in_test["in_test"],
            "in_labeled": self.in_labeled["in_test"],
            "in_unlabeled": len(self.in_unlabeled),
            "examples": (self.in_test["examples"] + self.in_labeled["examples"] + self.in_unlabeled)[:3],
        }


def enforce_validation(found: dict | None, allow_overlap: bool) -> None:
    """Validation images that are also test or training images: a ``DataError`` (one line), or a warning when
    ``data.allow_test_overlap`` lets overlaps through."""
    if not found:
        return
    total = found["in_test"] + found["in_labeled"] + found["in_unlabeled"]
    if not total:
        return
    message = (
        f"{total} validation image(s) are also test or training images (test {found['in_test']}, labeled "
        f"{found['in_labeled']}, unlabeled {found['in_unlabeled']}; e.g. {found['examples'][0]})"
    )
    if allow_overlap:
        log.warning("%s; data.allow_test_overlap is true, so validation top-1 is optimistic", message)
        return
    raise DataError(f"{message}: hold them out of the other splits, or set data.allow_test_overlap: true")
