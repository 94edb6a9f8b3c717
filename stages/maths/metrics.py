"""Classification metrics, computed here and nowhere else: top-1, per-class top-1, confusion, calibration, and the
pseudo-labels' accuracy against a diagnostic truth.

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


def truth_counts(truth: np.ndarray, labels: np.ndarray, kept: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """Per true class: rows with a known truth, how many of their labels are right, and the same over kept rows
    (a diagnostic: ``.cls`` in unlabeled shards is never trained on)."""
    known = truth >= 0
    right = known & (labels == truth)

    def per_class(mask: np.ndarray) -> list[int]:
        return np.bincount(truth[mask], minlength=num_classes)[:num_classes].tolist()

    return {
        "truth_rows": per_class(known),
        "truth_right": per_class(right),
        "truth_kept": per_class(known & kept),
        "truth_kept_right": per_class(right & kept),
    }


TRUTH = ("truth_rows", "truth_right", "truth_kept", "truth_kept_right")


def summarize_truth(truth: dict[str, np.ndarray]) -> dict:
    """Accuracy of the (aligned) pseudo-labels against the shards' ``.cls``: over all rows and over the kept ones,
    overall and per true class (None where a class has no such row)."""

    def rate(right: np.ndarray, rows: np.ndarray) -> list[float | None]:
        return [round(float(r / n), 6) if n else None for r, n in zip(right, rows, strict=True)]

    rows, kept = truth["truth_rows"], truth["truth_kept"]
    return {
        "rows": int(rows.sum()),
        "accuracy": round(float(truth["truth_right"].sum() / rows.sum()), 6),
        "kept": int(kept.sum()),
        "kept_accuracy": round(float(truth["truth_kept_right"].sum() / kept.sum()), 6) if kept.sum() else None,
        "per_class_accuracy": rate(truth["truth_right"], rows),
        "per_class_kept_accuracy": rate(truth["truth_kept_right"], kept),
    }
