"""The evaluate stage: every round's model scores the test split, the validation split and the corrupted copies of
the test split on workers, one prediction sidecar per shard and split (``stages/evaluate.py``).

Tasks are ``(shard, split, corruption, severity)``; they stream through a pool of ``ShardEvaluator`` actors sized
and placed like the label actors (``resources.*_label_actor``: one per GPU on a cluster, bf16 and channels_last
there), so a GPU run evaluates on GPUs and the driver, on a small head node, only plans tasks and reads three
columns back. When every shard is a small local file and no GPU is asked for (the digits default: a few hundred
images), the same ``ShardEvaluator`` runs in this process instead: an actor would cost seconds of start-up per round
for a second of work. A sidecar that cannot be written stops the stage with a ``StorageError``; an unreadable shard
with a ``DataError``; a resumed stage skips the sidecars this model already wrote.
"""

from __future__ import annotations

import logging
import os
import time

from tqdm import tqdm

from pipeline.config import LabelResources
from pipeline.distributed.data_check import local_and_small
from pipeline.distributed.runtime import actor_pool_rows
from stages.data.shards import DataError
from stages.evaluate import ShardEvaluator
from stages.storage.files import StorageError, makedirs

log = logging.getLogger(__name__)

INLINE_BYTES = 32 << 20  # below this many shard bytes read (all tasks together) a CPU evaluation runs in process


def evaluation_inline(tasks: list[dict], resources: LabelResources, inline_bytes: int = INLINE_BYTES) -> bool:
    """In this process: no GPU asked for, and the tasks read less than ``inline_bytes`` of local shards."""
    if resources.gpus_per_actor:
        return False
    shards = [t["shard"] for t in tasks]
    return local_and_small(shards, inline_bytes)


def run_evaluation(
    model_dir: str,
    model_sha: str,
    tasks: list[dict],
    out_dir: str,
    channels: int,
    resources: LabelResources,
    only: dict[str, frozenset[str]] | None = None,
    corruption_seed: int = 0,
    progress: bool = True,
    inline: bool | None = None,
) -> dict:
    """Run every task (``{"shard", "split", "corruption", "severity"}``); returns the stage's summary: tasks,
    resumed, rows, devices and decoders per task, where it ran, seconds."""
    start = time.perf_counter()
    makedirs(out_dir)
    inline = evaluation_inline(tasks, resources) if inline is None else inline
    kwargs = {
        "model_dir": model_dir,
        "out_dir": out_dir,
        "channels": channels,
        "model_sha": model_sha,
        "decode": resources.decode,
        "only": only,
        "corruption_seed": corruption_seed,
    }
    summary: dict = {"tasks": len(tasks), "resumed": 0, "rows": 0, "devices": {}, "decode": {}}
    bar = tqdm(total=len(tasks), unit="task", desc="evaluate", disable=not progress, dynamic_ncols=True, leave=False)
    if inline:  # torch's own threads, and a decode thread per core: the process has the machine to itself here
        evaluator = ShardEvaluator(**kwargs, decode_threads=os.cpu_count() or 1)
        with bar:
            _collect((evaluator.evaluate_task(**t) for t in tasks), summary, bar)
    else:
        with (
            bar,
            actor_pool_rows(ShardEvaluator, kwargs | {"threads": resources.torch_threads()}, tasks, resources) as rows,
        ):
            _collect(rows, summary, bar)
    summary["ran_as"] = "in-process" if inline else "ray actors"
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _collect(rows, summary: dict, bar) -> None:
    errors = []
    for row in rows:
        if row["storage_error"]:  # stop at once: every later sidecar would fail the same way
            raise StorageError(f"evaluate: {row['storage_error']}")
        if row["error"]:
            errors.append(row["error"])
        summary["rows"] += int(row["rows"])
        summary["resumed"] += bool(row["resumed"])
        summary["devices"][row["device"]] = summary["devices"].get(row["device"], 0) + 1
        summary["decode"][row["decode"]] = summary["decode"].get(row["decode"], 0) + 1
        bar.update(1)
    if errors:
        raise DataError(f"evaluate: {len(errors)} unreadable shard(s): " + "; ".join(errors[:5]))
