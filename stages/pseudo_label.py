"""The pseudo-label stage: the un-noised teacher labels every unlabeled sample, one sidecar per shard.

A sidecar is ``round-NNN/pseudo_labels/<shard_id>.parquet`` with columns ``key``, ``shard``, ``label`` (argmax,
int32), ``confidence`` (the teacher's own top probability, ``softmax(logits)``, float32: what selection's floor and
per-class ranking read, so ``select.floor`` means the same at any temperature, as in the paper), ``true_label``
(int32, ``.cls`` when the shard has it, else -1; a diagnostic only, never used for training) and the soft label the
student learns from, ``softmax(logits / temperature)``: ``probs`` (float16, all classes) when ``topk == 0``, else
``topk_idx`` (int32) + ``topk_prob`` (float16).

Each sidecar's footer (``stages.storage.artifacts``) records what made it: the teacher's sha256, the labeling
settings and the shard's identity (``made_by``), plus a digest of its rows. The stage reuses a sidecar it finds only
when that footer names this teacher and these settings and its rows still hash to the digest: a round re-run after
its teacher changed labels everything again, and a sidecar damaged in place (even at the same size) is redone.

The work unit is a whole shard, which makes the stage exactly-once under retries: a retried shard rewrites the same
complete file. ``ShardLabeler`` is the pool worker (model loaded once, decode threads or nvJPEG ahead of it); the
executor (``stages.core.stage``) runs it in this process or as a Ray Data actor pool, one actor per GPU on a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import time
import traceback
from collections.abc import Iterator
from typing import Annotated, ClassVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, StrictFloat, StrictInt
from tqdm import tqdm

from stages.core.config import config
from stages.core.errors import DataError
from stages.core.stage import LabelResources, StageContext, StageOutput
from stages.data.decode import Decoder, Prepare, prefetch, raw_batches
from stages.models.device import autocast, place_batch, place_model
from stages.models.factory import ModelFiles, load_model, model_sha
from stages.storage.artifacts import Footer, inputs_digest, read_footer, trusted_table, write_table
from stages.storage.files import Location, join, makedirs, read_text, stamp
from stages.storage.layout import sidecar_file

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "pseudo_labels/v3"  # v3: confidence is the teacher's own (T = 1), not the tempered one


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


def build_table(
    shard: str, keys: list[str], logits: torch.Tensor, true_labels: list[int], topk: int, temperature: float = 1.0
) -> pa.Table:
    """The sidecar's rows: keys; the teacher's own prediction (``label``) and confidence (``confidence``: its top
    probability, ``softmax(logits)``, whatever the temperature: what the floor and the per-class ranking read); the
    diagnostic true label; and the soft label, ``softmax(logits / temperature)`` (what the student is trained on)."""
    confidence, label = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    probs = soft_labels(logits, temperature)
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
    return pa.table(columns)


def truth_counts(table: pa.Table) -> dict[str, int]:
    """How many rows carry a true label (``.cls`` in an unlabeled shard: a diagnostic) and how many of them the
    predicted label matches; recorded in the footer, so the stage's accuracy needs no second read."""
    truth, label = table.column("true_label").to_numpy(), table.column("label").to_numpy()
    known = truth >= 0
    return {"with_truth": int(known.sum()), "correct": int((label[known] == truth[known]).sum())}


def _list_column(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    flat = pa.array(matrix.reshape(-1), dtype)
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(dtype))


