"""Every path and file name of a run, in one place: users, later tools and every stage rely on this layout.

::

    <storage>/.scan-cache/<sha of shard URL>.parquet   labeled/test/val shard scans by shard identity
    <storage>/<run>/config.yaml                  resolved config
    <storage>/<run>/run.json                     status, rounds completed, per-stage timings, the best round and why
    <storage>/<run>/report.html                  the run report, rewritten after every round (report.png: its check)
    <storage>/<run>/tensorboard/                 TensorBoard events
    <storage>/<run>/ray_train/                   training checkpoints (one run per round and inputs)
    <storage>/<run>/tune/                        best.yaml, trials.csv, trials.md, tune.json (recipe search)
    <storage>/<run>/round-NNN/model.safetensors  weights (no pickle)
    <storage>/<run>/round-000/encoder.safetensors  the self-supervised encoder round 0 starts from (pretrain stage)
    <storage>/<run>/round-NNN/model.json         the model card: timm name, kwargs, classes, input size, mean/std
    <storage>/<run>/round-NNN/metrics.json       test and validation top-1 (with intervals), per-class top-1, ...
    <storage>/<run>/round-NNN/train_metrics.jsonl  one JSON line per training epoch
    <storage>/<run>/round-NNN/manifest.json      stages completed, their inputs, each file's size, stamp and sha256
    <storage>/<run>/round-NNN/pseudo_labels/<shard_id>.parquet  soft labels from the previous round's model
    <storage>/<run>/round-NNN/selection/<shard_id>.parquet      what was kept, in training order
    <storage>/<run>/round-NNN/selection/<shard_id>.tar          the compact training shard of those samples
    <storage>/<run>/round-NNN/selection/selection.json          the selection summary (selection.png: its plot)
    <storage>/<run>/round-NNN/eval/<split>/<shard_id>.parquet   the model's predictions per test/val/corrupted shard

A model folder (a round, a download, ``teacher.from_model``) holds ``model.safetensors`` + ``model.json``
(``ModelFiles``); a training checkpoint folder ``model.safetensors``, ``ema.safetensors``, ``aux.safetensors``,
``optim.safetensors``, ``optim.json``, ``state.json`` (``CheckpointFiles``).

Paths keep the kind of their root (``stages.storage.files.join``): a ``Path`` under a local folder, a URL string
under an object store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from stages.storage.files import Location, StorageError, exists, is_url, join, listdir, local_path, name, parent

# A model folder
MODEL_WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
# A round folder, besides its model
ENCODER_WEIGHTS = "encoder.safetensors"
METRICS = "metrics.json"
TRAIN_METRICS = "train_metrics.jsonl"
MANIFEST = "manifest.json"
SELECTION_SUMMARY = "selection.json"
SELECTION_PLOT = "selection.png"
# A run folder
CONFIG = "config.yaml"
STATUS = "run.json"
REPORT = "report.html"
REPORT_SCREENSHOT = "report.png"
# A training checkpoint folder
CKPT_EMA = "ema.safetensors"
CKPT_AUX = "aux.safetensors"
CKPT_OPTIM = "optim.safetensors"
CKPT_OPTIM_META = "optim.json"
CKPT_STATE = "state.json"
# `python -m pipeline tune`'s outputs
TUNE_BEST = "best.yaml"
TUNE_TRIALS_CSV = "trials.csv"
TUNE_TRIALS_MD = "trials.md"
TUNE_SUMMARY = "tune.json"
# `python -m pipeline prepare-folder`'s outputs beside the shards
PREPARE_SUMMARY = "prepare.json"
PREPARE_CONFIG = "data.yaml"
CLASSES = "classes.json"
# `python -m pipeline suggest-labels`'s outputs beside the suggested images
SUGGESTIONS = "suggestions.csv"
SUGGESTED_LABELS = "labels.csv"

# The files a round hands to users (``download``, ``publish``, MLflow): never its prediction sidecars.
ROUND_DELIVERABLES = (MODEL_WEIGHTS, MODEL_CARD, METRICS, MANIFEST)

_ROUND_RE = re.compile(r"^round-(\d{3,})$")


def shard_id(url: str) -> str:
    """A stable file-name-safe id for a shard: its base name plus a short hash of the full URL."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])
    base = re.sub(r"\.tar$", "", base)
    return f"{base}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def sidecar_file(shard: str) -> str:
    """The file name of a shard's sidecar in a stage folder (pseudo-labels, selection, one evaluation split)."""
    return f"{shard_id(shard)}.parquet"


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """A model folder: ``weights`` (safetensors) and ``card`` (``model.json``)."""

    dir: Location

    @property
    def weights(self) -> Location:
        return join(self.dir, MODEL_WEIGHTS)

    @property
    def card(self) -> Location:
        return join(self.dir, MODEL_CARD)


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """One training checkpoint folder (``stages/models/checkpoint.py`` writes and verifies it)."""

    dir: Location

    @property
    def model(self) -> Location:
        return join(self.dir, MODEL_WEIGHTS)

    @property
    def ema(self) -> Location:
        return join(self.dir, CKPT_EMA)

    @property
    def aux(self) -> Location:
        return join(self.dir, CKPT_AUX)

    @property
    def optim(self) -> Location:
        return join(self.dir, CKPT_OPTIM)

    @property
    def optim_meta(self) -> Location:
        return join(self.dir, CKPT_OPTIM_META)

    @property
    def state(self) -> Location:
        return join(self.dir, CKPT_STATE)


