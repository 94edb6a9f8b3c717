"""The model of self-supervised pretraining (``stages/pretrain.py``): a timm encoder built without a classifier
(``num_classes=0``: its pooled features) and SimCLR's projection head, Linear-BN-ReLU-Linear. Only the encoder is
kept (``encoder_state``); the head is thrown away after pretraining, as in SimCLR."""

from __future__ import annotations

import torch
from torch import nn

from stages.models.factory import ModelSpec, create_model

ENCODER_PREFIX = "encoder."


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection head: Linear (no bias) - BatchNorm - ReLU - Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class SimCLR(nn.Module):
    """``encoder`` (pooled features) followed by the projection head; ``forward`` gives the projections."""

    def __init__(self, spec: ModelSpec, channels: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.encoder = create_model(spec, 0, channels, noised=False)  # timm: num_classes=0 is the pooled features
        self.projector = projection_head(self.encoder.num_features, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a ``SimCLR`` state dict, named as in the timm model (its classifier absent)."""
    found = {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not found:
        raise ValueError(f"no {ENCODER_PREFIX}* tensor in the pretraining checkpoint ({len(state)} tensors)")
    return found
