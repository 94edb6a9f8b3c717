"""``python -m pipeline prepare-folder``: a folder (or CSV) of images to WebDataset shards, one Ray task per shard.

The scan and the shard plan are made here in the driver (``stages/data/folder.py``); each shard is written by one task
(``run_tasks``), or in this process for a small tree: a Ray task costs ~5 s to start on this project's 2-core
machine, more than copying a few thousand small images. A shard whose record matches its plan is skipped, so a
re-run after an interruption writes only what is missing. At the end ``classes.json``, ``data.yaml`` (the
``data:`` section pointing at the shards) and ``prepare.json`` (counts, every skipped file and why) are written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import yaml
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.distributed.runtime import init_ray, run_tasks
from stages.data.folder import (
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
from stages.data.shards import DataError
from stages.storage.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

INLINE_MAX_IMAGES = 5000  # below this, "auto" writes in this process (see the module docstring)


def prepare_folder(
    src: str | None,
    out: str,
    csv_path: str | None = None,
    shard_bytes: int = 256 << 20,
    parallel: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Scan ``src`` (or ``csv_path``), write the shards the plan lacks, then ``classes.json``, ``data.yaml`` and
    ``prepare.json`` under ``out``; returns the summary that ``prepare.json`` holds."""
    scan = scan_csv(csv_path) if csv_path else scan_folder(src or ".")
    out = os.path.abspath(out)
    plans = plan_shards(scan, out, shard_bytes, seed)
    _remove_stale(out, plans)
    records = {p.name: shard_done(p) for p in plans}
    todo = [p for p in plans if records[p.name] is None]
    images = sum(len(p.images) for p in todo)
    inline = not todo or parallel == "off" or (parallel == "auto" and (images <= INLINE_MAX_IMAGES or len(todo) < 2))
    if todo and not inline:
        log.info("ray: %s", init_ray())
    log.info(
        "prepare-folder: %d of %d shard(s) to write (%d images)%s",
        len(todo),
        len(plans),
        images,
        " in this process" if inline else " as Ray tasks",
    )
    for record in _written(todo, inline, progress):
        records[_name(record)] = record
    summary = _summary(scan, plans, records, src or csv_path or "", out)
    atomic_write_json(os.path.join(out, "classes.json"), classes_json(scan.classes))
    atomic_write_text(os.path.join(out, "data.yaml"), data_yaml(summary, out))
    atomic_write_json(os.path.join(out, "prepare.json"), summary)
    return summary


def _written(todo: list[ShardPlan], inline: bool, progress: bool) -> Iterator[dict]:
    bar = tqdm(total=sum(len(p.images) for p in todo), unit="img", desc="prepare-folder", disable=not progress)
    with bar:
        for record in run_tasks(write_shard, ((p,) for p in todo), len(todo), "prepare-folder", False, inline):
            bar.update(record["samples"] + len(record["skipped"]))
            yield record


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


def _summary(scan: Scan, plans: list[ShardPlan], records: dict, source: str, out: str) -> dict:
    splits: dict[str, dict] = {}
    skipped = list(scan.skipped)
    gray = color = 0
    for plan in plans:
        record = records[plan.name]
        entry = splits.setdefault(plan.split, {"shards": 0, "samples": 0, "skipped": 0})
        entry["shards"] += 1
        entry["samples"] += record["samples"]
        entry["skipped"] += len(record["skipped"])
        skipped += record["skipped"]
        gray, color = gray + record["gray"], color + record["color"]
    for split in ("labeled", "test", "unlabeled"):
        if not splits.get(split, {}).get("samples"):
            raise DataError(f"{source}: no readable image in {split} (every one was skipped; see the warnings)")
    return {
        "source": str(source),
        "out": out,
        "classes": list(scan.classes),
        "splits": splits,
        "channels": 3 if color else 1,
        "skipped_count": len(skipped),
        "skipped": skipped,
    }


def data_yaml(summary: dict, out: str) -> str:
    """The ``data:`` section for the written shards (merge it into a config, or use its values). A ``val`` split is
    listed only when the config knows ``data.val``; otherwise it is a comment saying where its shards are."""
    data: dict = {split: [shard_pattern(out, split, info["shards"])] for split, info in summary["splits"].items()}
    note = ""
    if "val" in data and "val" not in {f.name for f in dataclasses.fields(DataConfig)}:
        note = f"# val: ['{data.pop('val')[0]}']   (this version's config has no data.val)\n"
    data.update({"classes": os.path.join(out, "classes.json"), "channels": summary["channels"], "prepare_digits": ""})
    head = (
        f"# Written by python -m pipeline prepare-folder from {summary['source']}: {len(summary['classes'])} classes, "
        + ", ".join(f"{s} {i['samples']}" for s, i in summary["splits"].items())
        + f" images; {summary['skipped_count']} file(s) skipped (prepare.json lists them).\n"
    )
    return head + note + yaml.safe_dump({"data": data}, sort_keys=False)
