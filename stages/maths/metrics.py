"""Classification metrics, computed here and nowhere else: top-1, per-class top-1, confusion, calibration.

Confusion and per-class top-1 (recall) are scikit-learn's. Calibration is one function, ``reliability``: per
equal-width confidence bin its count, accuracy and mean confidence, and the expected calibration error
``ECE = sum_b |B|/n * |accuracy(B) - confidence(B)|`` over those same bins, so the report's reliability diagram and
``metrics.json``'s ``test_ece`` cannot disagree (torchmetrics' ``binary_calibration_error`` gives the same ECE but
not the bins, and would be a dependency for ten lines).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def reliability(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: count, accuracy, mean confidence (None for empty bins); the ECE and top-1."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = (np.asarray(pred) == np.asarray(labels)).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    hits = np.bincount(which, weights=correct, minlength=bins)
    sure = np.bincount(which, weights=conf, minlength=bins)
    filled = count > 0
    accuracy = np.divide(hits, count, out=np.zeros(bins), where=filled)
    confidence = np.divide(sure, count, out=np.zeros(bins), where=filled)
    ece = float((count / max(len(conf), 1) * np.abs(accuracy - confidence))[filled].sum())
    return {
        "bins": bins,
        "count": count.tolist(),
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled, strict=True)],
        "confidence": [float(c) if f else None for c, f in zip(confidence, filled, strict=True)],
        "ece": ece,
        "top1": float(correct.mean()) if len(correct) else 0.0,
    }


def prediction_metrics(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Test metrics from each sample's confidence, predicted class and true class."""
    from sklearn.metrics import confusion_matrix

    confusion = confusion_matrix(labels, pred, labels=np.arange(num_classes))
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    return {
        "test_top1": float((pred == labels).mean()) if len(labels) else 0.0,
        "per_class_top1": per_class,
        "test_ece": reliability(conf, pred, labels)["ece"],
        "test_images": int(len(labels)),
        "confusion": confusion.tolist(),
    }


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """``prediction_metrics`` from probabilities (confidence = top probability, prediction = its class)."""
    return prediction_metrics(probs.max(axis=1), probs.argmax(axis=1), labels, num_classes)
