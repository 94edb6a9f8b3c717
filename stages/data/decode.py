"""Decoding a shard's samples in batches for a model: threads of PIL (or nvJPEG on a GPU) ahead of the forward pass.

``raw_batches`` streams a shard's raw samples in batches; ``Decoder`` turns a batch into ``(keys, images,
labels)`` at the model's input (its card's transform), recording each unusable sample; ``prefetch`` runs the
decoding on a background thread while the model runs on a GPU. The labeling and evaluation workers
(``stages/pseudo_label.ShardLabeler``, ``stages/evaluate.ShardEvaluator``) read shards through these.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from stages.core.errors import BadSample
from stages.data.decoders import decode_to, installed, plain_jpeg, resolve, short_side_for
from stages.data.shards import decode_image, image_field, iter_raw_samples, optional_label
from stages.models.transforms import card_transform, tensor_transform

log = logging.getLogger(__name__)

Prepare = Callable[[Image.Image, str], Image.Image]
JPEG_MAGIC = b"\xff\xd8"


def batch_torchcodec(data: list[bytes], channels: int, device: torch.device) -> list[torch.Tensor]:
    """TorchCodec's batched JPEG decode (one nvJPEG call on a GPU), CHW uint8 on ``device``."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(list(data), mode="GRAY" if channels == 1 else "RGB", device=device)


