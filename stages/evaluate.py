"""The evaluate stage: a round's model scores the test split, the validation split and corrupted copies of the test
split, one prediction sidecar per shard and split, and ``metrics.json`` is read back from them.

The model runs un-noised (eval mode, clean resize), exactly as when it pseudo-labels, and on the same path: a
``ShardEvaluator`` is a ``ShardLabeler`` (``stages/pseudo_label.py``: model loaded once, decode threads or nvJPEG,
bf16 and channels_last on a GPU) that writes ``round-NNN/eval/<split>/<shard_id>.parquet`` per task. A task is a
shard of one split: ``test``, ``val`` (only the carved keys when the validation split is carved from the labeled
shards) or ``test-<corruption>-<severity>`` (each image corrupted where it is decoded, ``stages/data/corruptions.py``).
A sidecar holds ``key, shard, label`` (predicted), ``confidence``, ``true_label`` and the probabilities (``probs``;
top-5 for corrupted copies, which only count top-1); its footer records the device and decoder it ran on and what
made it (the model's sha256, the split and its corruption, the shard), so an interrupted stage resumes with the
tasks this model has not done. ``eval_metrics`` reads only the label, confidence and true-label columns back. The
driver plans tasks and reads columns; it never decodes an image.

``predict_probs``/``evaluate`` score images held in memory: the benches' plain loops and ``tune``'s trials use them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.core.stage import ROUND_STAGES, LabelResources, RunData, StageContext, StageOutput
from stages.data.corruptions import RobustnessConfig, corrupt, corruption_metrics, variants
from stages.data.shards import LabeledSet
from stages.maths.metrics import classification_metrics, prediction_metrics
from stages.maths.round_choice import RoundPredictions, wilson_interval
from stages.models.factory import model_sha
from stages.models.transforms import card_transform
from stages.pseudo_label import PseudoLabelConfig, ShardLabeler
from stages.storage.artifacts import inputs_digest, trusted_table
from stages.storage.files import Location, atomic_write_json, join, makedirs, read_json, read_table, stamp
from stages.storage.layout import sidecar_file

log = logging.getLogger(__name__)

EVAL_FORMAT = "eval/v2"
CORRUPTED_TOPK = 5


@torch.inference_mode()
def predict_probs(model: nn.Module, images: list, card: dict, batch_size: int = 512) -> np.ndarray:
    transform = card_transform(card)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[i : i + batch_size]]).to(device)
        out.append(torch.softmax(model(x).float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def evaluate(model: nn.Module, card: dict, test: LabeledSet) -> dict:
    return classification_metrics(predict_probs(model, test.images, card), test.labels, card["num_classes"])


def split_name(corruption: str = "", severity: int = 0, split: str = "test") -> str:
    """The sidecar folder of a split: ``test``, ``val``, or ``test-<corruption>-<severity>``."""
    return f"{split}-{corruption}-{severity}" if corruption else split


def eval_sidecar(out_dir: Location, split: str, shard: str) -> Location:
    return join(out_dir, split, sidecar_file(shard))


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One shard of one split, scored by one model: what its sidecar's ``made_by`` names."""

    shard: str
    split: str
    corruption: str = ""
    severity: int = 0

    def made_by(self, model_sha: str, corruption_seed: int, only: frozenset[str] | None) -> str:
        keys = inputs_digest(keys=sorted(only)) if only is not None else ""
        return inputs_digest(
            format=EVAL_FORMAT,
            model=model_sha,
            split=self.split,
            corruption=self.corruption,
            severity=self.severity,
            seed=corruption_seed if self.corruption else 0,
            only=keys,
            shard=self.shard,
            stamp=stamp(self.shard),
        )


class ShardEvaluator(ShardLabeler):
    """A pool worker: writes one evaluation sidecar per task. ``only``: per split, the keys to score (a carved
    validation split), absent = every sample of the shard."""

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        channels: int,
        threads: int = 0,
        decode: str = "cpu",
        only: dict[str, frozenset[str]] | None = None,
        corruption_seed: int = 0,
        decode_threads: int = 0,
        cpu_decoder: str = "auto",
    ):
        cfg = PseudoLabelConfig()
        super().__init__(model_dir, out_dir, cfg, channels, threads, decode, decode_threads, cpu_decoder)
        self.only, self.corruption_seed = only or {}, corruption_seed

    def process(self, shard: str, split: str, corruption: str, severity: int, made_by: str) -> dict:
        decode = "cpu" if corruption else self.decode  # corruptions apply to PIL images
        prepare = None
        if corruption:

            def prepare(image, key):
                return corrupt(image, corruption, severity, self.corruption_seed, key)

        path = eval_sidecar(self.out_dir, split, shard)
        topk = CORRUPTED_TOPK if corruption else 0
        meta = {"device": self.device.type, "decode": decode, "decoder": "pil" if corruption else self.decoder.name}
        done = self.write_labels(
            shard, path, topk, format=EVAL_FORMAT, made_by=made_by, only=self.only.get(split), prepare=prepare, **meta
        )
        return {"rows": done["rows"], "seconds": done["seconds"], **meta}


