"""Shared by the bench scripts: peak memory over this process and the Ray workers."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRss:
    """Max RSS over this process tree and the raylet's (Ray workers), sampled in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        for p in psutil.process_iter(["name"]):
            if p.info["name"] and "raylet" in p.info["name"]:
                procs += p.children(recursive=True)
        return procs

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._procs():
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