def batch_torchvision(data: list[bytes], channels: int, device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decode (nvJPEG on a GPU; deprecated since torchvision 0.29 for TorchCodec's)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], mode=mode, device=device)


# The GPU path's batched JPEG decoders, in order of preference: TorchCodec's is the maintained one.
GPU_DECODERS: dict[str, Callable[[list[bytes], int, torch.device], list[torch.Tensor]]] = {
    "torchcodec": batch_torchcodec,
    "torchvision": batch_torchvision,
}


def gpu_decoder(modules: Callable[[str], bool] = installed) -> str:
    """The first of ``GPU_DECODERS`` whose library imports (torchvision is a dependency: always the last resort)."""
    return next((name for name in GPU_DECODERS if modules(name)), "torchvision")


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
    ``bad`` (shard, key, reason). ``threads`` decodes run at once (the decoders release the GIL), so an actor
    holding N CPUs decodes on N of them. On the CPU each image goes through ``backend`` (``stages/data/decoders.py``:
    bytes to a model-sized uint8 array, the card's resize and crop; ``bench/decode.py`` measures them), then is
    normalised; ``backend`` is what is recorded (after ``resolve``: a missing library falls back). ``device`` cuda:
    plain JPEGs (YCbCr or grayscale, whole, no EXIF rotation: ``decoders.plain_jpeg``) are decoded in one batched
    nvJPEG call (``gpu_backend``: TorchCodec's where it imports, else torchvision's; a TorchCodec that cannot decode
    on this device hands over to torchvision's for the rest of the run, with one warning) and resized, cropped and
    normalised there (``tensor_transform``); any other sample, and one that nvJPEG refuses (progressive corner
    cases, corrupt), goes the CPU way, which decodes it or records why not."""

    def __init__(
        self, card: dict, channels: int, threads: int, device: torch.device | None = None, backend: str = "pil"
    ):
        self.transform, self.channels = card_transform(card), channels
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.device = device
        self.gpu_transform = tensor_transform(card) if device is not None else None
        self.gpu_backend = gpu_decoder() if device is not None else ""
        self.backend = resolve(backend)
        size = card["input_size"][-1]
        natural = card.get("augment") == "natural"
        self.geometry = (size, short_side_for(size, card["crop_pct"]) if natural else None, card["interpolation"])
        self.mean = torch.tensor(card["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(card["std"], dtype=torch.float32).view(-1, 1, 1)

    @property
    def name(self) -> str:
        """What decoded, for the records: the CPU backend, or on a GPU its batched decoder (``torchcodec-gpu``)
        beside it for what that one does not take."""
        return f"{self.gpu_backend}-gpu+{self.backend}" if self.device is not None else self.backend

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

    def pixels(self, shard: str, samples: list[dict], bad: list[dict]) -> tuple[list[str], np.ndarray, list]:
        """``(keys, images, labels)`` with ``images`` the model-sized uint8 pixels (NHWC, before normalising: a
        quarter of the float tensor's bytes, what a decode task hands to a label actor), decoded on the CPU through
        ``backend``; unusable samples appended to ``bad``."""
        size = self.geometry[0]
        decoded = list(self.pool.map(self._pixels_one, samples))
        for sample, result in zip(samples, decoded, strict=True):
            if isinstance(result, BadSample):
                bad.append({"shard": shard, "key": sample["__key__"], "reason": str(result)})
        keep = [i for i, result in enumerate(decoded) if not isinstance(result, BadSample)]
        images = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, size, size, self.channels), np.uint8)
        return [samples[i]["__key__"] for i in keep], images, [optional_label(samples[i]) for i in keep]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model-sized uint8 pixels (NHWC, any device) as the model's float input (NCHW), as the CPU way makes it."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.permute(0, 3, 1, 2).float().div_(255) - mean) / std

    def _pixels_one(self, sample: dict) -> np.ndarray | BadSample:
        try:
            size, short_side, interpolation = self.geometry
            return decode_to(image_field(sample), size, self.channels, short_side, interpolation, self.backend)
        except BadSample as exc:
            return exc

    def _decode_one(self, sample: dict, prepare: Prepare | None = None) -> torch.Tensor | BadSample:
        if prepare is None:
            pixels = self._pixels_one(sample)
            if isinstance(pixels, BadSample):
                return pixels
            return self.normalize(torch.from_numpy(pixels)[None])[0]
        try:
            image = decode_image(image_field(sample), self.channels)
        except BadSample as exc:
            return exc
        return self.transform(prepare(image, sample["__key__"]))

    def _decode_on_gpu(self, samples: list[dict], images: list) -> None:
        jpegs = [(i, data) for i, data in ((i, _jpeg_bytes(s)) for i, s in enumerate(samples)) if data]
        if not jpegs:
            return
        data = [d for _, d in jpegs]
        try:
            decoded = self._decode_batch(data)
        except RuntimeError as exc:  # one bad image fails the whole call: find it one by one
            decoded = [self._decode_jpeg_or_none(x) for x in data]
            if len(data) > 1 and not any(d is not None for d in decoded) and self._hand_over(exc):
                return self._decode_on_gpu(samples, images)  # a decoder that takes no image at all is not working
        for (i, _), image in zip(jpegs, decoded, strict=True):
            if image is not None:
                images[i] = self.gpu_transform(image)

    def _decode_batch(self, data: list[bytes]) -> list[torch.Tensor]:
        try:
            return GPU_DECODERS[self.gpu_backend](data, self.channels, self.device)
        except RuntimeError:
            raise
        except Exception as exc:  # e.g. a TorchCodec built without this device's decoder
            if not self._hand_over(exc):
                raise
            return self._decode_batch(data)

    def _hand_over(self, exc: BaseException) -> bool:
        """Switch to torchvision's batched decoder for the rest of the run (one warning); False when it is already
        the one that failed."""
        if self.gpu_backend == "torchvision":
            return False
        log.warning("GPU JPEG decoding with %s failed (%s); using torchvision's", self.gpu_backend, exc)
        self.gpu_backend = "torchvision"
        return True

    def _decode_jpeg_or_none(self, data: bytes) -> torch.Tensor | None:
        try:
            return self._decode_batch([data])[0]
        except RuntimeError:
            return None


def _jpeg_bytes(sample: dict) -> bytes:
    """The sample's image (the field ``image_field`` picks) when it is a plain JPEG (``decoders.plain_jpeg``: one
    nvJPEG decodes as ``decode_image`` does), else empty."""
    try:
        data = image_field(sample)
    except BadSample:
        return b""
    return data if data[:2] == JPEG_MAGIC and plain_jpeg(data) else b""


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
