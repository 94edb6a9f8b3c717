"""Training input: endless, shuffled streams of labeled and pseudo-labeled samples, mixed per batch.

Each batch holds ``labeled_batch`` labeled samples and ``pseudo_batch`` pseudo-labeled ones (the
unlabeled:labeled ratio). Streams repeat forever; the trainer takes a fixed number of steps per epoch, so every
rank runs the same number of optimizer steps whatever its share of the data (no DDP stragglers).

Data is split between *slots* (rank x DataLoader worker): by shard when there are at least as many shards as
slots, otherwise by sample index within each shard, so every slot sees a disjoint part of the data.
Labeled samples whose key is in ``exclude_keys`` (a validation split carved from the labeled shards,
``stages/maths/validation.py``) are never yielded.

Pseudo-labeled samples come from the select stage's compact training shards (``stages/data/compact.py``): each
``PseudoSource`` is a tar holding exactly the selected samples, every copy materialised (class balancing
duplicates scarce classes) and spread over the shard, in a seeded random order, beside the selection sidecar
holding their targets (member ``i`` is row ``copy_order(copies)[i]``). So every member read is trained on, each
copy augmented independently. Because the shards come shuffled, the pseudo stream needs only a small shuffle buffer
to mix the slot's shards: ``min(shuffle_buffer, pseudo_batch)`` (the labeled stream keeps ``shuffle_buffer``), and a
sample's copies stay a fraction of a shard apart, never back to back in a buffer. A slot whose share (a few samples
split by index) holds nothing falls back to reading every source: training goes on with ranks x workers above
the number of selected samples.

Byte counts. Every batch carries ``"bytes"``: int64 ``[labeled read, labeled trained, pseudo read, pseudo trained]``
(``BYTE_COUNTS``), this slot's counts since its previous batch. *Read* is the tar payload pulled out of the shards
(labeled shards, and for pseudo the compact training shards): the bytes of every file of every sample the shard
iterator produced (image and ``.cls`` alike; not the tar's 512-byte headers and padding, nor the selection
sidecars), including the samples skipped as another slot's or as excluded. *Trained* is the same payload size for
each sample that went into this batch, once per copy (a compact shard holds each copy as a member, so a copy read
is a copy trained). They are deltas carried by the batches rather than counters kept on the dataset because
each DataLoader worker iterates its own copy of the dataset in its own process: summing the deltas of the batches
the trainer consumed is the total over every worker, with nothing shared. Reads run ahead of training (the
shuffle buffer fills first; prefetched batches wait in the DataLoader), so a delta is charged to the batch during
whose making the bytes were read, and bytes read for batches never consumed are not counted. Counting costs a
``len`` per file: no extra reads. With a pseudo buffer of ``B`` samples the first batch of each slot reads ``B``
samples more than it trains on, so an epoch of ``S`` pseudo samples trained over ``W`` slots reads at most
``1 + W * B / S`` times what it trains on (when each slot has its own shards; a shard split by index between
slots is read whole by each of them).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.core.errors import BadSample, DataError
from stages.data.shards import decode_image, image_field, iter_raw_samples, parse_label
from stages.maths.selection import copy_keys
from stages.storage.files import read_table

log = logging.getLogger(__name__)
BYTE_COUNTS = ("labeled_read_bytes", "labeled_trained_bytes", "pseudo_read_bytes", "pseudo_trained_bytes")


def payload_bytes(sample: dict) -> int:
    """The bytes of a raw sample's files as pulled out of its tar (``__key__``/``__url__`` are not files)."""
    return sum(len(v) for k, v in sample.items() if not k.startswith("__"))


@dataclass
class _ReadBytes:
    """Payload bytes one slot has pulled out of its shards since its last batch (reset as each batch is made)."""

    labeled: int = 0
    pseudo: int = 0


@dataclass(frozen=True)
class PseudoSource:
    """A compact training shard (``stages/data/compact.py``) and the selection sidecar holding its samples' targets."""

    shard: str
    selection: str


