"""The built-in default data set: scikit-learn's ``load_digits`` (1,797 real 8x8 digit images).

``split_digits`` is the one definition of the split; ``write_digits_shards`` turns it into WebDataset
shards with the layout ``<root>/{labeled,unlabeled,test,val}/<split>-NNNNNN.tar``. Run it through
``python -m pipeline prepare-digits`` (or ``make data``).

The validation split (``val``, 10 per class = 100 images) is drawn from what was the unlabeled pool, so the test
(360) and labeled (100) images are exactly those of the earlier split; the unlabeled set shrinks from 1,337 to
1,237. Every choice (stop rule, best round, ``tune``, the peers' settings) is made on it, never on test.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.shards import write_shards


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Images as uint8 HxW arrays (0..255) with labels; ``unlabeled_y`` is kept only for diagnostics."""

    labeled_x: np.ndarray
    labeled_y: np.ndarray
    unlabeled_x: np.ndarray
    unlabeled_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    val_x: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 8, 8), dtype=np.uint8))
    val_y: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def split_digits(
    seed: int = 0, test_fraction: float = 0.2, labeled_per_class: int = 10, val_per_class: int = 10
) -> DigitsSplit:
    """Stratified test split, then ``labeled_per_class`` labeled images per class, then ``val_per_class``
    validation images per class from the rest (their own generator, so the labeled draw does not move); the rest
    is unlabeled."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # load_digits stores intensities 0..16; scale to 0..255 so the PNGs look like ordinary images.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    rng = np.random.default_rng(seed)
    labeled_idx = np.concatenate(
        [rng.choice(rest_idx[labels[rest_idx] == c], labeled_per_class, replace=False) for c in np.unique(labels)]
    )
    labeled_idx.sort()
    pool = np.setdiff1d(rest_idx, labeled_idx)
    val_rng = np.random.default_rng([seed, 1])
    val_idx = np.sort(
        np.concatenate(
            [val_rng.choice(pool[labels[pool] == c], val_per_class, replace=False) for c in np.unique(labels)]
        )
    )
    unlabeled_idx = np.setdiff1d(pool, val_idx)
    test_idx = np.sort(test_idx)
    return DigitsSplit(
        labeled_x=images[labeled_idx],
        labeled_y=labels[labeled_idx],
        unlabeled_x=images[unlabeled_idx],
        unlabeled_y=labels[unlabeled_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        val_x=images[val_idx],
        val_y=labels[val_idx],
    )


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_digits_shards(root: str | Path, seed: int = 0, shards_per_split: int = 4) -> dict[str, int]:
    """Write the split as PNG WebDataset shards; unlabeled samples carry no ``.cls``. Returns counts per split."""
    split = split_digits(seed)
    root = Path(root)
    parts = {
        "labeled": (split.labeled_x, split.labeled_y),
        "unlabeled": (split.unlabeled_x, None),
        "test": (split.test_x, split.test_y),
        "val": (split.val_x, split.val_y),
    }
    counts = {}
    for name, (xs, ys) in parts.items():
        samples = [
            {"__key__": f"{name}-{i:05d}", "png": _png(x), **({} if ys is None else {"cls": str(int(ys[i])).encode()})}
            for i, x in enumerate(xs)
        ]
        write_shards(samples, root / name, prefix=name, num_shards=shards_per_split)
        counts[name] = len(samples)
    return counts
