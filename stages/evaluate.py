"""Evaluation of a round's model: per-shard prediction sidecars, and the metrics read back from them.

The model runs un-noised (eval mode, clean resize), exactly as when it pseudo-labels, and on the same path: a
``ShardEvaluator`` is a ``ShardLabeler`` (``stages/pseudo_label.py``: model loaded once, decode threads or nvJPEG,
bf16 and channels_last on a GPU) that writes ``<out_dir>/<split>/<shard_id>.parquet`` per task. A task is a shard
of one split: ``test``, ``val`` (only the carved keys when the validation split is carved from the labeled shards)
or ``test-<corruption>-<severity>`` (each image corrupted where it is decoded, ``stages/data/corruptions.py``). A
sidecar
holds ``key, shard, label`` (predicted), ``confidence``, ``true_label`` and the probabilities (``probs``; top-5 for
corrupted copies, which only count top-1); its footer records the device and decoder it ran on and the sha256 of the
model, so an interrupted stage resumes with the shards it has not done. ``eval_metrics`` reads only the label,
confidence and true-label columns back: top-1, per-class top-1, confusion, ECE, validation and corruption top-1.
The driver plans tasks and reads columns; it never decodes an image (``pipeline/distributed/evaluate.py``).

``predict_probs``/``evaluate`` score images held in memory: the benches' plain loops and ``tune``'s trials use them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stages.data.corruptions import corrupt, corruption_metrics
from stages.data.shards import LabeledSet, shard_id
from stages.models.transforms import card_transform
from stages.pseudo_label import PseudoLabelConfig, ShardLabeler, read_footer
from stages.storage.files import join, read_table

EVAL_FORMAT = "eval/v1"
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


def expected_calibration_error(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/n * |accuracy(B) - confidence(B)|."""
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs((pred[mask] == labels[mask]).mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    return prediction_metrics(probs.max(axis=1), probs.argmax(axis=1), labels, num_classes)


def prediction_metrics(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Test metrics from each sample's confidence, predicted class and true class."""
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(num_classes)]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "test_top1": float((pred == labels).mean()),
        "per_class_top1": per_class,
        "test_ece": expected_calibration_error(conf, pred, labels),
        "test_images": int(len(labels)),
        "confusion": confusion.tolist(),
    }


def evaluate(model: nn.Module, card: dict, test: LabeledSet) -> dict:
    return classification_metrics(predict_probs(model, test.images, card), test.labels, card["num_classes"])


def split_name(corruption: str = "", severity: int = 0, split: str = "test") -> str:
    """The sidecar folder of a split: ``test``, ``val``, or ``test-<corruption>-<severity>``."""
    return f"{split}-{corruption}-{severity}" if corruption else split


def eval_sidecar(out_dir, split: str, shard: str):
    return join(out_dir, split, f"{shard_id(shard)}.parquet")


def eval_done(path, model_sha: str) -> bool:
    """Whether ``path`` is a complete sidecar written by this model."""
    footer = read_footer(path, EVAL_FORMAT)
    return footer is not None and footer[1].get(b"model") == model_sha.encode()


class ShardEvaluator(ShardLabeler):
    """Writes one evaluation sidecar per task (``{"shard", "split", "corruption", "severity"}``: a Ray Data batch of
    them, or one call of ``evaluate_task`` in process). ``only``: per split, the keys to score (a carved validation
    split), absent = every sample of the shard."""

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        channels: int,
        model_sha: str,
        threads: int = 0,
        decode: str = "cpu",
        only: dict[str, frozenset[str]] | None = None,
        corruption_seed: int = 0,
        decode_threads: int = 0,
    ):
        super().__init__(model_dir, out_dir, PseudoLabelConfig(), channels, threads, decode, decode_threads)
        self.model_sha, self.only, self.corruption_seed = model_sha, only or {}, corruption_seed

    def evaluate_task(self, shard: str, split: str, corruption: str = "", severity: int = 0) -> dict:
        path = eval_sidecar(self.out_dir, split, shard)
        result = {"shard": shard, "split": split, "device": self.device.type, "decode": self.decode}
        if corruption:
            result["decode"] = "cpu"  # corruptions apply to PIL images
        if eval_done(path, self.model_sha):
            return result | {"rows": 0, "error": "", "storage_error": "", "resumed": True, "seconds": 0.0}
        prepare = None
        if corruption:

            def prepare(image, key):
                return corrupt(image, corruption, severity, self.corruption_seed, key)

        meta = {
            b"format": EVAL_FORMAT.encode(),
            b"model": self.model_sha.encode(),
            b"device": result["device"].encode(),
            b"decode": result["decode"].encode(),
        }
        topk = CORRUPTED_TOPK if corruption else 0
        done = self.write_labels(shard, path, topk, result, self.only.get(split), prepare, meta)
        del done["bad"]  # listed in the sidecar's footer; every value of a row must be a scalar for Ray Data
        return done | {"resumed": False}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            self.evaluate_task(str(shard), str(split), str(c), int(s))
            for shard, split, c, s in zip(
                batch["shard"], batch["split"], batch["corruption"], batch["severity"], strict=True
            )
        ]
        return {k: np.array([r[k] for r in results], dtype=object) for k in results[0]}


def read_predictions(paths: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(confidence, predicted, true)`` of the sidecars' rows that carry a true label, in the given order."""
    tables = [read_table(p, columns=["label", "confidence", "true_label"]) for p in paths]
    conf = np.concatenate([t.column("confidence").to_numpy() for t in tables] or [np.zeros(0, np.float32)])
    pred = np.concatenate([t.column("label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    true = np.concatenate([t.column("true_label").to_numpy() for t in tables] or [np.zeros(0, np.int32)])
    known = true >= 0
    return conf[known].astype(np.float64), pred[known].astype(np.int64), true[known].astype(np.int64)


def eval_metrics(out_dir, test_shards: list[str], num_classes: int, val_shards: list[str] = (), variants=()) -> dict:
    """``metrics.json``'s evaluation part from the sidecars under ``out_dir``: test metrics, ``val_top1`` and
    ``val_images`` when ``val_shards``, ``corruption_top1`` when ``variants`` (``(corruption, severity)`` pairs)."""
    conf, pred, true = read_predictions([eval_sidecar(out_dir, "test", s) for s in test_shards])
    metrics = prediction_metrics(conf, pred, true, num_classes)
    if val_shards:
        _, vpred, vtrue = read_predictions([eval_sidecar(out_dir, "val", s) for s in val_shards])
        metrics |= {"val_top1": float((vpred == vtrue).mean()), "val_images": int(len(vtrue))}
    if variants:
        top1 = {}
        for corruption, severity in variants:
            paths = [eval_sidecar(out_dir, split_name(corruption, severity), s) for s in test_shards]
            _, cpred, ctrue = read_predictions(paths)
            top1[(corruption, severity)] = float((cpred == ctrue).mean())
        metrics["corruption_top1"] = corruption_metrics(top1)
    return metrics
