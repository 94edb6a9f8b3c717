"""TensorBoard event files for a run, converted from the files the stages already write.

``<run>/tensorboard/round-NNN/`` holds each round's training curves per step (from ``train_metrics.jsonl``) and
``<run>/tensorboard/rounds/`` the per-round results (test top-1, teacher top-1, ECE, pseudo-label accuracy,
selection counts), so ``tensorboard --logdir runs/`` shows every run. Rebuilt with the report after every round
and by ``python -m pipeline report RUN``; a folder whose sources are unchanged is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from stages.storage.layout import RunLayout, round_name
from stages.train import read_metrics_lines

log = logging.getLogger(__name__)

TRAIN_TAGS = ("loss", "loss_labeled", "loss_pseudo", "lr", "images_per_s")  # train/<tag>, step = global step
# eval/<tag>
ROUND_TAGS = ("val_top1", "test_top1", "teacher_top1", "test_ece", "pseudo_label_accuracy", "pseudo_images")


def write_tensorboard(run_dir: str | Path) -> list[Path]:
    """(Re)write the event folders of ``run_dir`` whose sources changed; returns the folders written."""
    layout = RunLayout(Path(run_dir))
    out = layout.tensorboard
    written = []
    rounds = [layout.round(i) for i in layout.round_indices()]
    for r in rounds:
        if r.train_metrics.is_file():
            records = read_metrics_lines(r.train_metrics.read_text())
            if _write_if_changed(out / round_name(r.index), records, _train_scalars):
                written.append(out / round_name(r.index))
    results = [json.loads(r.metrics.read_text()) for r in rounds if r.metrics.is_file()]
    if results and _write_if_changed(out / "rounds", results, _round_scalars):
        written.append(out / "rounds")
    return written


def _train_scalars(records: list[dict]):
    for rec in records:
        for tag in TRAIN_TAGS:
            if rec.get(tag) is not None:
                yield f"train/{tag}", float(rec[tag]), int(rec["step"])


def _round_scalars(results: list[dict]):
    for m in results:
        for tag in ROUND_TAGS:
            if m.get(tag) is not None:
                yield f"eval/{tag}", float(m[tag]), int(m["round"])


def _write_if_changed(folder: Path, source: list[dict], scalars: Callable) -> bool:
    """Write ``scalars(source)`` as a fresh event folder that replaces ``folder``, unless its source is unchanged.

    SummaryWriter appends a new event file per writer, so re-running would duplicate every point: the folder is
    written whole under a temporary name and swapped in instead.
    """
    from torch.utils.tensorboard import SummaryWriter

    stamp = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    if (folder / ".source.sha256").is_file() and (folder / ".source.sha256").read_text() == stamp:
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        for tag, value, step in scalars(source):
            writer.add_scalar(tag, value, step)
        writer.close()
        (tmp / ".source.sha256").write_text(stamp)
        old = folder.with_name(f".{folder.name}.old") if folder.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.debug("tensorboard: wrote %s", folder)
    return True