def soft_targets(table, num_classes: int) -> np.ndarray:
    """Dense float32 targets from a selection table: full ``probs``, renormalised ``topk_*``, or one-hot ``label``.

    List columns (``list`` or ``fixed_size_list``, in any number of chunks) are flattened by Arrow into one NumPy
    array and reshaped: no Python object per value."""
    n = table.num_rows
    if n == 0:
        return np.zeros((0, num_classes), dtype=np.float32)
    if "probs" in table.column_names:
        dense = _list_matrix(table.column("probs"), n, np.float32)
    elif "topk_idx" in table.column_names:
        idx = _list_matrix(table.column("topk_idx"), n, np.int64)
        val = _list_matrix(table.column("topk_prob"), n, np.float32)
        dense = np.zeros((n, num_classes), dtype=np.float32)
        np.put_along_axis(dense, idx, val, axis=1)
    else:
        dense = np.zeros((n, num_classes), dtype=np.float32)
        dense[np.arange(n), table.column("label").to_numpy()] = 1.0
    if dense.shape != (n, num_classes):
        raise ValueError(f"selection targets are {dense.shape[1]} wide, expected {num_classes} classes")
    return dense / np.clip(dense.sum(axis=1, keepdims=True), 1e-12, None)


def _list_matrix(column: pa.ChunkedArray | pa.Array, rows: int, dtype) -> np.ndarray:
    """An equal-length list column as a ``rows x width`` array."""
    flat = pc.list_flatten(column)
    values = flat.to_numpy() if isinstance(flat, pa.ChunkedArray) else flat.to_numpy(zero_copy_only=False)
    return values.astype(dtype, copy=False).reshape(rows, -1)


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Streaming shuffle with a bounded buffer."""
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool


def batch_loader(stream: IterableDataset, workers: int) -> DataLoader:
    """A ``DataLoader`` over a stream that yields ready batches: ``workers`` forked processes (0 = this one), each
    4 batches ahead; page-locked batches on a GPU machine, so the copy to the GPU overlaps the step."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
        pin_memory=torch.cuda.is_available(),
    )


