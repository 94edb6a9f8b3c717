"""The pseudo-label stage on Ray Data: shards are streamed to a pool of ``ShardLabeler`` actors.

One actor per GPU on a cluster (``gpus_per_label_actor: 1``, ``label_actors: N``), CPU actors locally; with
``label_actors: 0`` the pool autoscales (``LabelResources.pool``): it starts with what the cluster holds and grows
as an autoscaling GPU group adds nodes. Inside an actor, decoding runs on as many threads as it holds CPUs, ahead of
the model on a GPU, or on the GPU itself (``label_decode: gpu``, nvJPEG): ``stages/pseudo_label.Decoder``. The
driver only sees one small summary row per shard, never labels. A shard whose sidecar already validates is
skipped (resume); an actor that dies has its shard retried by Ray Data, which rewrites the same complete
sidecar atomically, so each unlabeled sample ends up in exactly one row. A sidecar that cannot be written (disk
full, read-only) stops the stage with a ``StorageError`` naming it; the sidecars written before it are complete
and are kept for the resume.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from pipeline.config import LabelResources
from pipeline.distributed.runtime import actor_pool_rows
from stages.data.shards import DataError
from stages.pseudo_label import PseudoLabelConfig, ShardLabeler, sidecar_info, sidecar_path
from stages.storage.files import StorageError, join, makedirs

log = logging.getLogger(__name__)


def run_pseudo_label(
    model_dir: str,
    shards: list[str],
    out_dir: str,
    cfg: PseudoLabelConfig,
    channels: int,
    resources: LabelResources,
    progress: bool = True,
) -> dict:
    """Label every shard once; returns the stage summary (rows, bad samples, images/s, sidecar paths)."""
    out = join(out_dir)
    makedirs(out)
    done = {s: sidecar_info(sidecar_path(out, s), cfg.topk) for s in shards}
    todo = [s for s, info in done.items() if info is None]
    resumed = len(shards) - len(todo)
    if resumed:
        log.info("pseudo-label: %d of %d shards already labeled, resuming with %d", resumed, len(shards), len(todo))
    start, rows_new, shards_done, errors = time.perf_counter(), 0, 0, []
    devices: dict[str, int] = {}  # shards labeled per device type ("cuda", "cpu")
    decodes: dict[str, int] = {}  # shards decoded per decoder ("gpu": nvJPEG, "cpu": PIL threads)
    startup = None  # seconds until the first actor began labeling: process start, imports, model load
    if todo:
        kwargs = {
            "model_dir": model_dir,
            "out_dir": str(out),
            "cfg": cfg,
            "channels": channels,
            "threads": resources.torch_threads(),
            "decode": resources.decode,
        }
        bar = tqdm(total=len(todo), unit="shard", desc="pseudo-label", disable=not progress, dynamic_ncols=True)
        with bar, actor_pool_rows(ShardLabeler, kwargs, [{"shard": s} for s in todo], resources) as rows:
            for row in rows:
                if row["storage_error"]:  # stop at once: every later sidecar would fail the same way
                    raise StorageError(f"pseudo-label: {row['storage_error']}")
                rows_new += int(row["rows"])
                devices[row["device"]] = devices.get(row["device"], 0) + 1
                decodes[row["decode"]] = decodes.get(row["decode"], 0) + 1
                if startup is None:
                    startup = max(0.0, time.perf_counter() - start - float(row["seconds"]))
                if row["error"]:
                    errors.append(row["error"])
                elapsed, shards_done = time.perf_counter() - start, shards_done + 1
                bar.update(1)
                # Shards don't record their size: the image total is estimated from the shards done so far.
                estimate = round(rows_new / shards_done * len(todo))
                bar.set_postfix_str(f"{rows_new}/~{estimate} images, {rows_new / max(elapsed, 1e-9):.0f} img/s")
    seconds = time.perf_counter() - start
    if errors:
        raise DataError(f"pseudo-label: {len(errors)} unreadable shard(s): " + "; ".join(errors[:5]))
    infos = {s: sidecar_info(sidecar_path(out, s), cfg.topk) for s in shards}
    missing = [s for s, info in infos.items() if info is None]
    if missing:
        raise RuntimeError(f"pseudo-label: no valid sidecar for {len(missing)} shard(s), e.g. {missing[0]}")
    total_rows = sum(info["rows"] for info in infos.values() if info)
    bad = [item for info in infos.values() if info for item in info["bad"]]
    n_seen = total_rows + len(bad)
    if bad and len(bad) > cfg.max_bad_fraction * n_seen:
        raise DataError(
            f"pseudo-label: {len(bad)} of {n_seen} unlabeled samples unusable (max_bad_fraction "
            f"{cfg.max_bad_fraction}); first: {bad[0]['shard']} {bad[0]['key']}: {bad[0]['reason']}"
        )
    with_truth = sum(info["with_truth"] for info in infos.values() if info)
    correct = sum(info["correct"] for info in infos.values() if info)
    return {
        # Accuracy against .cls carried by unlabeled shards: a diagnostic only, never used for training.
        "accuracy": round(correct / with_truth, 6) if with_truth else None,
        "shards": len(shards),
        "shards_resumed": resumed,
        "rows": total_rows,
        "bad_samples": bad,
        "seconds": round(seconds, 3),
        "images_per_s": round(rows_new / seconds, 1) if rows_new else None,
        "startup_seconds": round(startup, 3) if startup is not None else None,
        "devices": devices,
        "decode": decodes,
        "sidecars": [str(sidecar_path(out, s)) for s in shards],
    }
