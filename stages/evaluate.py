"""Evaluation of a round's model on the test shards: top-1, per-class top-1, calibration (ECE).

The model runs un-noised (eval mode, clean resize), exactly as when it pseudo-labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stages.data import LabeledSet
from stages.transforms import card_transform


@torch.inference_mode()
def predict_probs(model: nn.Module, images: list, card: dict, batch_size: int = 512) -> np.ndarray:
    transform = card_transform(card)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[i : i + batch_size]]).to(device)
        out.append(torch.softmax(model(x).float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/n * |accuracy(B) - confidence(B)|."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs((pred[mask] == labels[mask]).mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    pred = probs.argmax(axis=1)
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(num_classes)]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "test_top1": float((pred == labels).mean()),
        "per_class_top1": per_class,
        "test_ece": expected_calibration_error(probs, labels),
        "test_images": int(len(labels)),
        "confusion": confusion.tolist(),
    }


def evaluate(model: nn.Module, card: dict, test: LabeledSet) -> dict:
    return classification_metrics(predict_probs(model, test.images, card), test.labels, card["num_classes"])
