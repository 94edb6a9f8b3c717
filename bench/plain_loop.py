"""The whole Noisy Student run as one plain script: one process, no Ray, the stages' own functions.

    python bench/plain_loop.py --config configs/digits.yaml --rounds 1 [--set key=value ...] [--work DIR] [--gpu]

The same work as ``python -m pipeline iterate`` with the same config, recipe, seeds and models: round 0 trains the
teacher (``stages.train.train_model`` with ``LocalHooks``), then each round labels the unlabeled shards in this
process (``ShardLabeler``, one process with every torch thread), selects with the reference selection
(``stages.maths.selection.select_in_memory``) and writes the per-shard selection files and compact training shards the
training stream reads (``stages.data.compact.write_selection``), trains the student and evaluates on the test shards
(``stages.evaluate.evaluate``). What it leaves out is what the pipeline adds around the stages: Ray (start, actors,
Ray Train), manifests and checksums, the data check, the report.

``bench/e2e.py`` runs it beside the pipeline. Prints one JSON line: ``{"plain_stage_seconds": {"round-000 train":
s, ...}, "top1": [...], "train_epoch_seconds": {...}, "seconds": total}``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PipelineConfig, load_config  # noqa: E402
from stages.core.hooks import LocalHooks
from stages.data.compact import pseudo_sources, write_selection  # noqa: E402
from stages.data.loader import PseudoSource  # noqa: E402
from stages.data.shards import LabeledSet, expand_shards, load_labeled, shard_id  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.maths.selection import select_in_memory  # noqa: E402
from stages.models.factory import create_model, load_model, load_weights, model_card, save_model  # noqa: E402
from stages.pseudo_label import ShardLabeler  # noqa: E402
from stages.train import TrainPlan, read_metrics_lines, train_model  # noqa: E402

SOFT_COLUMNS = ("probs", "topk_idx", "topk_prob")


def train_round(cfg: PipelineConfig, r: int, data: dict, work: Path, pseudo=(), pseudo_count: int = 0) -> float:
    """Train round ``r``'s model into ``work/round-NNN`` (weights + card); returns the summed epoch seconds."""
    d, rdir = cfg.data, work / f"round-{r:03d}"
    train_cfg = cfg.teacher if r == 0 else cfg.student
    previous = work / f"round-{r - 1:03d}"
    plan = TrainPlan(
        spec=cfg.spec(r),
        cfg=train_cfg,
        num_classes=d.num_classes,
        channels=d.channels,
        image_size=d.image_size,
        mean=d.mean,
        std=d.std,
        labeled=tuple(data["labeled"]),
        pseudo=tuple(pseudo),
        labeled_count=len(data["labeled_set"]),
        pseudo_count=pseudo_count,
        metrics_path=str(rdir / "train_metrics.jsonl"),
        init_weights=str(previous / "model.safetensors") if r and train_cfg.init_from_teacher else "",
        threads=cfg.resources.torch_threads,
        teacher_dir=str(previous) if r and train_cfg.online_teacher else "",
    )
    train_model(plan, LocalHooks(rdir / "ckpt", data["device"]))
    last = sorted((rdir / "ckpt").glob("epoch-*"))[-1]
    model = create_model(cfg.spec(r), d.num_classes, d.channels, noised=False)
    model.load_state_dict(load_weights(last / ("ema.safetensors" if train_cfg.ema_decay else "model.safetensors")))
    save_model(model, rdir, model_card(cfg.spec(r), d.num_classes, d.channels, d.image_size, d.mean, d.std))
    shutil.rmtree(rdir / "ckpt")
    return sum(row["seconds"] for row in read_metrics_lines((rdir / "train_metrics.jsonl").read_text()))


def pseudo_label(cfg: PipelineConfig, r: int, data: dict, work: Path) -> list[str]:
    """Sidecars for every unlabeled shard, written by the stage's ``ShardLabeler`` in this process."""
    out = work / f"round-{r:03d}" / "pseudo_labels"
    teacher = str(work / f"round-{r - 1:03d}")
    labeler = ShardLabeler(teacher, str(out), cfg.pseudo_label, cfg.data.channels, threads=os.cpu_count() or 1)
    for shard in data["unlabeled"]:
        result = labeler.label_shard(shard)
        if result["error"] or result["storage_error"]:
            raise RuntimeError(result["error"] or result["storage_error"])
    return [str(out / f"{shard_id(s)}.parquet") for s in data["unlabeled"]]


