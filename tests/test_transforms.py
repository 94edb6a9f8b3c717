"""stages/models/transforms.py: data.augment natural (timm's crop, flip, centre-crop evaluation, the model's mean/std)
on RGB images, and data.augment digits unchanged bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from stages.models.transforms import (
    _posterize,
    card_transform,
    clean_transform,
    noised_transform,
    preprocessing,
    train_transform,
)


def _gradient(width: int = 40, height: int = 24) -> Image.Image:
    """RGB, dark on the left and bright on the right, so a horizontal flip shows."""
    row = np.linspace(0, 255, width, dtype=np.float32)
    pixels = np.repeat(np.repeat(row[None, :, None], height, 0), 3, 2)
    pixels[..., 1] = np.linspace(0, 255, height, dtype=np.float32)[:, None]  # green grows downward
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


NATURAL = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "augment": "natural"}


def test_natural_training_crops_at_random_and_flips_half_the_time():
    transform = train_transform({**NATURAL, "interpolation": "bilinear", "crop_pct": 0.9}, 0, 0)
    primary = transform.transforms[0].transforms
    assert isinstance(primary[0], RandomResizedCropAndInterpolation) and primary[0].scale == (0.08, 1.0)
    assert isinstance(primary[1], T.RandomHorizontalFlip) and primary[1].p == 0.5
    torch.manual_seed(0)
    random.seed(0)
    image = _gradient()
    outs = [transform(image) for _ in range(40)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) == 40  # every crop differs
    slope = [float(o[0, :, -1].mean() - o[0, :, 0].mean()) for o in outs]  # red: right minus left
    flipped = sum(s < 0 for s in slope)
    assert 8 <= flipped <= 32  # about half mirrored, the rest not
    assert all(float(o[1, -1].mean() - o[1, 0].mean()) >= 0 for o in outs)  # never flipped vertically


def test_natural_training_adds_randaugment_for_the_noised_rounds():
    with_noise = train_transform({**NATURAL, "interpolation": "bilinear"}, 2, 5)
    names = [type(t).__name__ for t in with_noise.transforms]
    assert names == ["Compose", "RandAugment", "Compose"]


def test_natural_evaluation_resizes_then_takes_the_centre_crop():
    image = _gradient(40, 20)
    card = {**NATURAL, "interpolation": "bilinear", "crop_pct": 0.5}
    got = card_transform(card)(image)
    # resize the shorter side to 16 / 0.5 = 32 (so 64 x 32), centre crop 16 x 16, normalise
    expected = TF.center_crop(TF.resize(image, 32, interpolation=T.InterpolationMode.BILINEAR), [16, 16])
    expected = (TF.to_tensor(expected) - 0.5) / 0.25
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(card_transform(card)(image), got)  # no randomness


def test_natural_mean_and_std_default_to_the_models_pretrained_config():
    own = preprocessing("resnet10t", 3, (), (), "natural")
    assert own["mean"] == pytest.approx([0.485, 0.456, 0.406]) and own["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert own["crop_pct"] == 0.875 and own["interpolation"] == "bicubic" and own["augment"] == "natural"
    gray = preprocessing("resnet10t", 1, (), (), "natural")
    assert gray["mean"] == pytest.approx([np.mean([0.485, 0.456, 0.406])])
    assert preprocessing("resnet10t", 3, (0.1, 0.2, 0.3), (0.5,) * 3, "natural")["mean"] == [0.1, 0.2, 0.3]
    assert preprocessing("resnet10t", 1, (0.0,), (0.5,), "digits") == {
        "mean": [0.0],
        "std": [0.5],
        "interpolation": "bilinear",
    }


def test_digits_transforms_are_unchanged_bit_for_bit():
    """The default path goes through the new dispatch but must give today's tensors for the same seeds."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), "L")
    card = {"input_size": [1, 16, 16], "mean": [0.0], "std": [0.5], "interpolation": "bilinear"}
    ops = ["Rotate", "ShearX", "Contrast", "PosterizeIncreasing"]
    # what noised_transform built before data.augment existed, written out
    before = rand_augment_transform("rand-m5-n2-mstd0.5", {"img_mean": (0,)}, transforms=ops)
    for op in before.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    resize = T.Resize((16, 16), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    reference = T.Compose([resize, before, T.ToTensor(), T.Normalize([0.0], [0.5])])
    for seed in range(8):
        outs = []
        for transform in (train_transform(card, 2, 5, ops), noised_transform(16, [0.0], [0.5], 2, 5, ops), reference):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            outs.append(transform(image))
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
    assert torch.equal(card_transform(card)(image), clean_transform(16, [0.0], [0.5])(image))


# ---------------------------------------------------------------- tensor_transform (the GPU decode path's transform)


def _photo_jpeg(seed: int, width: int, height: int) -> bytes:
    """A JPEG with structure (gradients, a disc, grain), so resizing and decoding differences would show."""
    import io

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, ((xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (height / 3) ** 2)], -1)
    pixels = np.clip(255 * (0.7 * base + 0.3 * rng.random((height, width, 3))), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "card",
    [
        {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
        {"input_size": [1, 16, 16], "mean": [0.5], "std": [0.5], "interpolation": "bilinear"},
        {
            "input_size": [3, 64, 64],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic",
            "augment": "natural",
            "crop_pct": 0.875,
        },
    ],
    ids=["digits-rgb", "digits-gray", "natural-bicubic-crop"],
)
@pytest.mark.parametrize("width, height", [(120, 90), (50, 70)])
def test_tensor_transform_matches_the_pil_transform_to_a_few_grey_levels(card, width, height):
    from torchvision.io import ImageReadMode, decode_jpeg

    from stages.data.shards import decode_image
    from stages.models.transforms import tensor_transform

    channels = card["input_size"][0]
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    level = 1 / 255 / min(card["std"])  # one grey level in normalised units
    for seed in range(3):
        data = _photo_jpeg(seed, width, height)
        want = card_transform(card)(decode_image(data, channels))
        got = tensor_transform(card)(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode))
        assert got.shape == want.shape == (channels, card["input_size"][-1], card["input_size"][-1])
        # PIL rounds and clamps to uint8 after each of its two resize passes: where bicubic upsamples grain, a few
        # pixels land up to 4 levels off; on average the two are within half a level
        assert float((got - want).abs().max()) <= 5 * level
        assert float((got - want).abs().mean()) <= 0.5 * level
    # a wrong crop (no crop, or another resize) is far more than a grey level off: the check can fail
    if card.get("augment") == "natural":
        squashed = dict(card, augment="digits")
        moved = tensor_transform(squashed)(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)))
        assert float((moved - want).abs().max()) > 10 * level
