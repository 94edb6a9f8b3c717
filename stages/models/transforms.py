"""Image transforms: the clean one every teacher and evaluation sees, and the noised one for students.

Noise is timm's RandAugment (``rand-m{M}-n{N}-mstd0.5``) on the PIL image after the clean resize. ``ops`` can
restrict RandAugment to a subset of timm's operations (names from ``timm.data.auto_augment._RAND_TRANSFORMS``);
for digits, ops that change what a digit looks like under a mirror or inversion are left out.

Two families, chosen by ``data.augment`` and recorded in each round's ``model.json`` (``augment``; absent = digits):
``digits`` (the default) squeezes the whole image to the input size, no crop and no flip, RandAugment filling with
``mean`` (black for the digits). ``natural`` is timm's transform factory (``create_transform``): random-resized crop
and horizontal flip for training, RandAugment after them; resize and centre crop by the model's ``crop_pct`` for
evaluation and pseudo-labeling; mean/std, interpolation and crop_pct from the model's pretrained config
(``resolve_data_config``) unless ``data.mean``/``data.std`` are given (``preprocessing``).

``tensor_transform`` is ``card_transform`` on a decoded uint8 tensor, on whatever device holds it: the pseudo-label
actors' GPU decoding (``label_decode: gpu``) resizes, crops and normalises there, in float, without PIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, rand_augment_transform, resolve_data_config
from timm.data.auto_augment import _RAND_TRANSFORMS
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

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
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            _randaug(randaug_n, randaug_m, ops, {"img_mean": fill}),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _randaug(randaug_n: int, randaug_m: float, ops: Sequence[str], hparams: dict):
    randaug = rand_augment_transform(
        f"rand-m{randaug_m:g}-n{randaug_n}-mstd0.5", hparams, transforms=list(ops) if ops else None
    )
    for op in randaug.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return randaug


def preprocessing(model: str, channels: int, mean: Sequence[float], std: Sequence[float], augment: str) -> dict:
    """What a round's ``model.json`` records about its input: ``mean``, ``std``, ``interpolation`` and, for
    ``natural``, ``augment`` and ``crop_pct``; an empty ``mean``/``std`` is the model's pretrained one (its
    3-channel mean averaged for grayscale)."""
    if augment != "natural":
        return {"mean": list(mean), "std": list(std), "interpolation": "bilinear"}
    pretrained = timm.get_pretrained_cfg(model)
    resolved = resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained else {})

    def own(values: Sequence[float]) -> list[float]:
        return [sum(values) / len(values)] if channels == 1 else list(values)

    return {
        "mean": list(mean) or own(resolved["mean"]),
        "std": list(std) or own(resolved["std"]),
        "interpolation": resolved["interpolation"],
        "augment": "natural",
        "crop_pct": resolved["crop_pct"],
    }


def natural_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
    randaug_n: int,
    randaug_m: float,
    ops: Sequence[str] = (),
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform (random-resized crop, horizontal flip; no colour jitter: RandAugment is the
    noise), with the rung's RandAugment between the crop and the tensor."""
    primary, _, final = create_transform(
        image_size,
        is_training=True,
        hflip=0.5,
        color_jitter=None,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        separate=True,
    )
    middle = []
    if randaug_n:
        hparams = {"img_mean": tuple(min(255, round(255 * m)) for m in mean), "translate_const": int(image_size * 0.45)}
        middle = [_randaug(randaug_n, randaug_m, ops, hparams)]
    return T.Compose([primary, *middle, final])


def natural_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str, crop_pct: float
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform: resize to ``image_size / crop_pct``, centre crop ``image_size``."""
    return create_transform(
        image_size, interpolation=interpolation, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct
    )


def train_transform(
    card: dict, randaug_n: int, randaug_m: float, ops: Sequence[str] = ()
) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform for a model card's input (``data.augment``): ``noised_transform`` for digits, else the
    natural one."""
    size, mean, std = card["input_size"][-1], card["mean"], card["std"]
    if card.get("augment") == "natural":
        return natural_train_transform(size, mean, std, card["interpolation"], randaug_n, randaug_m, ops)
    return noised_transform(size, mean, std, randaug_n, randaug_m, ops)


def card_transform(card: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The un-noised transform a model's ``model.json`` asks for (evaluation, pseudo-labeling, predict, export)."""
    size = card["input_size"][-1]
    if card.get("augment") == "natural":
        return natural_eval_transform(size, card["mean"], card["std"], card["interpolation"], card["crop_pct"])
    return clean_transform(size, card["mean"], card["std"])


def unit_transform(card: dict) -> Callable[[Image.Image], torch.Tensor]:
    """A whole image at the model's input size as a tensor in [0, 1], not normalised: the input of augmentation done
    on tensor batches (``stages/maths/contrastive.py``). Digits: the clean resize; ``natural``: the shorter side
    resized to the input size, then the centre square (the views crop from it)."""
    size = card["input_size"][-1]
    if card.get("augment") == "natural":
        mode = T.InterpolationMode(card.get("interpolation", "bilinear"))
        return T.Compose([T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(size), T.ToTensor()])
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.ToTensor()])


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


def tensor_transform(card: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``card_transform`` for a ``(C, H, W)`` uint8 tensor on any device: the same resize (antialiased), centre crop
    and normalisation, computed in float32 and clamped to [0, 255] after the resize, where PIL rounds to uint8; the
    two agree within half a grey level on average, a few pixels of bicubic upsampling up to four
    (``tests/test_transforms.py``)."""
    size = card["input_size"][-1]
    natural = card.get("augment") == "natural"
    mode = T.InterpolationMode(card.get("interpolation", "bilinear"))
    resize_to = [int(size / card["crop_pct"])] if natural else [size, size]  # the shorter side, as timm's eval
    mean = torch.tensor(card["mean"]).view(-1, 1, 1)
    std = torch.tensor(card["std"]).view(-1, 1, 1)

    def apply(image: torch.Tensor) -> torch.Tensor:
        x = F.resize(image.float(), resize_to, interpolation=mode, antialias=True).clamp_(0, 255)
        if natural:
            x = F.center_crop(x, [size, size])
        return (x / 255 - mean.to(x.device)) / std.to(x.device)

    return apply
