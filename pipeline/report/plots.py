"""The run report's figures, each returned as PNG bytes (matplotlib's object API: no pyplot, no global backend).

Every function draws only values read from the run's files (see ``pipeline/report/data.py``); the report puts the
same values in tables with ``data-file``/``data-key`` attributes so that they can be checked.
Used by ``pipeline/report/page.py``; run ``python -m pipeline report RUN``.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from pipeline.report.data import Example, RoundFiles
from stages.core.stage import ROUND_STAGES

DPI = 90


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _round_ticks(ax, rounds: list[int]) -> None:
    ax.set_xticks(rounds)
    ax.set_xlabel("round")


def plot_top1(rounds: list[RoundFiles]) -> bytes:
    """Student test top-1 per round, and the teacher it learnt from (the previous round's model)."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    idx = [r.index for r in rounds]
    ax.plot(idx, [r.metrics["test_top1"] * 100 for r in rounds], "o-", label="student (this round's model)")
    validated = [r for r in rounds if r.metrics.get("val_top1") is not None]
    if validated:  # what the choices are made on, beside what is reported
        ax.plot([r.index for r in validated], [r.metrics["val_top1"] * 100 for r in validated], "^:", label="val")
    taught = [r for r in rounds if r.metrics.get("teacher_top1") is not None]
    if taught:
        ax.plot(
            [r.index for r in taught], [r.metrics["teacher_top1"] * 100 for r in taught], "s--", label="its teacher"
        )
    _round_ticks(ax, idx)
    ax.set(ylabel="test top-1 (%)", title="test top-1 per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_per_class(rounds: list[RoundFiles], names: list[str] | None = None) -> bytes:
    """Heat map of per-class test top-1 (classes x rounds), annotated when small enough to read."""
    values = np.array(
        [[np.nan if v is None else v * 100 for v in r.metrics["per_class_top1"]] for r in rounds], dtype=float
    ).T
    n_classes = values.shape[0]
    fig = Figure(figsize=(1.6 + 0.9 * len(rounds), 1.2 + 0.28 * min(n_classes, 60)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=np.nanmin(values), vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(rounds)), [str(r.index) for r in rounds])
    ax.set(xlabel="round", ylabel="class", title="per-class test top-1 (%)")
    if n_classes <= 30 and len(rounds) <= 12:
        ax.set_yticks(range(n_classes), names[:n_classes] if names else None)
        for (c, k), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(k, c, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < 90 else "k")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def plot_confidence(rounds: list[RoundFiles]) -> bytes:
    """Teacher confidence of every unlabeled sample per round (selection.json's histogram), with the floor."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for r in rounds:
        hist = r.selection["confidence_histogram"]
        ax.stairs(hist["counts"], hist["edges"], label=f"round {r.index} (teacher: round {r.index - 1})")
    ax.axvline(rounds[-1].selection["floor"], color="tab:red", ls="--", label=f"floor {rounds[-1].selection['floor']}")
    ax.set(xlabel="teacher confidence (max soft-label probability)", ylabel="unlabeled samples", yscale="log")
    ax.set_title("pseudo-label confidence")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_pseudo_accuracy(rounds: list[RoundFiles]) -> bytes:
    known = [r for r in rounds if r.metrics.get("pseudo_label_accuracy") is not None]
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r.index for r in known], [r.metrics["pseudo_label_accuracy"] * 100 for r in known], "o-")
    _round_ticks(ax, [r.index for r in known])
    ax.set(ylabel="accuracy (%)", title="pseudo-label accuracy against the unlabeled shards' .cls")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_selection(rounds: list[RoundFiles], names: list[str] | None = None) -> bytes:
    """Per class: counts before/after selection, per-class confidence thresholds, duplication factors."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for r in rounds:
        s = r.selection
        classes = np.arange(len(s["per_class_before"]))
        (line,) = ax1.plot(classes, s["per_class_before"], "o-", ms=3, label=f"r{r.index} before")
        ax1.plot(classes, s["per_class_after"], "x--", ms=4, color=line.get_color(), label=f"r{r.index} after")
        ax2.plot(classes, s["thresholds"], "o-", ms=3, label=f"round {r.index}")
        ax3.plot(classes, s["duplication"], "o-", ms=3, label=f"round {r.index}")
    ax1.set(xlabel="class", ylabel="samples", title="class counts: teacher argmax vs selected")
    ax2.set(xlabel="class", ylabel="confidence", title="per-class threshold")
    ax3.set(xlabel="class", ylabel="copies per kept sample", title="duplication factor")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        if names and len(names) <= 30:
            ax.set_xticks(range(len(names)), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=7)
    return _png(fig)


def plot_examples(
    examples: dict[int, dict[str, list[Example]]], per_side: int, names: list[str] | None = None, cell: int = 64
) -> bytes:
    """Rows are classes; the left block the most confident kept samples, the right block the least confident.

    The thumbnails are tiled into one array drawn by a single ``imshow`` (one axes per image is ~50x slower).
    """
    n_rows, n_cols = len(examples), 2 * per_side + 1
    label_h = 14  # pixels under each thumbnail for its confidence
    mosaic = np.full((n_rows * (cell + label_h), n_cols * cell, 3), 255, dtype=np.uint8)
    labels = []
    for row, sides in enumerate(examples.values()):
        cells = sides["most"] + [None] * (per_side - len(sides["most"])) + [None] + sides["least"]
        for col, ex in enumerate(cells):
            if ex is None:
                continue
            thumb = _thumbnail(ex.image, cell - 6)
            y, x = row * (cell + label_h) + (cell - thumb.shape[0]) // 2, col * cell + (cell - thumb.shape[1]) // 2
            mosaic[y : y + thumb.shape[0], x : x + thumb.shape[1]] = thumb
            labels.append((col * cell + cell / 2, row * (cell + label_h) + cell + label_h / 2, f"{ex.confidence:.2f}"))
    height, width = mosaic.shape[:2]
    margin = 70  # pixels left of the mosaic for the class names
    fig = Figure(figsize=((width + margin) / DPI, (height + 30) / DPI))
    ax = fig.add_axes((margin / (width + margin), 0, width / (width + margin), height / (height + 30)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text in labels:
        ax.text(x, y, text, ha="center", va="center", fontsize=7)
    for row, c in enumerate(examples):
        ax.text(
            -6,
            row * (cell + label_h) + cell / 2,
            names[c] if names else f"class {c}",
            ha="right",
            va="center",
            fontsize=9,
        )
    fig.suptitle(f"left: {per_side} most confident kept per class · right: {per_side} least confident kept", fontsize=9)
    return _png(fig)


def _thumbnail(image, size: int) -> np.ndarray:
    """RGB uint8 array fitting in ``size`` x ``size``; small images are enlarged without smoothing."""
    from PIL import Image

    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.convert("RGB").resize(new, resample))


def plot_reliability(reliability: dict[int, dict]) -> bytes:
    """One reliability diagram per round: accuracy vs mean confidence per bin, bar width = the bin."""
    n = len(reliability)
    cols = min(n, 4)
    fig = Figure(figsize=(3.2 * cols, 3.1 * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax, (r, rel) in zip(axes, sorted(reliability.items()), strict=False):
        bins = rel["bins"]
        lefts = np.arange(bins) / bins
        acc = [np.nan if a is None else a for a in rel["accuracy"]]
        conf = [np.nan if m is None else m for m in rel["confidence"]]
        ax.bar(lefts, acc, width=1 / bins, align="edge", edgecolor="k", lw=0.4, label="accuracy")
        ax.plot(conf, acc, "r.", ms=5, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(
            xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"round {r} (ECE {rel['ece']:.4f})"
        )
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[n:]:
        ax.set_axis_off()
    return _png(fig)


def plot_timing(rounds: list[RoundFiles]) -> bytes:
    """Stacked seconds per stage per round, and images/s of the two stages that record it."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    idx = [r.index for r in rounds]
    bottom = np.zeros(len(rounds))
    for stage in ROUND_STAGES:
        secs = np.array([r.manifest["stages"].get(stage, {}).get("seconds", 0.0) for r in rounds])
        ax1.bar(idx, secs, bottom=bottom, label=stage)
        bottom += secs
    _round_ticks(ax1, idx)
    ax1.set(ylabel="seconds", title="time per stage")
    ax1.legend(fontsize=8)
    for stage in ("pseudo_label", "train"):
        pts = [(r.index, _rate(r, stage)) for r in rounds if _rate(r, stage) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=stage)
    _round_ticks(ax2, idx)
    ax2.set(ylabel="images / s", title="throughput")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _png(fig)


def _rate(r: RoundFiles, stage: str) -> float | None:
    return r.manifest["stages"].get(stage, {}).get("result", {}).get("images_per_s")


def plot_models(rounds: list[RoundFiles]) -> bytes:
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    idx = [r.index for r in rounds]
    bars = ax.bar(idx, [r.metrics["params"] / 1e6 for r in rounds], color="tab:gray")
    ax.bar_label(bars, [r.metrics["model"] for r in rounds], fontsize=7)
    _round_ticks(ax, idx)
    ax.set(ylabel="parameters (M)", title="model size along the ladder")
    return _png(fig)


def plot_training(rounds: list[RoundFiles]) -> bytes:
    """Training loss per epoch of each round (labeled and pseudo-labeled terms dotted)."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for r in rounds:
        if not r.train_log:
            continue
        epochs = [e["epoch"] for e in r.train_log]
        ax1.plot(epochs, [e["loss"] for e in r.train_log], label=f"round {r.index}")
        ax2.plot(epochs, [e["lr"] for e in r.train_log], label=f"round {r.index}")
    ax1.set(xlabel="epoch", ylabel="loss", title="training loss (labeled + pseudo)")
    ax2.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def plot_compare(names: tuple[str, str], series: tuple[list[tuple[int, float]], list[tuple[int, float]]]) -> bytes:
    """Test top-1 per round of two runs on one axis."""
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for name, pts in zip(names, series, strict=True):
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], "o-", label=name)
    _round_ticks(ax, sorted({p[0] for pts in series for p in pts}))
    ax.set(ylabel="test top-1 (%)", title="test top-1 per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