def select(cfg: PipelineConfig, r: int, sidecars: list[str], data: dict, work: Path) -> tuple[list[PseudoSource], int]:
    """The reference selection over all sidecars at once, written back as one selection file per shard."""
    table = pa.concat_tables([pq.read_table(s) for s in sidecars])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    labels, confidence = table.column("label").to_numpy(), table.column("confidence").to_numpy()
    copies = select_in_memory(keys, labels, confidence, cfg.data.num_classes, cfg.select)
    columns = ["key", "shard", "label", "confidence"]
    if cfg.select.label_type == "soft":
        columns += [c for c in SOFT_COLUMNS if c in table.column_names]
    kept = table.select(columns).append_column("copies", pa.array(copies.astype(np.int32)))
    shards = table.column("shard").to_numpy(zero_copy_only=False)
    out = work / f"round-{r:03d}" / "selection"
    out.mkdir(parents=True, exist_ok=True)
    for shard in data["unlabeled"]:
        rows = np.flatnonzero((shards == shard) & (copies > 0))
        write_selection(kept.take(pa.array(rows, pa.int64())), out / f"{shard_id(shard)}.parquet", cfg.select.seed)
    return pseudo_sources(out, data["unlabeled"]), int(copies.sum())


def top1(work: Path, r: int, test: LabeledSet) -> float:
    torch.set_num_threads(os.cpu_count() or 1)  # as the pipeline's driver evaluates (training set its own count)
    model, card = load_model(work / f"round-{r:03d}")
    return evaluate(model, card, test)["test_top1"]


def run(cfg: PipelineConfig, work: Path, device: str) -> dict:
    seconds: dict[str, float] = {}
    epochs: dict[str, float] = {}
    scores: list[float] = []

    def timed(name: str, fn, *a):
        start = time.perf_counter()
        out = fn(*a)
        seconds[name] = round(time.perf_counter() - start, 2)
        return out

    d = cfg.data
    data = {"device": device}
    start = time.perf_counter()
    data["labeled"] = expand_shards(d.labeled, "data.labeled")
    data["unlabeled"] = expand_shards(d.unlabeled, "data.unlabeled")
    data["labeled_set"] = load_labeled(data["labeled"], d.num_classes, d.channels, d.max_bad_fraction)
    test = load_labeled(expand_shards(d.test, "data.test"), d.num_classes, d.channels, d.max_bad_fraction, "data.test")
    seconds["setup"] = round(time.perf_counter() - start, 2)
    epochs["round-000"] = round(timed("round-000 train", train_round, cfg, 0, data, work), 2)
    scores.append(timed("round-000 evaluate", top1, work, 0, test))
    for r in range(1, cfg.rounds + 1):
        sidecars = timed(f"round-{r:03d} pseudo_label", pseudo_label, cfg, r, data, work)
        sources, count = timed(f"round-{r:03d} select", select, cfg, r, sidecars, data, work)
        epochs[f"round-{r:03d}"] = round(
            timed(f"round-{r:03d} train", train_round, cfg, r, data, work, sources, count), 2
        )
        scores.append(timed(f"round-{r:03d} evaluate", top1, work, r, test))
    return {"plain_stage_seconds": seconds, "train_epoch_seconds": epochs, "top1": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, help="keep the rounds here (default: a temporary folder)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (labeling uses it whenever one is seen)")
    args = parser.parse_args()
    start = time.perf_counter()
    if not args.gpu:  # as the pipeline's CPU actors see it (Ray hides GPUs from actors that hold none)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cfg = load_config(args.config, [*args.overrides, f"rounds={args.rounds}"])
    torch.set_num_threads(os.cpu_count() or 1)  # labeling and evaluation: the whole machine, as one process has it
    with tempfile.TemporaryDirectory(prefix="plain-loop-") as tmp:
        work = args.work or Path(tmp)
        result = run(cfg, work, "cuda" if args.gpu else "cpu")
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
