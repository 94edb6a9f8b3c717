"""Pseudo-labeling: the un-noised teacher labels every unlabeled sample of a shard, one sidecar per shard.

A sidecar is ``<out_dir>/<shard_id>.parquet`` with columns ``key``, ``shard``, ``label`` (argmax, int32),
``confidence`` (max probability, float32), ``true_label`` (int32, ``.cls`` when the shard has it, else -1; a
diagnostic only, never used for training) and the soft label: ``probs`` (float16, all classes) when
``topk == 0``, else ``topk_idx`` (int32) + ``topk_prob`` (float16). Probabilities are
``softmax(logits / temperature)``. Sidecars are written to a temporary name and renamed; the schema metadata
records the row count and the skipped samples, so a resume trusts a sidecar only when it opens and its count matches.

The work unit is a whole shard, which makes the stage exactly-once under retries: a retried shard rewrites
the same complete file. ``ShardLabeler`` is the per-actor callable (model loaded once); Ray lives in
``pipeline/distributed/pseudo_label.py``.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydantic import Field, StrictFloat, StrictInt
from torchvision.io import ImageReadMode, decode_jpeg

from stages.core.config import config
from stages.data.shards import (
    BadSample,
    DataError,
    decode_image,
    image_field,
    iter_raw_samples,
    optional_label,
    shard_id,
)
from stages.models.device import autocast, place_batch, place_model
from stages.models.factory import load_model
from stages.models.transforms import card_transform, tensor_transform
from stages.storage.files import Location, StorageError, atomic_target, join, open_read

SIDECAR_FORMAT = "pseudo_labels/v1"
Prepare = Callable[[Image.Image, str], Image.Image]
JPEG_MAGIC = b"\xff\xd8"


@config
class PseudoLabelConfig:
    """``topk: 0`` stores full probabilities; ``max_bad_fraction`` of undecodable samples fails the stage."""

    temperature: Annotated[StrictFloat, Field(gt=0)] = 1.0
    topk: Annotated[StrictInt, Field(ge=0, description="0 = full probabilities")] = 0
    batch_size: Annotated[StrictInt, Field(gt=0)] = 256
    max_bad_fraction: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.01


def soft_labels(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def sidecar_path(out_dir: Location, shard: str) -> Location:
    """``<out_dir>/<shard_id>.parquet``: a ``Path`` under a local folder, a URL under a URL."""
    return join(out_dir, f"{shard_id(shard)}.parquet")


def read_footer(path: Location, fmt: str) -> tuple[list[str], dict[bytes, bytes]] | None:
    """Column names and footer metadata of a complete Parquet sidecar in format ``fmt``, or None when it is
    missing, half-written, of another format, or holds a different number of rows than its footer records.
    Only the footer is read (a few ranged reads on an object store)."""
    try:
        with open_read(path) as f:
            parquet = pq.ParquetFile(f)
            meta, schema = parquet.metadata, parquet.schema_arrow
    except (OSError, pa.ArrowInvalid):
        return None
    kv = schema.metadata or {}
    if kv.get(b"format") != fmt.encode() or int(kv.get(b"rows", b"-1")) != meta.num_rows:
        return None
    return schema.names, kv


def sidecar_info(path: Location, topk: int) -> dict | None:
    """``{"rows", "bad"}`` of a complete, valid sidecar, or None (missing, half-written, other schema)."""
    footer = read_footer(path, SIDECAR_FORMAT)
    if footer is None:
        return None
    names, kv = footer
    needed = {"key", "shard", "label", "confidence"} | ({"topk_idx", "topk_prob"} if topk else {"probs"})
    if not needed <= set(names):
        return None
    return {
        "rows": int(kv[b"rows"]),
        "bad": json.loads(kv.get(b"bad", b"[]")),
        "with_truth": int(kv.get(b"with_truth", b"0")),
        "correct": int(kv.get(b"correct", b"0")),
    }


def build_table(
    shard: str, keys: list[str], probs: torch.Tensor, true_labels: list[int], topk: int, bad: list[dict]
) -> pa.Table:
    """The sidecar table; its footer records the row count and the samples skipped as unusable."""
    confidence, label = probs.max(dim=-1)
    columns = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array([shard] * len(keys), pa.string()),
        "label": pa.array(label.numpy().astype(np.int32)),
        "confidence": pa.array(confidence.numpy().astype(np.float32)),
        "true_label": pa.array(np.asarray(true_labels, dtype=np.int32)),
    }
    if topk:
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=-1)
        columns["topk_idx"] = _list_column(indices.numpy().astype(np.int32), pa.int32())
        columns["topk_prob"] = _list_column(values.numpy().astype(np.float16), pa.float16())
    else:
        columns["probs"] = _list_column(probs.numpy().astype(np.float16), pa.float16())
    table = pa.table(columns)
    truth = np.asarray(true_labels, dtype=np.int64)
    correct = int((label.numpy()[truth >= 0] == truth[truth >= 0]).sum())
    return table.replace_schema_metadata(
        {
            "format": SIDECAR_FORMAT,
            "rows": str(len(keys)),
            "bad": json.dumps(bad),
            "with_truth": str(int((truth >= 0).sum())),
            "correct": str(correct),
        }
    )


def _list_column(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    flat = pa.array(matrix.reshape(-1), dtype)
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(dtype))


def write_sidecar(table: pa.Table, path: Location) -> None:
    """Write atomically (``stages.storage.files.atomic_target``); a failed write is a ``StorageError`` naming
    ``path``."""
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp)


def _raw_batches(shard: str, batch_size: int) -> Iterator[list[dict]]:
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


def _prefetch(iterator: Iterator, depth: int = 3) -> Iterator:
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


class ShardLabeler:
    """Labels whole shards with a teacher loaded once. ``__call__`` takes ``{"shard": [...]}`` (Ray Data batch)."""

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        cfg: PseudoLabelConfig,
        channels: int,
        threads: int = 0,
        decode: str = "cpu",
        decode_threads: int = 0,
    ):
        """``threads``: torch threads (0 = torch's default); ``decode_threads``: PIL decodes at once (0 =
        ``threads``, else 1); ``decode``: ``gpu`` decodes JPEGs with nvJPEG where the actor has a GPU."""
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, card = load_model(model_dir, self.device)  # eval(): no dropout, no stochastic depth
        self.model = place_model(model, self.device)
        on_gpu = decode == "gpu" and self.device.type == "cuda"
        self.decode = "gpu" if on_gpu else "cpu"  # recorded per shard: a GPU decode asked for on a CPU actor is not
        self.decoder = Decoder(card, channels, decode_threads or threads or 1, self.device if on_gpu else None)
        self.out_dir, self.cfg, self.channels = join(out_dir), cfg, channels  # a folder or a URL, from any node

    def label_shard(self, shard: str) -> dict:
        """Label one shard and write its sidecar (``write_labels``)."""
        result = {"shard": shard, "device": self.device.type, "decode": self.decode}
        return self.write_labels(shard, sidecar_path(self.out_dir, shard), self.cfg.topk, result)

    def write_labels(
        self,
        shard: str,
        path: Location,
        topk: int,
        result: dict,
        only: frozenset[str] | None = None,
        prepare: Prepare | None = None,
        meta: dict[bytes, bytes] | None = None,
    ) -> dict:
        """``predict`` a shard and write its sidecar to ``path`` (``meta`` added to its footer); returns ``result``
        with ``rows``, ``bad``, ``seconds``, ``error`` and ``storage_error``. An unreadable shard comes back as
        ``error``, a sidecar that cannot be written (disk full, read-only) as ``storage_error``: both are one line
        for the driver to raise, since an exception would reach it only as a Ray Data traceback."""
        start, bad = time.perf_counter(), []
        result = result | {"rows": 0, "bad": bad, "error": "", "storage_error": ""}
        try:
            keys, probs, truth = self.predict(shard, bad, only, prepare)
        except DataError as exc:
            return result | {"error": str(exc), "seconds": time.perf_counter() - start}
        table = build_table(shard, keys, probs, truth, topk, bad)
        if meta:
            table = table.replace_schema_metadata(dict(table.schema.metadata) | meta)
        try:
            write_sidecar(table, path)
        except StorageError as exc:
            return result | {"storage_error": str(exc), "seconds": time.perf_counter() - start}
        return result | {"rows": len(keys), "seconds": time.perf_counter() - start}

    def predict(
        self, shard: str, bad: list[dict], only: frozenset[str] | None = None, prepare: Prepare | None = None
    ) -> tuple[list[str], torch.Tensor, list[int]]:
        """``(keys, probabilities, .cls or -1)`` of the usable samples of ``shard`` (those keyed in ``only``, when
        given), each image through ``prepare`` when given; unusable samples are appended to ``bad``."""
        keys: list[str] = []
        probs: list[torch.Tensor] = []
        truth: list[int] = []
        raws = _raw_batches(shard, self.cfg.batch_size)
        if only is not None:
            raws = ([s for s in raw if s["__key__"] in only] for raw in raws)
        batches = (self.decoder(shard, raw, bad, prepare) for raw in raws if raw)
        # Overlap decoding with inference only when a GPU runs the model: on CPU the decode threads and torch's
        # intra-op threads would fight over the same cores, so there the two take turns, each on all of them.
        for k, x, y in _prefetch(batches) if self.device.type == "cuda" else batches:
            if k:
                probs.append(self._infer(x))
            keys += k
            truth += y
        num_classes = probs[0].shape[1] if probs else self.model.num_classes
        return keys, torch.cat(probs) if probs else torch.zeros(0, num_classes), truth

    @torch.inference_mode()
    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            logits = self.model(place_batch(x, self.device))
        return soft_labels(logits, self.cfg.temperature).cpu()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.label_shard(str(s)) for s in batch["shard"]]
        return {
            "shard": np.array([r["shard"] for r in results], dtype=object),
            "rows": np.array([r["rows"] for r in results], dtype=np.int64),
            "bad": np.array([json.dumps(r["bad"]) for r in results], dtype=object),
            "error": np.array([r["error"] for r in results], dtype=object),
            "storage_error": np.array([r["storage_error"] for r in results], dtype=object),
            "seconds": np.array([r["seconds"] for r in results], dtype=np.float64),
            "device": np.array([r["device"] for r in results], dtype=object),
            "decode": np.array([r["decode"] for r in results], dtype=object),
        }
