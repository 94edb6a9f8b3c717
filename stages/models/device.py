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


def training_threads(requested: int, loader_workers: int, available: int) -> int:
    """Intra-op threads for a training process: ``requested`` when set, else the ``available`` ones (torch's count:
    the machine's cores in one process, the CPUs held under Ray) less one per DataLoader worker, at least one.

    The loader workers decode and augment on the same cores, and an OpenMP team that shares its cores with a busy
    process stalls at every barrier: on 2 cores a resnet10t step at 16 px took 196 ms with 2 threads beside one busy
    process, 64 ms with 1 (53 ms with 2 on idle cores)."""
    return requested or max(1, available - loader_workers)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` intra-op threads, then restore the count: in one process, the stages after
    training (labeling, evaluation) keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
