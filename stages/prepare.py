"""The folder converter (``python -m pipeline prepare-folder``): a folder (or CSV) of images to WebDataset shards,
one task per shard on the run's executor.

The scan and the shard plan are made in the driver (``stages/data/folder.py``); each shard is written by one task
(``write_shard``): Ray tasks for a large tree, this process for a small one (``choose_executor``, the same rule as a
run's). ``max_side`` shrinks images whose short side is larger to it (``stages/data/resize.py``). A shard whose receipt
matches its plan (its images and ``max_side``) and whose tar still hashes as recorded is skipped, so a re-run after
an interruption writes only what is missing or damaged. At the end ``classes.json``, ``data.yaml`` (the ``data:``
section pointing at the shards) and ``prepare.json`` (counts, images shrunk and the image bytes read and stored,
every skipped file and why) are written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from tqdm import tqdm

from stages.core.errors import DataError
from stages.core.stage import Executor
from stages.data.folder import (
    COUNTS,
    REQUIRED_SPLITS,
    SPLITS,
    Scan,
    ShardPlan,
    classes_json,
    plan_shards,
    scan_csv,
    scan_folder,
    shard_done,
    shard_pattern,
    write_shard,
)
from stages.data.resize import check_max_side
from stages.storage.files import atomic_write_json, atomic_write_text
from stages.storage.layout import CLASSES, PREPARE_CONFIG, PREPARE_SUMMARY

log = logging.getLogger(__name__)


def prepare_folder(
    src: str | None,
    out: str,
    executor: Executor,
    csv_path: str | None = None,
    shard_bytes: int = 256 << 20,
    seed: int = 0,
    progress: bool = True,
    required: Sequence[str] = REQUIRED_SPLITS,
    classes: Sequence[str] | None = None,
    max_side: int = 0,
) -> dict:
    """Scan ``src`` (or ``csv_path``), write the shards the plan lacks (one task each on ``executor``), then
    ``classes.json``, ``data.yaml`` and ``prepare.json`` under ``out``; returns the summary ``prepare.json`` holds.
    ``max_side`` > 0: an image whose short side is larger is stored shrunk to it (0: every image as it is)."""
    check_max_side(max_side)
    scan = scan_csv(csv_path, required, classes) if csv_path else scan_folder(src or ".")
    out = os.path.abspath(out)
    plans = plan_shards(scan, out, shard_bytes, seed, max_side)
    _remove_stale(out, plans)
    records = {p.name: shard_done(p) for p in plans}
    todo = [p for p in plans if records[p.name] is None]
    images = sum(len(p.images) for p in todo)
    log.info("prepare-folder: %d of %d shard(s) to write (%d images, %s)", len(todo), len(plans), images, executor.kind)
    bar = tqdm(total=images, unit="img", desc="prepare-folder", disable=not progress)
    with bar:
        for record in executor.map(write_shard, ((p,) for p in todo), len(todo), "prepare-folder"):
            bar.update(record["samples"] + len(record["skipped"]))
            records[_name(record)] = record
    summary = _summary(scan, plans, records, src or csv_path or "", out, required)
    atomic_write_json(os.path.join(out, CLASSES), classes_json(scan.classes))
    atomic_write_text(os.path.join(out, PREPARE_CONFIG), data_yaml(summary, out))
    atomic_write_json(os.path.join(out, PREPARE_SUMMARY), summary)
    return summary


def source_images(
    src: str | None,
    csv_path: str | None,
    required: Sequence[str] = REQUIRED_SPLITS,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """The image files a conversion reads (what ``choose_executor`` sizes the work by); ``required`` and ``classes``
    as ``prepare_folder`` takes them (``--labeled-only`` needs no test rows)."""
    scan = scan_csv(csv_path, required, classes) if csv_path else scan_folder(src or ".")
    return [image.path for images in scan.images.values() for image in images]


def _name(record: dict) -> str:
    return f"{record['split']}-{record['index']:06d}"


def _remove_stale(out: str, plans: list[ShardPlan]) -> None:
    """Shards (and records) of an earlier, larger plan: a glob over the split folder would read them."""
    wanted = {p.path for p in plans} | {p.record_path for p in plans}
    for split in SPLITS:
        folder = Path(out, split)
        for path in sorted(folder.glob(f"{split}-*.tar")) + sorted(folder.glob(f"{split}-*.json")):
            if str(path) not in wanted:
                log.info("prepare-folder: removing %s (not in the new plan)", path)
                path.unlink()


def _summary(scan: Scan, plans: list[ShardPlan], records: dict, source: str, out: str, required: Sequence[str]) -> dict:
    splits: dict[str, dict] = {}
    skipped = list(scan.skipped)
    totals = dict.fromkeys(COUNTS, 0)
    for plan in plans:
        record = records[plan.name]
        entry = splits.setdefault(plan.split, {"shards": 0, "samples": 0, "skipped": 0})
        entry["shards"] += 1
        entry["samples"] += record["samples"]
        entry["skipped"] += len(record["skipped"])
        skipped += record["skipped"]
        totals = {k: n + record[k] for k, n in totals.items()}
    for split in required:
        if not splits.get(split, {}).get("samples"):
            raise DataError(f"{source}: no readable image in {split} (every one was skipped; see the warnings)")
    return {
        "source": str(source),
        "out": out,
        "classes": list(scan.classes),
        "splits": splits,
        "channels": 3 if totals["color"] else 1,
        "max_side": plans[0].max_side if plans else 0,  # one value per run: plan_shards gives every plan the same
        "resized": totals["resized"],
        "bytes_in": totals["bytes_in"],
        "bytes_out": totals["bytes_out"],
        "skipped_count": len(skipped),
        "skipped": skipped,
    }


def data_yaml(summary: dict, out: str) -> str:
    """The ``data:`` section for the written shards (merge it into a config, or use its values). A ``val`` split is
    listed only when the config knows ``data.val``; otherwise it is a comment saying where its shards are."""
    data: dict = {split: [shard_pattern(out, split, info["shards"])] for split, info in summary["splits"].items()}
    data.update({"classes": os.path.join(out, CLASSES), "channels": summary["channels"], "prepare_digits": ""})
    head = (
        f"# Written by python -m pipeline prepare-folder from {summary['source']}: {len(summary['classes'])} classes, "
        + ", ".join(f"{s} {i['samples']}" for s, i in summary["splits"].items())
        + f" images; {summary['skipped_count']} file(s) skipped (prepare.json lists them).\n"
    )
    return head + yaml.safe_dump({"data": data}, sort_keys=False)