def _slot(rank: int, world_size: int) -> tuple[int, int]:
    """``(slot, slots)`` of the calling DataLoader worker (or the process itself) of training worker ``rank``."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    return rank * workers + worker, world_size * workers


def _slot_parts(shards: Sequence, slot: int, slots: int) -> tuple[list, Callable[[int], bool]]:
    if len(shards) >= slots:
        return list(shards[slot::slots]), lambda i: True
    return list(shards), lambda i: i % slots == slot


class MixedStream(IterableDataset):
    """Yields ready batches ``{"x": float [B,C,H,W], "y": int64 [B_l], "p": float [B_u, classes]}``.

    The first ``B_l`` rows of ``x`` are labeled (targets ``y``), the rest pseudo-labeled (soft targets ``p``);
    ``"bytes"`` holds the byte counts of the module docstring (``BYTE_COUNTS``).
    With ``clean_transform`` set, batches also hold ``"x_clean"``: the same images through that transform, row for
    row (the online teacher's un-noised view of what the student sees noised).
    """

    def __init__(
        self,
        labeled: Sequence[str],
        pseudo: Sequence[PseudoSource],
        labeled_batch: int,
        pseudo_batch: int,
        num_classes: int,
        channels: int,
        transform: Callable,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 2048,
        clean_transform: Callable | None = None,
        exclude_keys: Collection[str] = (),
    ):
        self.labeled, self.pseudo = list(labeled), list(pseudo)
        self.exclude_keys = frozenset(exclude_keys)
        self.clean_transform = clean_transform
        self.labeled_batch, self.pseudo_batch = labeled_batch, pseudo_batch if pseudo else 0
        self.num_classes, self.channels, self.transform = num_classes, channels, transform
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer

    def _slot(self) -> tuple[int, int]:
        return _slot(self.rank, self.world_size)

    def _labeled_samples(
        self, slot: int, slots: int, rng: random.Random, read: _ReadBytes
    ) -> Iterator[tuple[bytes, int, int]]:
        """``(image bytes, label, payload size)``, endlessly; every sample pulled is added to ``read.labeled``."""
        shards, keep = _slot_parts(self.labeled, slot, slots)
        for _ in itertools.count():
            found = 0
            for shard in rng.sample(shards, len(shards)):
                for i, sample in enumerate(iter_raw_samples(shard)):
                    size = payload_bytes(sample)
                    read.labeled += size
                    if not keep(i) or sample["__key__"] in self.exclude_keys:
                        continue
                    try:
                        item = image_field(sample), parse_label(sample, self.num_classes), size
                    except BadSample:
                        continue  # counted and reported by the pre-flight scan of the labeled set
                    found += 1
                    yield item
            if not found:
                raise DataError(f"training slot {slot}/{slots} got no labeled samples from {len(shards)} shard(s)")

    def _pseudo_samples(
        self, slot: int, slots: int, rng: random.Random, read: _ReadBytes
    ) -> Iterator[tuple[bytes, np.ndarray, int]]:
        """``(image bytes, soft target, payload size)`` per copy, endlessly; every member pulled out of a compact
        shard is added to ``read.pseudo``. A slot whose share yields nothing in a whole pass reads every source."""
        sources, keep = _slot_parts(self.pseudo, slot, slots)
        everything = slots == 1
        for _ in itertools.count():
            found = 0
            for item in self._pseudo_pass(rng.sample(sources, len(sources)), keep, read):
                found += 1
                yield item
            if found:
                continue
            if everything:
                raise DataError(f"no pseudo-labeled sample in {len(self.pseudo)} selection(s): nothing was selected")
            log.warning(
                "training slot %d/%d: its share of the %d compact shard(s) holds no sample; reading them all",
                slot,
                slots,
                len(self.pseudo),
            )
            sources, keep, everything = list(self.pseudo), lambda i: True, True

    def _pseudo_pass(
        self, sources: Sequence[PseudoSource], keep: Callable[[int], bool], read: _ReadBytes
    ) -> Iterator[tuple[bytes, np.ndarray, int]]:
        """One pass over ``sources``: each compact shard zipped with its selection, member ``i`` = row ``order[i]``."""
        for source in sources:
            table = read_table(source.selection)  # a local file or a URL
            if table.num_rows == 0:
                continue  # nothing selected: no compact shard either
            targets = soft_targets(table, self.num_classes)
            order, members = copy_keys(table.column("key").to_numpy(zero_copy_only=False), table["copies"].to_numpy())
            count = 0
            for i, sample in enumerate(iter_raw_samples(source.shard)):
                if i >= len(members) or sample["__key__"] != members[i]:
                    got = sample["__key__"]
                    want = members[i] if i < len(members) else "the end of the shard"
                    raise DataError(
                        f"compact shard {source.shard} does not match its selection {source.selection}: member {i} is "
                        f"{got!r}, expected {want!r}; run the select stage again"
                    )
                count += 1
                size = payload_bytes(sample)
                read.pseudo += size
                if not keep(i):
                    continue
                try:
                    data = image_field(sample)
                except BadSample:
                    continue  # cannot happen to a selected sample (the teacher labeled it), but never fatal
                yield data, targets[order[i]], size
            if count != len(members):
                raise DataError(
                    f"compact shard {source.shard} does not match its selection {source.selection}: {count} "
                    f"member(s), expected {len(members)}; run the select stage again"
                )

    def _decoded(self, items: Iterator[tuple[bytes, object, int]]) -> Iterator[tuple[object, object, int]]:
        for data, target, size in items:
            try:
                image = decode_image(data, self.channels)
                if self.clean_transform is None:
                    yield self.transform(image), target, size
                else:  # the clean view first: it is deterministic, the noised one draws RandAugment's randomness
                    clean = self.clean_transform(image)
                    yield (self.transform(image), clean), target, size
            except BadSample:
                continue  # undecodable: already counted by the pre-flight scan or the pseudo-label stage

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._slot()
        rng = random.Random(f"{self.seed}-{slot}")
        read = _ReadBytes()
        # Shuffle compressed bytes (small), then decode and augment: each duplicate copy gets its own noise.
        labeled = self._decoded(shuffled(self._labeled_samples(slot, slots, rng, read), self.shuffle_buffer, rng))
        pseudo = None
        if self.pseudo_batch:
            # The compact shards come shuffled: a buffer of one batch mixes the slot's shards (module docstring).
            buffer = min(self.shuffle_buffer, self.pseudo_batch)
            pseudo = self._decoded(shuffled(self._pseudo_samples(slot, slots, rng, read), buffer, rng))
        while True:
            lab = [next(labeled) for _ in range(self.labeled_batch)]
            xs = [x for x, _, _ in lab]
            batch = {"y": torch.tensor([y for _, y, _ in lab], dtype=torch.int64)}
            pseudo_trained = 0
            if pseudo is not None:
                pse = [next(pseudo) for _ in range(self.pseudo_batch)]
                xs += [x for x, _, _ in pse]
                batch["p"] = torch.from_numpy(np.stack([p for _, p, _ in pse]))
                pseudo_trained = sum(size for _, _, size in pse)
            else:
                batch["p"] = torch.zeros(0, self.num_classes)
            if self.clean_transform is None:
                batch["x"] = torch.stack(xs)
            else:
                batch["x"] = torch.stack([x for x, _ in xs])
                batch["x_clean"] = torch.stack([c for _, c in xs])
            counts = [read.labeled, sum(size for _, _, size in lab), read.pseudo, pseudo_trained]
            batch["bytes"] = torch.tensor(counts, dtype=torch.int64)  # BYTE_COUNTS, since this slot's last batch
            read.labeled = read.pseudo = 0
            yield batch


class ImageStream(IterableDataset):
    """Endless shuffled batches of images, ``float [B, C, H, W]`` through ``transform`` (``unit_transform``: [0, 1],
    not normalised), from labeled and unlabeled shards alike with their labels ignored: the input of self-supervised
    pretraining (``stages/pretrain.py``). Labeled samples whose key is in ``exclude_keys`` (a carved validation
    split) are never yielded; shards are split between slots (rank x DataLoader worker) as ``MixedStream``'s are."""

    def __init__(
        self,
        labeled: Sequence[str],
        unlabeled: Sequence[str],
        batch_size: int,
        channels: int,
        transform: Callable,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 2048,
        exclude_keys: Collection[str] = (),
    ):
        self.shards = [*labeled, *unlabeled]
        self.labeled, self.exclude_keys = frozenset(labeled), frozenset(exclude_keys)
        self.batch_size, self.channels, self.transform = batch_size, channels, transform
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer

    def _images(self, slot: int, slots: int, rng: random.Random) -> Iterator[bytes]:
        shards, keep = _slot_parts(self.shards, slot, slots)
        for _ in itertools.count():
            found = 0
            for shard in rng.sample(shards, len(shards)):
                skip = self.exclude_keys if shard in self.labeled else frozenset()
                for i, sample in enumerate(iter_raw_samples(shard)):
                    if not keep(i) or sample["__key__"] in skip:
                        continue
                    try:
                        data = image_field(sample)
                    except BadSample:
                        continue  # counted by the pre-flight scan and the data check
                    found += 1
                    yield data
            if not found:
                raise DataError(f"pretraining slot {slot}/{slots} got no image from {len(shards)} shard(s)")

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot, slots = _slot(self.rank, self.world_size)
        rng = random.Random(f"{self.seed}-{slot}")
        images = (
            self.transform(image)
            for image in _decodable(shuffled(self._images(slot, slots, rng), self.shuffle_buffer, rng), self.channels)
        )
        while True:
            yield torch.stack([next(images) for _ in range(self.batch_size)])


def _decodable(items: Iterator[bytes], channels: int) -> Iterator:
    for data in items:
        try:
            yield decode_image(data, channels)
        except BadSample:
            continue
