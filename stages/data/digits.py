"""The built-in default data set: scikit-learn's ``load_digits`` (1,797 real 8x8 digit images).

``split_digits`` is the one definition of the split; ``write_digits_shards`` turns it into WebDataset
shards with the layout ``<root>/{labeled,unlabeled,test,val}/<split>-NNNNNN.tar``. Run it through
``python -m pipeline prepare-digits`` (or ``make data``).

The validation split (``val``, 10 per class = 100 images) is drawn from what was the unlabeled pool, so the test
(360) and labeled (100) images are exactly those of the earlier split; the unlabeled set shrinks from 1,337 to
1,237. Every choice (stop rule, best round, ``tune``, the peers' settings) is made on it, never on test.

"digits-hard" (issue 31, ``labeled_per_class=2``: ``prepare-digits --labeled-per-class 2``) keeps a seeded subset of
the default's 10 labeled images per class and moves the others into the unlabeled pool: 20 labeled, 1,317 unlabeled,
and the same 100 validation and 360 test images, byte for byte. The subset is the one the issue-31 prototype
measured (``np.random.default_rng(seed)`` over each class's labeled images in index order).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.shards import iter_raw_samples, write_shards

DEFAULT_LABELED_PER_CLASS = 10  # the default split's labeled draw; fewer per class is a subset of it
SPLITS = ("labeled", "unlabeled", "test", "val")


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
    seed: int = 0,
    test_fraction: float = 0.2,
    labeled_per_class: int = DEFAULT_LABELED_PER_CLASS,
    val_per_class: int = 10,
) -> DigitsSplit:
    """Stratified test split, then 10 labeled images per class, then ``val_per_class`` validation images per class
    from the rest (their own generator, so the labeled draw does not move); the rest is unlabeled. With
    ``labeled_per_class`` below 10, a seeded subset of each class's 10 stays labeled and the others join the
    unlabeled pool (in index order), so test and validation are the default split's images whatever it is."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 1 <= labeled_per_class <= DEFAULT_LABELED_PER_CLASS:
        raise ValueError(f"labeled_per_class: must be in [1, {DEFAULT_LABELED_PER_CLASS}], got {labeled_per_class}")
    digits = load_digits()
    # load_digits stores intensities 0..16; scale to 0..255 so the PNGs look like ordinary images.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    classes = np.unique(labels)
    idx = np.arange(len(labels))
    rest_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    rng = np.random.default_rng(seed)
    labeled_idx = np.concatenate(
        [rng.choice(rest_idx[labels[rest_idx] == c], DEFAULT_LABELED_PER_CLASS, replace=False) for c in classes]
    )
    labeled_idx.sort()
    pool = np.setdiff1d(rest_idx, labeled_idx)
    val_rng = np.random.default_rng([seed, 1])
    val_idx = np.sort(
        np.concatenate([val_rng.choice(pool[labels[pool] == c], val_per_class, replace=False) for c in classes])
    )
    unlabeled_idx = np.setdiff1d(pool, val_idx)
    if labeled_per_class < DEFAULT_LABELED_PER_CLASS:
        keep_rng = np.random.default_rng(seed)  # a fresh generator, as the issue-31 prototype drew its subset
        kept = np.sort(
            np.concatenate(
                [
                    keep_rng.choice(labeled_idx[labels[labeled_idx] == c], labeled_per_class, replace=False)
                    for c in classes
                ]
            )
        )
        unlabeled_idx = np.union1d(unlabeled_idx, np.setdiff1d(labeled_idx, kept))
        labeled_idx = kept
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


def write_digits_shards(
    root: str | Path, seed: int = 0, shards_per_split: int = 4, labeled_per_class: int = DEFAULT_LABELED_PER_CLASS
) -> dict[str, int]:
    """Write the split as PNG WebDataset shards; unlabeled samples carry no ``.cls``. Returns counts per split."""
    split = split_digits(seed, labeled_per_class=labeled_per_class)
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


def digits_written(root: str | Path, labeled_per_class: int = DEFAULT_LABELED_PER_CLASS) -> bool:
    """Whether ``root`` holds the digits shards (every split has a tar); ``ValueError`` when they hold another
    number of labeled images than ``labeled_per_class`` asks for (the default split written where digits-hard is
    wanted, or the other way round): one line naming the folder."""
    root = Path(root)
    if not all(any((root / s).glob("*.tar")) for s in SPLITS):
        return False
    found = sum(1 for shard in sorted((root / "labeled").glob("*.tar")) for _ in iter_raw_samples(str(shard)))
    wanted = labeled_per_class * 10
    if found != wanted:
        raise ValueError(
            f"{root} holds {found} labeled digits, not {wanted} ({labeled_per_class} per class); remove the folder "
            "to have it written again, or name another folder"
        )
    return True