def evaluation_tasks(data: RunData, robustness: RobustnessConfig) -> tuple[list[EvalTask], list[str]]:
    """``(tasks, validation shards)``: the test shards, the validation shards (the labeled shards holding the carved
    keys, scored on those keys only, when the split is carved) and the test shards once per corruption."""
    tasks = [EvalTask(s, "test") for s in data.test_shards]
    val_shards = data.val.shards_holding() if data.val is not None else []
    tasks += [EvalTask(s, "val") for s in val_shards]
    for corruption, severity in variants(robustness):
        split = split_name(corruption, severity)
        tasks += [EvalTask(s, split, corruption, severity) for s in data.test_shards]
    return tasks, val_shards


def evaluate_tasks(
    model_dir: Location,
    model_sha: str,
    tasks: list[EvalTask],
    out_dir: Location,
    channels: int,
    resources: LabelResources,
    executor,
    only: dict[str, frozenset[str]] | None = None,
    corruption_seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run every task whose sidecar this model has not written (whole); returns the summary: tasks, resumed, rows,
    devices and decoders per task, where it ran, seconds."""
    start = time.perf_counter()
    makedirs(out_dir)
    only = only or {}
    items = []
    for t in tasks:
        made = t.made_by(model_sha, corruption_seed, only.get(t.split))
        if trusted_table(eval_sidecar(out_dir, t.split, t.shard), EVAL_FORMAT, made) is None:
            items.append(dataclasses.asdict(t) | {"made_by": made})
    summary: dict = {"tasks": len(tasks), "resumed": len(tasks) - len(items), "rows": 0, "devices": {}, "decode": {}}
    summary["decoders"] = {}
    if items:
        kwargs = {
            "model_dir": str(model_dir),
            "out_dir": str(out_dir),
            "channels": channels,
            "decode": resources.decode,
            "cpu_decoder": resources.cpu_decoder,
            "only": only,
            "corruption_seed": corruption_seed,
        }
        bar = tqdm(
            total=len(items), unit="task", desc="evaluate", disable=not progress, dynamic_ncols=True, leave=False
        )
        with bar, executor.pool(ShardEvaluator, kwargs, items, resources) as results:
            for row in results:
                summary["rows"] += int(row["rows"])
                summary["devices"][row["device"]] = summary["devices"].get(row["device"], 0) + 1
                summary["decode"][row["decode"]] = summary["decode"].get(row["decode"], 0) + 1
                summary["decoders"][row["decoder"]] = summary["decoders"].get(row["decoder"], 0) + 1
                bar.update(1)
    summary["ran_as"] = executor.kind
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def read_predictions(paths: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(confidence, predicted, true)`` of the sidecars' rows that carry a true label, in the given order."""
    tables = [read_table(p, columns=["label", "confidence", "true_label"]) for p in paths]
    conf = np.concatenate([t.column("confidence").to_numpy() for t in tables] or [np.zeros(0, np.float32)])
    pred = np.concatenate([t.column("label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    true = np.concatenate([t.column("true_label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    known = true >= 0
    return conf[known].astype(np.float64), pred[known].astype(np.int64), true[known].astype(np.int64)


def val_predictions(paths: list) -> tuple[list[str], RoundPredictions]:
    """A round's validation predictions from its ``val`` sidecars (``eval_sidecar(out_dir, "val", shard)``): keys and
    rows sorted by key, so every round lists the same images in the same order (what ``stages.maths.round_choice``
    compares image by image). The probabilities are the model's own (temperature 1), float16 as stored."""
    tables = [read_table(p, columns=["key", "label", "true_label", "probs"]) for p in paths]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    label = np.concatenate([t.column("label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    true = np.concatenate([t.column("true_label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    probs = [np.asarray(t.column("probs").to_pylist(), dtype=np.float64) for t in tables]
    return RoundPredictions.from_sidecar_columns(
        keys, label, true, np.concatenate(probs) if probs else np.zeros((0, 1))
    )


def top1_interval(correct: np.ndarray) -> list[float]:
    """The 95% Wilson interval of a top-1 (``metrics.json``'s ``*_top1_interval``), rounded to 4 places."""
    return [round(v, 4) for v in wilson_interval(int(np.sum(correct)), len(correct))]


def eval_metrics(out_dir, test_shards: list[str], num_classes: int, val_shards: list[str] = (), variants=()) -> dict:
    """``metrics.json``'s evaluation part from the sidecars under ``out_dir``: test metrics, ``val_top1`` and
    ``val_images`` when ``val_shards`` (each top-1 with its 95% Wilson ``*_top1_interval``), ``corruption_top1`` when
    ``variants`` (``(corruption, severity)`` pairs)."""
    conf, pred, true = read_predictions([eval_sidecar(out_dir, "test", s) for s in test_shards])
    metrics = prediction_metrics(conf, pred, true, num_classes)
    metrics["test_top1_interval"] = top1_interval(pred == true)
    if val_shards:
        vconf, vpred, vtrue = read_predictions([eval_sidecar(out_dir, "val", s) for s in val_shards])
        val = prediction_metrics(vconf, vpred, vtrue, num_classes)
        metrics |= {"val_top1": val["test_top1"], "val_images": val["test_images"]}
        metrics["val_top1_interval"] = top1_interval(vpred == vtrue)
        metrics["val_per_class_top1"] = val["per_class_top1"]  # what the stuck-class warning reads
    if variants:
        top1 = {}
        for corruption, severity in variants:
            paths = [eval_sidecar(out_dir, split_name(corruption, severity), s) for s in test_shards]
            _, cpred, ctrue = read_predictions(paths)
            top1[(corruption, severity)] = float((cpred == ctrue).mean())
        metrics["corruption_top1"] = corruption_metrics(top1)
    return metrics


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """The stage: this round's model scores every split (``evaluate_tasks``), and ``metrics.json`` is written."""

    robustness: RobustnessConfig
    resources: LabelResources
    seeds: dict[str, int]  # the round's seeds, recorded in metrics.json
    name: ClassVar[str] = "evaluate"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {"config": ctx.config_digest, "train": model_sha(ctx.layout.model)}

    def run(self, ctx: StageContext) -> StageOutput:
        data, layout = ctx.data, ctx.layout
        tasks, val_shards = evaluation_tasks(data, self.robustness)
        only = {"val": data.exclude_keys} if data.exclude_keys else {}
        summary = evaluate_tasks(
            layout.model.dir,
            model_sha(layout.model),
            tasks,
            layout.eval,
            data.channels,
            self.resources,
            ctx.executor,
            only,
            self.robustness.seed,
            ctx.progress,
        )
        metrics = eval_metrics(layout.eval, data.test_shards, data.num_classes, val_shards, variants(self.robustness))
        metrics |= {"classes": data.names, "evaluation": summary, "seeds": self.seeds}
        metrics |= round_facts(ctx)
        atomic_write_json(layout.metrics, metrics)
        sidecars = [eval_sidecar(layout.eval, t.split, t.shard) for t in tasks]
        return StageOutput([layout.metrics, *sidecars], metrics)


def round_facts(ctx: StageContext) -> dict:
    """What ``metrics.json`` says of the round besides its scores: model, sizes, stage times, its teacher's scores."""
    card = read_json(ctx.layout.model.card)
    stages = ctx.manifest.data["stages"]
    selected = ctx.manifest.result("select") if ctx.round > 0 else {}
    pseudo = int(selected.get("copies_out", 0))
    facts = {
        "round": ctx.round,
        "model": card["timm_name"],
        "params": card.get("params"),
        "labeled_images": len(ctx.data.labeled),
        "pseudo_images": pseudo,
        "train_images": len(ctx.data.labeled) + pseudo,
        "pseudo_per_class": selected.get("per_class_after"),  # pseudo-labeled samples trained on, per class
        "stage_seconds": {s: stages[s]["seconds"] for s in ROUND_STAGES if s in stages},  # all before evaluate
    }
    if ctx.previous is not None:
        teacher = read_json(ctx.previous.metrics)
        facts |= {
            "teacher_top1": teacher["test_top1"],
            "teacher_val_top1": teacher.get("val_top1"),
            "pseudo_label_accuracy": ctx.manifest.result("pseudo_label").get("accuracy"),
        }
    return facts
