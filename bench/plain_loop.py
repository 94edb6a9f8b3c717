"""The whole Noisy Student run as one plain script: one process, no Ray, the stages' own functions.

    python bench/plain_loop.py --config configs/digits.yaml --rounds 1 [--set key=value ...] [--work DIR] [--gpu]

The same work as ``python -m pipeline iterate`` with the same config, recipe, seeds and models: each round's
training plan is the pipeline's own (``pipeline.plan.plan_for``: the round's seed, the model's input, the previous
model where the recipe reads it) and its model folder holds the card the pipeline writes (``model_card_for``). Round 0
trains the teacher (``stages.train.train_model`` on the in-process executor, ``bench_common.fit_in_process``), then
each round labels the unlabeled shards in this process (``ShardLabeler.process``, one process with every torch
thread), selects with the reference selection (``stages.maths.selection.select_in_memory``, the round's select seed)
and writes the per-shard selection files and compact training shards the training stream reads
(``stages.data.compact.write_selection``), trains the student and evaluates on the test shards
(``stages.evaluate.evaluate``). What it leaves out is what the pipeline adds around the stages: Ray when the run uses
it (start, actors, Ray Train), manifests and checksums, the data check, the validation and corrupted-test scoring,
the report.

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

from bench_common import fit_in_process, load_prepared, model_top1, save_round_model  # noqa: E402

from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.plan import plan_for, select_config  # noqa: E402
from stages.data.compact import pseudo_sources, write_selection  # noqa: E402
from stages.data.loader import PseudoSource  # noqa: E402
from stages.data.shards import expand_shards, load_labeled  # noqa: E402
from stages.maths.selection import select_in_memory  # noqa: E402
from stages.models.factory import check_classifier  # noqa: E402
from stages.pseudo_label import ShardLabeler  # noqa: E402
from stages.storage.layout import RunLayout  # noqa: E402
from stages.train import read_metrics_lines  # noqa: E402

SOFT_COLUMNS = ("probs", "topk_idx", "topk_prob")


def train_round(cfg: PipelineConfig, r: int, data: dict, work: Path, pseudo=(), pseudo_count: int = 0) -> float:
    """Train round ``r``'s model into ``work/round-NNN`` (weights + card); returns the summed epoch seconds."""
    run = RunLayout(work)
    layout, count = run.round(r), len(data["labeled_set"])
    plan = plan_for(cfg, r, data["labeled"], count, run=run, pseudo=tuple(pseudo), pseudo_count=pseudo_count)
    weights, _ = fit_in_process(plan, layout.dir / "ckpt", data["device"])
    save_round_model(weights, cfg, r, layout.dir)
    shutil.rmtree(layout.dir / "ckpt")
    return sum(row["seconds"] for row in read_metrics_lines(layout.train_metrics.read_text()))


def pseudo_label(cfg: PipelineConfig, r: int, data: dict, work: Path) -> list[Path]:
    """Sidecars for every unlabeled shard, written by the stage's ``ShardLabeler`` in this process."""
    run = RunLayout(work)
    out, teacher = run.round(r).pseudo_labels, run.round(r - 1).dir
    threads, decoder = os.cpu_count() or 1, cfg.resources.cpu_decoder  # the pipeline's CPU decoding backend
    labeler = ShardLabeler(str(teacher), str(out), cfg.pseudo_label, cfg.data.channels, threads, cpu_decoder=decoder)
    for shard in data["unlabeled"]:
        labeler.process(shard, made_by=f"plain_loop round {r}")  # no resume here: nothing reads the footer back
    return [run.round(r).pseudo_label(s) for s in data["unlabeled"]]


def select(cfg: PipelineConfig, r: int, sidecars: list[Path], data: dict, work: Path) -> tuple[list[PseudoSource], int]:
    """The reference selection over all sidecars at once, written back as one selection file per shard."""
    select_cfg = select_config(cfg, r, pretrained=False)  # the round's, as the stage's (this script never pretrains)
    table = pa.concat_tables([pq.read_table(s) for s in sidecars])
    keys = table.column("key").to_numpy(zero_copy_only=False)
    labels, confidence = table.column("label").to_numpy(), table.column("confidence").to_numpy()
    copies = select_in_memory(keys, labels, confidence, cfg.data.num_classes, select_cfg)
    columns = ["key", "shard", "label", "confidence"]
    if select_cfg.label_type == "soft":
        columns += [c for c in SOFT_COLUMNS if c in table.column_names]
    kept = table.select(columns).append_column("copies", pa.array(copies.astype(np.int32)))
    shards = table.column("shard").to_numpy(zero_copy_only=False)
    layout = RunLayout(work).round(r)
    layout.selection.mkdir(parents=True, exist_ok=True)
    for shard in data["unlabeled"]:
        rows = np.flatnonzero((shards == shard) & (copies > 0))
        selected = kept.take(pa.array(rows, pa.int64()))
        write_selection(selected, layout.selected(shard), select_cfg.seed, made_by=f"plain_loop round {r}")
    return pseudo_sources(layout.selection, data["unlabeled"]), int(copies.sum())


def top1(work: Path, r: int, test) -> float:
    return model_top1(RunLayout(work).round(r).dir, test)


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
    for r in range(cfg.rounds + 1):  # each round's parameter count (its card's), checked once as the preflight does
        check_classifier(cfg.spec(r), d.num_classes, d.channels, d.image_size)
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
    cfg = load_prepared(args.config, [*args.overrides, f"rounds={args.rounds}"])
    torch.set_num_threads(os.cpu_count() or 1)  # labeling and evaluation: the whole machine, as one process has it
    with tempfile.TemporaryDirectory(prefix="plain-loop-") as tmp:
        work = args.work or Path(tmp)
        result = run(cfg, work, "cuda" if args.gpu else "cpu")
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
