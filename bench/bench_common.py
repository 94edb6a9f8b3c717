"""Shared by the bench scripts: peak memory over this process and the Ray workers; the device of the hand loops."""

from __future__ import annotations

import contextlib
import threading

import psutil
import torch

from stages.device import autocast, place_batch, place_model


class Accel:
    """Where a bench's hand-written loop and bare pass run: the CPU, or with ``gpu`` the first CUDA device with
    bf16 autocast and channels_last, through the stages' own ``stages.device`` (so the peers do the stage's work)."""

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


def wait_until_idle(threshold: float = 0.1, window: float = 1.0, timeout: float = 60.0) -> float:
    """Wait until the processes Ray started (raylet, GCS, dashboard and their children) use less than
    ``threshold`` of a core over ``window`` seconds: ``ray.init`` returns while its dashboard and agents are still
    booting, and that work is not the measured stage's. Returns the seconds waited."""
    import time

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