class ShardLabeler:
    """A pool worker (``stages.core.stage.Worker``): labels whole shards with a teacher loaded once."""

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        cfg: PseudoLabelConfig,
        channels: int,
        threads: int = 0,
        decode: str = "cpu",
        decode_threads: int = 0,
        cpu_decoder: str = "auto",
    ):
        """``threads``: torch threads (0 = torch's default); ``decode_threads``: decodes at once (0 = ``threads``,
        else 1); ``decode``: ``gpu`` decodes JPEGs with nvJPEG where the actor has a GPU; ``cpu_decoder``: the
        ``stages/data/decoders.py`` backend of the CPU decode (``auto``: its ``DEFAULT``)."""
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, card = load_model(model_dir, self.device)  # eval(): no dropout, no stochastic depth
        self.model = place_model(model, self.device)
        on_gpu = decode == "gpu" and self.device.type == "cuda"
        self.decode = "gpu" if on_gpu else "cpu"  # recorded per shard: a GPU decode asked for on a CPU actor is not
        gpu = self.device if on_gpu else None
        self.decoder = Decoder(card, channels, decode_threads or threads or 1, gpu, cpu_decoder)
        self.out_dir, self.cfg, self.channels = join(out_dir), cfg, channels  # a folder or a URL, from any node

    def process(self, shard: str, made_by: str) -> dict:
        """Label one shard and write its sidecar (a ``DataError`` for an unreadable shard, a ``StorageError`` for a
        sidecar that cannot be written)."""
        path = join(self.out_dir, sidecar_file(shard))
        done = self.write_labels(shard, path, self.cfg.topk, format=SIDECAR_FORMAT, made_by=made_by)
        return done | {
            "shard": shard,
            "device": self.device.type,
            "decode": self.decode,
            "decoder": self.decoder.name,
        }

    def write_labels(
        self,
        shard: str,
        path: Location,
        topk: int,
        *,
        format: str,
        made_by: str,
        only: frozenset[str] | None = None,
        prepare: Prepare | None = None,
        **meta: str,
    ) -> dict:
        """``predict`` a shard and write its sidecar to ``path`` (its footer: format, ``made_by``, the unusable
        samples, the true-label counts, ``meta``); returns ``rows``, ``bad`` and ``seconds``."""
        start, bad = time.perf_counter(), []
        keys, logits, truth = self.predict(shard, bad, only, prepare)
        table = build_table(shard, keys, logits, truth, topk, self.cfg.temperature)
        write_table(table, path, format=format, made_by=made_by, bad=json.dumps(bad), **truth_counts(table), **meta)
        return {"rows": len(keys), "bad": bad, "seconds": time.perf_counter() - start}

    def predict(
        self, shard: str, bad: list[dict], only: frozenset[str] | None = None, prepare: Prepare | None = None
    ) -> tuple[list[str], torch.Tensor, list[int]]:
        """``(keys, logits, .cls or -1)`` of the usable samples of ``shard`` (those keyed in ``only``, when given),
        each image through ``prepare`` when given; unusable samples are appended to ``bad``."""
        keys: list[str] = []
        logits: list[torch.Tensor] = []
        truth: list[int] = []
        raws = raw_batches(shard, self.cfg.batch_size)
        if only is not None:
            raws = ([s for s in raw if s["__key__"] in only] for raw in raws)
        batches = (self.decoder(shard, raw, bad, prepare) for raw in raws if raw)
        # Overlap decoding with inference only when a GPU runs the model: on CPU the decode threads and torch's
        # intra-op threads would fight over the same cores, so there the two take turns, each on all of them.
        for k, x, y in prefetch(batches) if self.device.type == "cuda" else batches:
            if k:
                logits.append(self._infer(x))
            keys += k
            truth += y
        num_classes = logits[0].shape[1] if logits else self.model.num_classes
        return keys, torch.cat(logits) if logits else torch.zeros(0, num_classes), truth

    @torch.inference_mode()
    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits, float32 on the CPU (a sidecar is one shard's worth)."""
        with autocast(self.device):
            logits = self.model(place_batch(x, self.device))
        return logits.float().cpu()


# ---------------------------------------------------------------- decoding as its own part: tasks feed the actors
#
# With ``resources.label_decode: tasks`` a shard is decoded by ``decode_for_labels`` (on the Ray executor: a CPU
# task on any node) into model-sized uint8 batches, labeled by ``PixelLabeler`` actors (a GPU each on a cluster)
# and put back together per shard by ``ShardAssembler`` in the driver, which writes the sidecar once the shard's
# every image is in. Rows carry their shard and key, and each shard's stream ends with one marker row (``rows``:
# its count of usable images, ``bad``, ``decoder``, or the ``error`` that stopped it), so the assembly needs no
# order: a decode task or a label actor retried after its death may deliver rows twice, and each key counts once.

DECODE_PROCESS_BYTES = 640 << 20
IMAGE_ROW = -1  # ``rows`` of an image row; a shard's marker row holds its count of usable images there


def decode_for_labels(
    shard: str, card: dict, channels: int, backend: str, threads: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """One shard as batches of model-sized uint8 pixels (``key``, ``shard``, ``index``: the sample's place in the
    shard, ``image`` NHWC, ``truth``, ``rows``, ``bad``, ``decoder``, ``error``), then its marker row. It never
    raises: an unreadable shard is the marker's ``error`` (the pickled exception, re-raised by the driver as
    itself)."""
    decoder = Decoder(card, channels, threads, None, backend)
    size, bad, rows, seen = card["input_size"][-1], [], 0, 0
    try:
        for raw in raw_batches(shard, batch_size):
            place = {sample["__key__"]: seen + i for i, sample in enumerate(raw)}
            seen += len(raw)
            keys, images, truth = decoder.pixels(shard, raw, bad)
            if keys:
                rows += len(keys)
                yield _decoded(shard, keys, [place[k] for k in keys], images, truth, [IMAGE_ROW] * len(keys))
        error = b""
    except Exception as exc:  # noqa: BLE001 - handed to the driver whole, with where it happened
        exc.add_note(f"decoding {shard} for labeling:\n" + "".join(traceback.format_exception(exc)))
        error = pickle.dumps(exc)
    empty = np.zeros((1, size, size, channels), np.uint8)
    yield _decoded(shard, [""], [seen], empty, [-1], [rows], json.dumps(bad), decoder.name, error)


def _decoded(
    shard: str, keys, index, images, truth, rows, bad: str = "", decoder: str = "", error: bytes = b""
) -> dict[str, np.ndarray]:
    n = len(keys)
    return {
        "key": np.array(keys, dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "index": np.asarray(index, dtype=np.int64),
        "image": images,
        "truth": np.asarray(truth, dtype=np.int32),
        "rows": np.asarray(rows, dtype=np.int64),
        "bad": np.array([bad] * n, dtype=object),
        "decoder": np.array([decoder] * n, dtype=object),
        "error": np.array([error] * n, dtype=object),
    }


class PixelLabeler:
    """A label actor of the decode-task path: the teacher loaded once, logits for batches of decoded pixels
    (normalised on its device). Marker rows pass through with zero logits."""

    def __init__(self, model_dir: str, threads: int = 0, decode_threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, card = load_model(model_dir, self.device)
        self.model = place_model(model, self.device)
        self.decoder = Decoder(card, card["input_size"][0], 1)  # its normalisation only

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        is_image = np.asarray(batch["rows"]) == IMAGE_ROW
        logits = torch.zeros(len(images), self.model.num_classes)
        if is_image.any():
            pixels = torch.from_numpy(np.ascontiguousarray(images[is_image])).to(self.device, non_blocking=True)
            logits[torch.from_numpy(is_image)] = self._infer(pixels)
        return batch | {"logits": logits.numpy(), "device": np.array([self.device.type] * len(images), dtype=object)}

    @torch.inference_mode()
    def _infer(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            logits = self.model(place_batch(self.decoder.normalize(pixels), self.device))
        return logits.float().cpu()


class ShardAssembler:
    """The driver's half of the decode-task path: gathers labeled rows per shard (each key once, whatever a retry
    delivered twice) and writes a shard's sidecar when its marker and all the images it counts are in."""

    def __init__(self, out_dir: Location, cfg: PseudoLabelConfig, made: dict[str, str], num_classes: int):
        self.out, self.cfg, self.made, self.num_classes = join(out_dir), cfg, made, num_classes
        self.rows: dict[str, dict[str, tuple[int, np.ndarray, int]]] = {}  # shard -> key -> (index, logits, truth)
        self.markers: dict[str, dict] = {}
        self.devices: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}  # when a shard's first row reached the driver
        self.written: set[str] = set()

    def add(self, batch: dict[str, np.ndarray]) -> list[dict]:
        """Takes one batch of labeled rows; returns the result of each shard this batch completed (as
        ``ShardLabeler.process`` returns it)."""
        touched = set()
        for i, shard in enumerate(batch["shard"]):
            if shard in self.written:
                continue  # a retry's late duplicate of a shard already written
            touched.add(shard)
            self.first_seen.setdefault(shard, time.perf_counter())
            if batch["rows"][i] == IMAGE_ROW:
                row = (int(batch["index"][i]), batch["logits"][i], int(batch["truth"][i]))
                self.rows.setdefault(shard, {})[batch["key"][i]] = row
                self.devices[shard] = batch["device"][i]
            else:
                if batch["error"][i]:
                    raise pickle.loads(batch["error"][i])
                self.markers[shard] = {
                    "rows": int(batch["rows"][i]),
                    "bad": json.loads(batch["bad"][i]),
                    "decoder": batch["decoder"][i],
                }
        return [self._write(shard) for shard in sorted(touched) if self._complete(shard)]

    def pending(self) -> list[str]:
        """Shards begun but not written: none once the stream has ended, unless rows were lost."""
        return sorted((set(self.rows) | set(self.markers)) - self.written)

    def _complete(self, shard: str) -> bool:
        marker = self.markers.get(shard)
        return marker is not None and len(self.rows.get(shard, {})) == marker["rows"]

    def _write(self, shard: str) -> dict:
        """Writes the sidecar; ``seconds`` runs from the shard's first row in (so the stage's start-up, the time
        before the first shard's rows came, is counted as it is for the actor path)."""
        marker, rows = self.markers.pop(shard), self.rows.pop(shard, {})
        keys = sorted(rows, key=lambda k: rows[k][0])  # the shard's own order, as the actor path writes it
        logits = torch.from_numpy(np.stack([rows[k][1] for k in keys])) if keys else torch.zeros(0, self.num_classes)
        table = build_table(shard, keys, logits, [rows[k][2] for k in keys], self.cfg.topk, self.cfg.temperature)
        meta = {"bad": json.dumps(marker["bad"]), **truth_counts(table)}
        write_table(table, join(self.out, sidecar_file(shard)), format=SIDECAR_FORMAT, made_by=self.made[shard], **meta)
        self.written.add(shard)
        device = self.devices.pop(shard, "cpu")
        return {
            "rows": len(keys),
            "bad": marker["bad"],
            "seconds": time.perf_counter() - self.first_seen.pop(shard),
            "shard": shard,
            "device": device,
            "decode": "tasks",
            "decoder": marker["decoder"],
        }


def made_by(model_sha: str, cfg: PseudoLabelConfig, channels: int, shard: str) -> str:
    """What decides one shard's sidecar: the teacher's weights, the labeling settings, the shard as it is now."""
    settings = {"temperature": cfg.temperature, "topk": cfg.topk, "channels": channels}
    return inputs_digest(format=SIDECAR_FORMAT, model=model_sha, settings=settings, shard=shard, stamp=stamp(shard))


@dataclasses.dataclass(frozen=True)
class PseudoLabel:
    """The stage: the previous round's model labels ``data.unlabeled`` (``label_shards``)."""

    cfg: PseudoLabelConfig
    resources: LabelResources
    name: ClassVar[str] = "pseudo_label"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {"config": ctx.config_digest, "teacher": model_sha(ctx.previous.model)}

    def run(self, ctx: StageContext) -> StageOutput:
        teacher = ctx.previous.model
        summary = label_shards(
            teacher.dir,
            model_sha(teacher),
            ctx.data.unlabeled_shards,
            ctx.layout.pseudo_labels,
            self.cfg,
            ctx.data.channels,
            self.resources,
            ctx.executor,
            ctx.progress,
        )
        return StageOutput([ctx.layout.pseudo_label(s) for s in ctx.data.unlabeled_shards], summary)


def label_shards(
    model_dir: Location,
    model_sha: str,
    shards: list[str],
    out_dir: Location,
    cfg: PseudoLabelConfig,
    channels: int,
    resources: LabelResources,
    executor,
    progress: bool = True,
) -> dict:
    """Label every shard once (a sidecar this model already wrote, whole, is kept); returns the stage summary."""
    out = join(out_dir)
    makedirs(out)
    made = {s: made_by(model_sha, cfg, channels, s) for s in shards}
    todo = [s for s in shards if trusted_table(join(out, sidecar_file(s)), SIDECAR_FORMAT, made[s]) is None]
    resumed = len(shards) - len(todo)
    if resumed:
        log.info(
            "pseudo-label: %d of %d shards already labeled by this model, labeling %d", resumed, len(shards), len(todo)
        )
    start, rows_new, done = time.perf_counter(), 0, 0
    devices: dict[str, int] = {}  # shards labeled per device type ("cuda", "cpu")
    decodes: dict[str, int] = {}  # shards decoded per place ("gpu": nvJPEG, "cpu": decode threads)
    decoders: dict[str, int] = {}  # shards per CPU decoding backend (stages/data/decoders.py)
    startup = None  # seconds until the first worker began labeling: process start, imports, model load
    if todo:
        bar = tqdm(total=len(todo), unit="shard", desc="pseudo-label", disable=not progress, dynamic_ncols=True)
        with bar, _labeled(model_dir, out, todo, made, cfg, channels, resources, executor) as results:
            for row in results:
                rows_new, done = rows_new + int(row["rows"]), done + 1
                devices[row["device"]] = devices.get(row["device"], 0) + 1
                decodes[row["decode"]] = decodes.get(row["decode"], 0) + 1
                decoders[row["decoder"]] = decoders.get(row["decoder"], 0) + 1
                if startup is None:
                    startup = max(0.0, time.perf_counter() - start - float(row["seconds"]))
                bar.update(1)
                # Shards don't record their size: the image total is estimated from the shards done so far.
                rate = rows_new / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rows_new}/~{round(rows_new / done * len(todo))} images, {rate:.0f} img/s")
    seconds = time.perf_counter() - start
    footers = {s: read_footer(join(out, sidecar_file(s)), SIDECAR_FORMAT) for s in shards}
    missing = [s for s, f in footers.items() if f is None]
    if missing:
        raise RuntimeError(f"pseudo-label: no sidecar for {len(missing)} shard(s), e.g. {missing[0]}")
    return summarize_labels(list(footers.values()), cfg.max_bad_fraction) | {
        "shards": len(shards),
        "shards_resumed": resumed,
        "seconds": round(seconds, 3),
        "images_per_s": round(rows_new / seconds, 1) if rows_new else None,
        "startup_seconds": round(startup, 3) if startup is not None else None,
        "devices": devices,
        "decode": decodes,
        "decoders": decoders,
        "ran_as": executor.kind,
    }


@contextlib.contextmanager
def _labeled(
    model_dir: Location,
    out: Location,
    todo: list[str],
    made: dict[str, str],
    cfg: PseudoLabelConfig,
    channels: int,
    resources: LabelResources,
    executor,
) -> Iterator[Iterator[dict]]:
    """Each shard of ``todo`` labeled and its sidecar written, one result per shard as it is done: decoded by the
    label actors themselves (``ShardLabeler``), or by decode tasks ahead of them (``label_decode: tasks``)."""
    if resources.decode != "tasks":
        kwargs = {
            "model_dir": str(model_dir),
            "out_dir": str(out),
            "cfg": cfg,
            "channels": channels,
            "decode": resources.decode,
            "cpu_decoder": resources.cpu_decoder,
        }
        with executor.pool(ShardLabeler, kwargs, [{"shard": s, "made_by": made[s]} for s in todo], resources) as rows:
            yield rows
        return
    card = json.loads(read_text(ModelFiles(model_dir).card))
    decode = {"card": card, "channels": channels, "backend": resources.cpu_decoder, "batch_size": cfg.batch_size}
    assembler = ShardAssembler(out, cfg, made, card["num_classes"])
    items = [{"shard": s} | decode for s in todo]
    labeler = {"model_dir": str(model_dir)}
    # A decode task's process (torch and the decoders imported: Ray Data's issue detector saw 483 MiB here and asks
    # for 1.25x that) and two batches of pixels, one being made, one being handed on: what the scheduler reserves.
    held = DECODE_PROCESS_BYTES + 2 * cfg.batch_size * math.prod(card["input_size"])
    with executor.stream(decode_for_labels, items, PixelLabeler, labeler, resources, cfg.batch_size, held) as batches:
        yield (row for batch in batches for row in assembler.add(batch))
    if lost := assembler.pending():
        raise RuntimeError(f"pseudo-label: rows lost for {len(lost)} shard(s), e.g. {lost[0]}")


def summarize_labels(footers: list[Footer], max_bad_fraction: float) -> dict:
    """Rows, unusable samples (a ``DataError`` past ``max_bad_fraction``) and the diagnostic accuracy."""
    rows = sum(f.rows for f in footers)
    bad = [item for f in footers for item in json.loads(f.meta.get("bad", "[]"))]
    seen = rows + len(bad)
    if bad and len(bad) > max_bad_fraction * seen:
        raise DataError(
            f"pseudo-label: {len(bad)} of {seen} unlabeled samples unusable (max_bad_fraction {max_bad_fraction}); "
            f"first: {bad[0]['shard']} {bad[0]['key']}: {bad[0]['reason']}"
        )
    with_truth = sum(int(f.meta.get("with_truth", 0)) for f in footers)
    correct = sum(int(f.meta.get("correct", 0)) for f in footers)
    # Accuracy against .cls carried by unlabeled shards: a diagnostic only, never used for training.
    accuracy = round(correct / with_truth, 6) if with_truth else None
    return {"accuracy": accuracy, "rows": rows, "bad_samples": bad}
