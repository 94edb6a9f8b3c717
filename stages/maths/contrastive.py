"""Self-supervised (SimCLR) pretraining maths: two random views of a batch of images, the NT-Xent loss, and the rule
that sizes a pretraining run from the data (issue 31; lifted from the prototype in ``scratch/ssl31/ssl_core.py``).

Views are made on whole tensor batches, on whatever device holds them: images enter as float ``(N, C, H, W)`` in
[0, 1] (background 0, the digits' black), are warped by one ``grid_sample`` for the batch (a random resized crop,
rotation and shear about the crop's centre, optionally a horizontal flip; zero fill, so a rotated digit keeps a black
border), then jittered in contrast, brightness and (RGB only) saturation, and clamped to [0, 1]. Normalisation comes
after. The digits' views have no flip (a mirrored 2 or 5 is another glyph); ``data.augment: natural`` gets the
timm-style crop, flip and colour jitter instead of rotation and shear (``natural_views``; not measured).

``nt_xent_loss`` is SimCLR's (Chen et al. 2020): each of the 2N embeddings must pick its partner among the other
2N - 1 by cosine similarity / T. It equals lightly 1.6's ``NTXentLoss`` (to 1e-7 in the prototype; golden values in
``tests/test_pretrain.py``). In a run with several workers each worker's loss sees its own batch (no all-gather).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How one view is drawn. ``crop_area``: the crop's area as a fraction of the image (random resized crop; it
    stays inside the image), ``crop_ratio``: its aspect range; ``rotate``/``shear``: degrees, uniform in +-;
    ``flip``: a horizontal flip with probability 0.5; ``brightness``/``contrast``/``saturation``: multiplicative
    jitter, uniform in 1 +- value (saturation only on 3 channels). The defaults are the prototype's digits views,
    the only setting measured (issue 31: 81.3 -> 87.8% teacher test top-1 on digits-hard)."""

    crop_area: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate: float = 15.0
    shear: float = 10.0
    flip: bool = False
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0


def natural_views(view: ViewConfig, saturation: float) -> ViewConfig:
    """The timm-style views for photos (``data.augment: natural``): the same crop and jitter, a horizontal flip and
    saturation jitter, no rotation or shear."""
    return dataclasses.replace(view, rotate=0.0, shear=0.0, flip=True, saturation=saturation)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def affine_matrices(n: int, view: ViewConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2, 3)`` matrices mapping output to input coordinates in [-1, 1] (``F.affine_grid``'s convention): a
    random resized crop placed inside the image, rotation and shear about its centre, and a flip when asked."""
    area = _uniform(n, *view.crop_area, generator)
    ratio = torch.exp(_uniform(n, math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1]), generator))
    sx, sy = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # crop half-extent / image half-extent
    cx = (1 - sx).abs() * _uniform(n, -1, 1, generator)  # the centre leaves the crop inside the image
    cy = (1 - sy).abs() * _uniform(n, -1, 1, generator)
    theta = torch.deg2rad(_uniform(n, -view.rotate, view.rotate, generator))
    shear = torch.tan(torch.deg2rad(_uniform(n, -view.shear, view.shear, generator)))
    cos, sin = torch.cos(theta), torch.sin(theta)
    # rotation @ shear-x, then each axis scaled by the crop's size
    a = torch.stack([torch.stack([cos, cos * shear - sin], -1), torch.stack([sin, sin * shear + cos], -1)], -2)
    a = a * torch.stack([sx, sy], -1).unsqueeze(-1)
    if view.flip:
        mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        a = a * torch.stack([mirror, torch.ones(n)], -1).unsqueeze(-2)  # output x -> -x
    return torch.cat([a, torch.stack([cx, cy], -1).unsqueeze(-1)], dim=-1)


def augment_view(x: torch.Tensor, view: ViewConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image of a batch in [0, 1]; a new tensor in [0, 1], same shape and dtype. The random
    draws come from ``generator`` (on the CPU) whatever device holds ``x``."""
    n = x.shape[0]
    grid = F.affine_grid(affine_matrices(n, view, generator).to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shape = (n, 1, 1, 1)
    if view.saturation and x.shape[1] == 3:
        gray = (out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(x)).sum(1, keepdim=True)
        s = _uniform(n, 1 - view.saturation, 1 + view.saturation, generator).view(shape).to(x)
        out = (out - gray) * s + gray
    if view.contrast:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * _uniform(n, 1 - view.contrast, 1 + view.contrast, generator).view(shape).to(x) + mean
    if view.brightness:
        out = out * _uniform(n, 1 - view.brightness, 1 + view.brightness, generator).view(shape).to(x)
    return out.clamp_(0.0, 1.0)


def two_views(
    x: torch.Tensor, view: ViewConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent views of the same batch."""
    return augment_view(x, view, generator), augment_view(x, view, generator)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over ``2N`` embeddings (row ``i`` of ``z1`` and of ``z2`` are a pair), in float32:
    cross-entropy of each embedding's cosine similarities / ``temperature`` to the other ``2N - 1``, its partner
    the target, averaged."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def pretrain_steps(images: int, batch: int, passes: float, min_steps: int, max_steps: int) -> int:
    """The length of a pretraining run: ``passes`` over ``images`` in batches of ``batch`` (each image's two views
    counted once), raised to ``min_steps`` (a tiny set still learns) and cut to ``max_steps`` (0 = no cap: a large set
    does not cost steps linearly in its size)."""
    steps = max(min_steps, math.ceil(passes * images / batch))
    return min(steps, max_steps) if max_steps else steps
