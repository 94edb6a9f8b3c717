"""The hand-written peers of the training stage, used by ``bench/train.py``: what a user writes with webdataset and
a torch ``DataLoader`` instead of the stage, with the same model, optimizer, loss, noise, threads and loader workers.

- ``teacher_loop``: labeled shards only (``pseudo=()`` in the stage);
- ``student_loop``: every step takes ``labeled_batch`` labeled samples and ``pseudo_batch`` pseudo-labeled ones,
  read from the unlabeled shards and kept as the selection sidecars say (``key``, ``copies``, soft ``probs``):
  a sample is yielded ``copies`` times, each copy augmented on its own, with the teacher's soft label as target;
- ``bare_steps``: forward + backward + step on one batch already in memory.

Each loop skips ``warmup`` steps (DataLoader start-up, first batches), then times ``steps``.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from bench_common import Accel
from torch.utils.data import DataLoader, IterableDataset

from stages.data.shards import decode_image, image_field
from stages.models.factory import ModelSpec, create_model
from stages.train import TrainConfig, build_optimizer, noisy_student_loss


def train_step(model, opt, x, y, p, cfg: TrainConfig, accel: Accel) -> None:
    """One step as the stage takes it: autocast forward and loss, backward, optimizer step."""
    x, y, p = accel.batch(x), y.to(accel.device, non_blocking=True), p.to(accel.device, non_blocking=True)
    with accel.autocast():
        loss, _ = noisy_student_loss(model(x), y, p, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _timed(model, opt, batches, cfg: TrainConfig, steps: int, warmup: int, accel: Accel) -> float:
    """Images/s over ``steps`` steps after ``warmup`` steps."""
    images = 0
    for i, (x, y, p) in enumerate(batches):
        if i == warmup:
            accel.sync()
            start, images = time.perf_counter(), 0
        if i == warmup + steps:
            break
        train_step(model, opt, x, y, p, cfg, accel)
        images += x.shape[0]
    accel.sync()
    return images / (time.perf_counter() - start)


def bare_steps(spec: ModelSpec, cfg: TrainConfig, classes: int, size: int, pseudo: int, steps: int, accel) -> float:
    model = accel.model(create_model(spec, classes, 3, noised=True).train())
    opt = build_optimizer(model, cfg)
    n = cfg.batch_size + pseudo
    x, y = torch.randn(n, 3, size, size), torch.randint(0, classes, (cfg.batch_size,))
    p = torch.softmax(torch.randn(pseudo, classes), dim=-1)
    return _timed(model, opt, itertools.repeat((x, y, p)), cfg, steps, 3, accel)


class _Decode:
    """Raw sample -> (noised image tensor, target), decoding as the stage does (a class: workers pickle it)."""

    def __init__(self, transform, target) -> None:
        self.transform, self.target = transform, target

    def __call__(self, sample: dict):
        return self.transform(decode_image(image_field(sample), 3)), self.target(sample)


def _label(sample: dict) -> int:
    return int(sample["cls"])


def _target(sample: dict) -> np.ndarray:
    return sample["target"]


class _Selected:
    """Keeps the selected samples of an unlabeled stream, each ``copies`` times, with its soft target attached."""

    def __init__(self, selection_files: list[str], classes: int) -> None:
        self.files, self.classes, self.table = selection_files, classes, None

    def _load(self) -> dict[str, tuple[int, np.ndarray]]:
        import pyarrow.parquet as pq

        table = {}
        for f in self.files:
            t = pq.read_table(f, columns=["key", "copies", "probs"])
            probs = t.column("probs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            probs = probs.astype(np.float32).reshape(t.num_rows, self.classes)
            probs /= probs.sum(axis=1, keepdims=True)
            for key, copies, p in zip(t.column("key").to_pylist(), t.column("copies").to_pylist(), probs, strict=True):
                table[key] = (copies, p)
        return table

    def __call__(self, samples):
        self.table = self.table or self._load()  # in the worker, once
        for sample in samples:
            hit = self.table.get(sample["__key__"])
            if hit is not None:
                for _ in range(hit[0]):
                    yield {**sample, "target": hit[1]}


class Mixed(IterableDataset):
    """Endless batches ``(x, y, p)``: ``labeled_batch`` labeled rows first, then ``pseudo_batch`` pseudo-labeled."""

    def __init__(self, labeled, unlabeled, selection, classes, transform, labeled_batch, pseudo_batch) -> None:
        self.labeled, self.unlabeled, self.selection, self.classes = labeled, unlabeled, selection, classes
        self.transform, self.labeled_batch, self.pseudo_batch = transform, labeled_batch, pseudo_batch

    def __iter__(self):
        import webdataset as wds

        # resampled: an endless stream of shards; shuffle the compressed bytes, then decode and augment
        def stream(shards):
            return wds.WebDataset(shards, resampled=True, shardshuffle=False, empty_check=False)

        labeled = iter(stream(self.labeled).shuffle(2048).map(_Decode(self.transform, _label)))
        pseudo = None
        if self.pseudo_batch:
            selected = stream(self.unlabeled).compose(_Selected(self.selection, self.classes)).shuffle(2048)
            pseudo = iter(selected.map(_Decode(self.transform, _target)))
        while True:
            rows = [next(labeled) for _ in range(self.labeled_batch)]
            targets = torch.tensor([y for _, y in rows])
            if pseudo is not None:
                extra = [next(pseudo) for _ in range(self.pseudo_batch)]
                soft = torch.from_numpy(np.stack([p for _, p in extra]))
                rows += extra
            else:
                soft = torch.zeros(0, self.classes)
            yield torch.stack([x for x, _ in rows]), targets, soft


def hand_loop(spec, cfg: TrainConfig, data: dict, steps: int, warmup: int, accel: Accel) -> float:
    """The teacher loop (``data["unlabeled"]`` empty) or the student loop; images/s over ``steps`` steps."""
    from stages.models.transforms import noised_transform

    transform = noised_transform(data["size"], data["mean"], data["std"], spec.randaug_n, spec.randaug_m)
    pseudo_batch = cfg.pseudo_batch if data["unlabeled"] else 0
    ds = Mixed(
        data["labeled"], data["unlabeled"], data["selection"], data["classes"], transform, cfg.batch_size, pseudo_batch
    )
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.loader_workers,
        prefetch_factor=4 if cfg.loader_workers else None,
        multiprocessing_context="fork" if cfg.loader_workers else None,
        pin_memory=accel.cuda,
    )
    model = accel.model(create_model(spec, data["classes"], 3, noised=True).train())
    return _timed(model, build_optimizer(model, cfg), loader, cfg, steps, warmup, accel)
