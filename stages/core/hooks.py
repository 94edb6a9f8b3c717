"""How a training loop meets its runtime: ``TrainHooks`` (rank, device, DDP wrapping, checkpoint restore and report),
and ``LocalHooks``, the in-process implementation (one worker, checkpoints as ``<root>/epoch-NNNN`` folders).

``stages.train.train_model`` is written against ``TrainHooks``; Ray Train's implementation is
``pipeline/distributed/executor.RayHooks``, ``tune``'s scores each checkpoint on validation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


class TrainHooks(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module: ...
    def restore(self) -> Path | None: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None: ...


class LocalHooks:
    """In-process hooks (one worker, no Ray): checkpoints kept as ``<ckpt_root>/epoch-NNNN`` directories."""

    rank, world_size = 0, 1

    def __init__(self, ckpt_root: str | Path, device: str = "cpu"):
        self.root, self.device = Path(ckpt_root), torch.device(device)
        self.reports: list[dict] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def restore(self) -> Path | None:
        """The latest complete checkpoint; ``.tmp`` ones were cut off mid-copy by a crash."""
        done = [p for p in self.root.glob("epoch-*") if p.is_dir() and p.suffix != ".tmp"]
        return max(done, key=lambda p: int(p.name.removeprefix("epoch-")), default=None)  # epoch-10000 > epoch-9999

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self.root / f"epoch-{metrics['epoch']:04d}"
            shutil.copytree(checkpoint_dir, target.with_suffix(".tmp"), dirs_exist_ok=True)
            target.with_suffix(".tmp").replace(target)
