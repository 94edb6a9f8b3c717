"""Image transforms: the clean one every teacher and evaluation sees, and the noised one for students.

Noise is timm's RandAugment (``rand-m{M}-n{N}-mstd0.5``) on the PIL image after the clean resize. ``ops`` can
restrict RandAugment to a subset of timm's operations (names from ``timm.data.auto_augment._RAND_TRANSFORMS``);
for digits, ops that change what a digit looks like under a mirror or inversion are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageOps
from timm.data import rand_augment_transform
from timm.data.auto_augment import _RAND_TRANSFORMS
from torchvision import transforms as T

RANDAUG_OPS = tuple(_RAND_TRANSFORMS)


def clean_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (bilinear) to the model input size, to tensor, normalise. No randomness."""
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def noised_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    randaug_n: int,
    randaug_m: float,
    ops: Sequence[str] = (),
) -> Callable[[Image.Image], torch.Tensor]:
    """The clean transform with timm RandAugment (N ops of magnitude M, std 0.5) after the resize."""
    if randaug_n == 0:
        return clean_transform(image_size, mean, std)
    fill = tuple(round(255 * m) for m in mean)
    randaug = rand_augment_transform(
        f"rand-m{randaug_m:g}-n{randaug_n}-mstd0.5", {"img_mean": fill}, transforms=list(ops) if ops else None
    )
    for op in randaug.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            randaug,
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize keeps 0 bits at low magnitude (``Posterize``) or high (``PosterizeIncreasing``), which
    Pillow >= 11 refuses (``bits must be between 1 and 8``); one bit is the darkest posterize Pillow allows."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, max(1, int(bits_to_keep)))


def check_ops(ops: Sequence[str]) -> None:
    unknown = [op for op in ops if op not in RANDAUG_OPS]
    if unknown:
        raise ValueError(f"randaug_ops: unknown {unknown}; allowed: {', '.join(RANDAUG_OPS)}")
