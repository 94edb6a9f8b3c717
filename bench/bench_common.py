"""Shared by the bench scripts: where results are saved (with the machine's facts), peak memory over this process
and the Ray workers, the device of the hand loops, and a model trained in this process as the train stage trains it.

Every bench ends with one JSON line and, unless ``--no-save``, writes the same object, with ``machine`` (CPU model,
cores, RAM, GPU, library versions, git commit, date, command line) added, to ``bench/results/<name>-<stamp>.json``.
``bench/table.py`` renders the README's tables from those files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from stages.models.device import autocast, place_batch, place_model

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from stages.data.shards import LabeledSet
    from stages.train import TrainPlan


class Accel:
    """Where a bench's hand-written loop and bare pass run: the CPU, or with ``gpu`` the first CUDA device with
    bf16 autocast and channels_last, through the stages' own ``stages.models.device`` (so the peers do the stage's
    work)."""

    def __init__(self, gpu: bool) -> None:
        if gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device is visible to torch")
        self.device = torch.device("cuda" if gpu else "cpu")
        self.cuda = gpu

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        return place_model(model, self.device)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return place_batch(x, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    def sync(self) -> None:
        """Wait for queued GPU work, so that a clock read after it counts it."""
        if self.cuda:
            torch.cuda.synchronize()

    def describe(self) -> str:
        return torch.cuda.get_device_name(0) if self.cuda else "cpu"


def _status(proc: psutil.Process) -> dict[str, int]:
    """Byte counts from ``/proc/PID/status`` (Linux): ``VmHWM``, ``RssAnon``, ``RssShmem``, ..."""
    out = {}
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.startswith(("Vm", "Rss")):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class PeakRss:
    """Max RSS of one process over this process tree and the raylet's (Ray workers), polled in a thread.

    Each process counts its resident memory less the object store's shared pages (reported apart as
    ``peak_shared``). The poll is slow (0.5 s) so that it costs the measured work almost nothing: a 50 ms psutil
    scan took 4-6 CPU-seconds of the driver during a 20 s pseudo-label stage on 2 cores.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self.peak_process = ""  # which process had the peak (name and command line)
        self.peak_shared = 0  # the largest object-store (shared memory) share seen in one process
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        for p in psutil.process_iter(["name"]):
            if p.info["name"] and "raylet" in p.info["name"]:
                procs += p.children(recursive=True)
        return procs

    def _poll(self) -> None:
        for p in self._procs():
            try:
                status = _status(p)
                # Ray's object store is shared memory mapped into every worker: its pages count in each worker's
                # RSS as they are touched, though the store is one bounded pool (object_store_memory), so it is
                # kept apart from each process's own memory.
                shared = status.get("RssShmem", 0)
                own = p.memory_info().rss - shared
                self.peak_shared = max(self.peak_shared, shared)
                if own > self.peak:
                    self.peak, self.peak_process = own, " ".join(p.cmdline())[:80]
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


def fit_in_process(plan: TrainPlan, work: Path, device: str = "cpu") -> tuple[Path, float]:
    """Train ``plan`` from scratch in this process, as the train stage does on the in-process executor
    (``InProcess.fit``: ``train_model`` with ``LocalHooks``, checkpoints under ``work``; an earlier attempt there is
    removed, so nothing resumes). Returns the final weights (the EMA's when the plan keeps one) and the seconds."""
    import functools
    import shutil

    from stages.core.stage import InProcess, TrainResources
    from stages.storage.layout import CKPT_EMA, MODEL_WEIGHTS
    from stages.train import train_model

    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    resources = TrainResources(use_gpu=device == "cuda")
    InProcess(progress=False).fit(functools.partial(train_model, plan), "ckpt", work, resources, work / "final")
    seconds = time.perf_counter() - start
    return work / "final" / f"final-{CKPT_EMA if plan.cfg.ema_decay else MODEL_WEIGHTS}", seconds


def save_round_model(weights: Path, cfg: PipelineConfig, r: int, out_dir: Path) -> None:
    """Final weights as round ``r``'s model folder (weights + the card the train stage writes, ``model_card_for``)."""
    from pipeline.plan import model_card_for
    from stages.models.factory import atomic_save_safetensors, check_classifier, load_weights
    from stages.storage.files import atomic_write_json
    from stages.storage.layout import ModelFiles

    d, files = cfg.data, ModelFiles(out_dir)
    params = check_classifier(cfg.spec(r), d.num_classes, d.channels, d.image_size)
    atomic_save_safetensors(load_weights(weights), files.weights)
    atomic_write_json(files.card, model_card_for(cfg, r, params) | {"round": r})


def model_top1(model_dir: Path, test: LabeledSet) -> float:
    """A model folder's top-1 on images held in memory (``stages.evaluate.evaluate``), with every torch thread."""
    from stages.evaluate import evaluate
    from stages.models.factory import load_model

    torch.set_num_threads(os.cpu_count() or 1)  # as a driver evaluates (training set its own count)
    model, card = load_model(model_dir)
    return evaluate(model, card, test)["test_top1"]


def wait_until_idle(threshold: float = 0.1, window: float = 1.0, timeout: float = 60.0) -> float:
    """Wait until the processes Ray started (raylet, GCS, dashboard and their children) use less than
    ``threshold`` of a core over ``window`` seconds: ``ray.init`` returns while its dashboard and agents are still
    booting, and that work is not the measured stage's. Returns the seconds waited."""

    def ray_cpu() -> float:
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            if p.pid == me.pid:
                continue
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        before = ray_cpu()
        time.sleep(window)
        if ray_cpu() - before < threshold * window:
            break
    return time.perf_counter() - start


RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


@contextlib.contextmanager
def one_line_errors():
    """A bad config or bad data inside (``ConfigError``, ``DataError``): one ``error:`` line and exit 2, as the CLI
    prints it, not a traceback."""
    from stages.core.errors import ConfigError, DataError

    try:
        yield
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def load_prepared(config: str | None, overrides: list[str]) -> PipelineConfig:
    """The config with ``overrides``, its built-in digits data written first when it names ``data.prepare_digits``
    (as ``make iterate`` does), so a bench runs on a fresh checkout; a bad config or data: one ``error:`` line,
    exit 2."""
    from pipeline.cli import ensure_digits
    from pipeline.config import load_config

    with one_line_errors():
        cfg = load_config(config, overrides)
        ensure_digits(cfg.data.prepare_digits, cfg.data.prepare_labeled_per_class)
    return cfg


def add_result_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-save", action="store_true", help="print the JSON line only (smoke runs)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where results are saved (default {RESULTS})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    """What a figure was measured on and with. Versions come from package metadata (no ``import ray``)."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gb": round(props.total_memory / 2**30)}
    commit = _git("rev-parse", "HEAD")
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "torchvision", "timm", "ray", "webdataset", "pyarrow")},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # a busy machine reads slower: kept beside the figures
    }


def save_result(result: dict, name: str, args: argparse.Namespace) -> Path | None:
    """Print ``result`` as the final JSON line and, unless ``args.no_save``, write it with ``machine`` added to
    ``<args.results>/<name>-<UTC stamp>.json`` (a new file per run: the table takes the latest per setting)."""
    result = {**result, "machine": machine_facts()}
    print(json.dumps(result))
    if args.no_save:
        return None
    stamp = result["machine"]["date"].replace(":", "").replace("-", "")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{name}-{stamp}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"saved {path}", file=sys.stderr)
    return path