@dataclasses.dataclass(frozen=True)
class RoundLayout:
    """The files of one round (``round-NNN``)."""

    dir: Location
    index: int

    @property
    def model(self) -> ModelFiles:
        return ModelFiles(self.dir)

    @property
    def encoder(self) -> Location:
        """The pretrain stage's encoder (the model without its classifier), in round 0."""
        return join(self.dir, ENCODER_WEIGHTS)

    @property
    def metrics(self) -> Location:
        return join(self.dir, METRICS)

    @property
    def train_metrics(self) -> Location:
        return join(self.dir, TRAIN_METRICS)

    @property
    def manifest(self) -> Location:
        return join(self.dir, MANIFEST)

    @property
    def pseudo_labels(self) -> Location:
        return join(self.dir, "pseudo_labels")

    def pseudo_label(self, shard: str) -> Location:
        return join(self.pseudo_labels, sidecar_file(shard))

    @property
    def selection(self) -> Location:
        return join(self.dir, "selection")

    def selected(self, shard: str) -> Location:
        """The selection sidecar of an unlabeled shard (its compact tar: ``compact``)."""
        return join(self.selection, sidecar_file(shard))

    @property
    def selection_summary(self) -> Location:
        return join(self.selection, SELECTION_SUMMARY)

    @property
    def selection_plot(self) -> Location:
        return join(self.selection, SELECTION_PLOT)

    @property
    def eval(self) -> Location:
        return join(self.dir, "eval")

    def eval_sidecar(self, split: str, shard: str) -> Location:
        return join(self.eval, split, sidecar_file(shard))


def compact(sidecar: Location) -> Location:
    """The compact training shard beside a selection sidecar: ``<shard_id>.tar`` for ``<shard_id>.parquet``."""
    return join(parent(sidecar), name(sidecar).removesuffix(".parquet") + ".tar")


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The files of one run (``<storage>/<run>``)."""

    dir: Location

    def round(self, index: int) -> RoundLayout:
        return RoundLayout(join(self.dir, round_name(index)), index)

    @property
    def config(self) -> Location:
        return join(self.dir, CONFIG)

    @property
    def status(self) -> Location:
        return join(self.dir, STATUS)

    @property
    def report(self) -> Location:
        return join(self.dir, REPORT)

    @property
    def report_screenshot(self) -> Location:
        return join(self.dir, REPORT_SCREENSHOT)

    @property
    def tensorboard(self) -> Location:
        return join(self.dir, "tensorboard")

    def round_indices(self) -> list[int]:
        """The rounds that have a folder, in order (finished or not)."""
        return sorted(i for entry in listdir(self.dir) if (i := round_index(entry)) is not None)

    @property
    def checkpoints(self) -> Location:
        return join(self.dir, "ray_train")

    @property
    def tune(self) -> Location:
        return join(self.dir, "tune")


def round_name(index: int) -> str:
    return f"round-{index:03d}"


def round_index(folder_name: str) -> int | None:
    """``3`` for ``round-003``; None for any other name."""
    found = _ROUND_RE.match(folder_name)
    return int(found.group(1)) if found else None


def scan_cache(storage_root: Location) -> Location:
    """``<storage>/.scan-cache``: labeled scans kept per shard identity, shared by the runs under that root."""
    return join(storage_root, ".scan-cache")


class RunNotFoundError(StorageError):
    """Neither place ``locate_run`` looked holds a run (no ``config.yaml``); the message names both."""


def locate_run(run: str, storage_root: Location = "runs") -> Location:
    """Where run ``run`` lives: the one way every command (``rounds``, ``download``, ``report``, ``compare``) turns
    "RUN or a path, plus ``--storage``" into a run location.

    ``run`` is a run's name under ``storage_root`` (looked for first), or itself a run folder or URL. A local run
    comes back as an absolute ``Path``, a run in an object store as its URL. ``RunNotFoundError`` when neither
    holds a ``config.yaml``.
    """
    if is_url(run):
        candidates: list[Location] = [run]
    else:
        under = join(storage_root, run) if is_url(storage_root) else local_path(storage_root).expanduser() / run
        candidates = [under, Path(run).expanduser()]
    for candidate in candidates:
        if exists(join(candidate, CONFIG)):
            return candidate if is_url(candidate) else local_path(candidate).resolve()
    where = " nor ".join(str(c) for c in dict.fromkeys(map(str, candidates)))
    raise RunNotFoundError(
        f"no run {run!r}: {'neither ' if len(candidates) > 1 else ''}{where} holds a run's "
        "config.yaml (check RUN and --storage)"
    )
