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
    """In-process hooks (one worker, no Ray): checkpoints kept as ``<ckpt_root>/epoch-NNNN`` directories, the newest
    ``keep`` of them (as Ray Train's ``CheckpointConfig(num_to_keep=2)`` in ``RayHooks``' runs): a digits-hard run
    kept every one, 2.3 GB of its 2.4."""

    rank, world_size = 0, 1

    def __init__(self, ckpt_root: str | Path, device: str = "cpu", keep: int = 2):
        self.root, self.device, self.keep = Path(ckpt_root), torch.device(device), keep
        self.reports: list[dict] = []

    def _done(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        done = [p for p in self.root.glob("epoch-*") if p.is_dir() and p.suffix != ".tmp"]
        return sorted(done, key=lambda p: int(p.name.removeprefix("epoch-")))  # epoch-10000 after epoch-9999

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def restore(self) -> Path | None:
        """The latest complete checkpoint; ``.tmp`` ones were cut off mid-copy by a crash."""
        done = self._done()
        return done[-1] if done else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self.root / f"epoch-{metrics['epoch']:04d}"
            try:
                shutil.copytree(checkpoint_dir, target.with_suffix(".tmp"), dirs_exist_ok=True)
            except OSError as exc:  # a full disk: one line naming the checkpoint, not shutil's list of tuples
                from stages.storage.files import write_error

                raise write_error(target, exc) from None
            target.with_suffix(".tmp").replace(target)
            for old in self._done()[: -self.keep]:  # only once the new one is complete
                shutil.rmtree(old, ignore_errors=True)
