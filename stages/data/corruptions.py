"""Robustness: corrupted copies of the test set (common corruptions at a few severities), and top-1 on them.

Each corruption is a small pure function ``(image, severity 1..5, rng) -> image`` on the decoded PIL image at its
stored size (before the model's resize), after Hendrycks & Dietterich 2019 (ImageNet-C / CIFAR-10-C) with their
severity constants where they are relative (contrast, brightness, noise, JPEG quality, pixelate factor); blur is
scaled to the image size (a 3-pixel blur is nothing at 224 px and erases an 8x8 digit). Noise draws from a generator
seeded per corruption, severity and sample key, so every round is scored on the very same corrupted images. They are
made where the test shards are read, by the evaluation stage's workers (``stages/evaluate.py``). No downloads.

``corruption_metrics`` gives ``metrics.json``'s ``corruption_top1``: the mean over every corruption and severity,
the mean per corruption, and each severity's top-1.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field, StrictInt

from stages.core.config import Many, config

Corruption = Literal["gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg", "pixelate"]


@config
class RobustnessConfig:
    """Which corruptions, at which severities (1 mild .. 5 severe); an empty ``corruptions`` list is off."""

    corruptions: Many[Corruption] = ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg", "pixelate")
    severities: Annotated[Many[Annotated[StrictInt, Field(ge=1, le=5)]], Field(min_length=1)] = (1, 3, 5)
    seed: StrictInt = 0


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _from_array(x: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), mode=mode)


def gaussian_noise(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = _to_array(image)
    return _from_array(x + rng.normal(0.0, sigma, x.shape), image.mode)


def gaussian_blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    fraction = (0.03, 0.05, 0.07, 0.09, 0.12)[severity - 1]  # of the shorter side: 0.24..0.96 px on 8x8 digits
    return image.filter(ImageFilter.GaussianBlur(radius=fraction * min(image.size)))


def contrast(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = _to_array(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _from_array((x - mean) * c + mean, image.mode)


def brightness(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    return _from_array(_to_array(image) + c, image.mode)


def jpeg(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(image.mode)


def pixelate(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    w, h = image.size
    small = image.resize((max(1, round(w * c)), max(1, round(h * c))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.BOX)


CORRUPTIONS: dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def corrupt(image: Image.Image, name: str, severity: int, seed: int, key: str) -> Image.Image:
    """``image`` under one corruption; the noise is drawn from the sample's own key, so the corrupted copy is the
    same in every round, on every worker, whatever shard or batch the image comes in."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, list(CORRUPTIONS).index(name), severity, draw])
    return CORRUPTIONS[name](image, severity, rng)


def variants(cfg: RobustnessConfig) -> list[tuple[str, int]]:
    """Every ``(corruption, severity)`` the config scores, in config order."""
    return [(name, severity) for name in cfg.corruptions for severity in cfg.severities]


def corruption_metrics(top1: dict[tuple[str, int], float]) -> dict:
    """``{"mean", "per_corruption": {name: mean over severities}, "per_severity": {name: {severity: top-1}}}``."""
    names = list(dict.fromkeys(name for name, _ in top1))
    per_severity = {n: {str(s): v for (m, s), v in top1.items() if m == n} for n in names}
    per_corruption = {n: float(np.mean(list(v.values()))) for n, v in per_severity.items()}
    return {
        "mean": float(np.mean(list(top1.values()))) if top1 else None,
        "per_corruption": per_corruption,
        "per_severity": per_severity,
    }
