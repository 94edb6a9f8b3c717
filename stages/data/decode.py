"""Decoding a shard's samples in batches for a model: threads of PIL (or nvJPEG on a GPU) ahead of the forward pass.

``raw_batches`` streams a shard's raw samples in batches; ``Decoder`` turns a batch into ``(keys, images,
labels)`` at the model's input (its card's transform), recording each unusable sample; ``prefetch`` runs the
decoding on a background thread while the model runs on a GPU. The labeling and evaluation workers
(``stages/pseudo_label.ShardLabeler``, ``stages/evaluate.ShardEvaluator``) read shards through these.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from stages.core.errors import BadSample
from stages.data.shards import decode_image, image_field, iter_raw_samples, optional_label
from stages.models.transforms import card_transform, tensor_transform

Prepare = Callable[[Image.Image, str], Image.Image]
JPEG_MAGIC = b"\xff\xd8"


def raw_batches(shard: str, batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in iter_raw_samples(shard):
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class Decoder:
    """Turns a batch of raw samples into ``(keys, images, labels)`` in stream order, the unusable ones appended to
    ``bad`` (shard, key, reason). ``threads`` PIL decodes run at once (PIL and torch release the GIL), so an actor
    holding N CPUs decodes on N of them. ``device`` cuda: JPEGs are decoded in one batched nvJPEG call
    (``torchvision.io.decode_jpeg``) and resized, cropped and normalised there (``tensor_transform``); a sample
    that is no JPEG or that nvJPEG refuses (CMYK, progressive corner cases, corrupt) goes the PIL way, which
    decodes it or records why not."""

    def __init__(self, card: dict, channels: int, threads: int, device: torch.device | None = None):
        self.transform, self.channels = card_transform(card), channels
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.device = device
        self.gpu_transform = tensor_transform(card) if device is not None else None

    def __call__(
        self, shard: str, samples: list[dict], bad: list[dict], prepare: Prepare | None = None
    ) -> tuple[list[str], torch.Tensor, list]:
        """``prepare(image, key)``: applied to each decoded PIL image before the transform (a corruption); such
        batches go the PIL way."""
        images: list[torch.Tensor | None] = [None] * len(samples)
        if self.device is not None and prepare is None:
            self._decode_on_gpu(samples, images)
        todo = [i for i, image in enumerate(images) if image is None]
        decode = functools.partial(self._decode_one, prepare=prepare)
        for i, result in zip(todo, self.pool.map(decode, (samples[i] for i in todo)), strict=True):
            if isinstance(result, BadSample):
                bad.append({"shard": shard, "key": samples[i]["__key__"], "reason": str(result)})
            else:
                images[i] = result if self.device is None else result.to(self.device, non_blocking=True)
        keep = [i for i, image in enumerate(images) if image is not None]
        stacked = torch.stack([images[i] for i in keep]) if keep else torch.zeros(0)
        return [samples[i]["__key__"] for i in keep], stacked, [optional_label(samples[i]) for i in keep]

    def _decode_one(self, sample: dict, prepare: Prepare | None = None) -> torch.Tensor | BadSample:
        try:
            image = decode_image(image_field(sample), self.channels)
        except BadSample as exc:
            return exc
        return self.transform(image if prepare is None else prepare(image, sample["__key__"]))

    def _decode_on_gpu(self, samples: list[dict], images: list) -> None:
        jpegs = [i for i, s in enumerate(samples) if _jpeg_bytes(s)]
        if not jpegs:
            return
        data = [torch.frombuffer(bytearray(_jpeg_bytes(samples[i])), dtype=torch.uint8) for i in jpegs]
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        try:
            decoded = decode_jpeg(data, mode=mode, device=self.device)
        except RuntimeError:  # one bad image fails the whole call: find it one by one
            decoded = [self._decode_jpeg_or_none(x, mode) for x in data]
        for i, image in zip(jpegs, decoded, strict=True):
            if image is not None:
                images[i] = self.gpu_transform(image)

    def _decode_jpeg_or_none(self, data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=mode, device=self.device)
        except RuntimeError:
            return None


def _jpeg_bytes(sample: dict) -> bytes:
    """The sample's image (the field ``image_field`` picks) when it is a JPEG, else empty."""
    try:
        data = image_field(sample)
    except BadSample:
        return b""
    return data if data[:2] == JPEG_MAGIC else b""


def prefetch(iterator: Iterator, depth: int = 3) -> Iterator:
    """Run ``iterator`` on a background thread while the model runs (PIL and torch both release the GIL)."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def work() -> None:
        try:
            for item in iterator:
                q.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
