"""How the stages run on a GPU: channels_last model and batches, bf16 autocast. On the CPU each is a no-op
beyond the move, so the same code serves both (the benches use it too, so their peers do the stages' work)."""

from __future__ import annotations

import contextlib

import torch


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def place_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
