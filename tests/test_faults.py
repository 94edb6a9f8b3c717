"""Faults injected into real runs: a pseudo-label actor, a training worker and the driver are SIGKILLed mid-stage.

Each test prints what it injected and what it observed (``pytest -s`` shows it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from stages.data import iter_raw_samples, write_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


class Killer(threading.Thread):
    """Waits until ``ready()`` holds, then SIGKILLs the processes whose command line contains ``marker``.

    Only this test session's processes: the session's Ray (raylet, workers) runs under this process, so other Ray
    instances on the machine are never touched."""

    def __init__(self, ready: Callable[[], bool], marker: str, timeout: float = 180.0) -> None:
        super().__init__(daemon=True)
        self.ready, self.marker, self.timeout = ready, marker, timeout
        self.killed: list[int] = []
        self.at_kill: object = None
        self.probe: Callable[[], object] = lambda: None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.ready():
                self.at_kill = self.probe()
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if self.marker in " ".join(proc.cmdline()):
                            proc.send_signal(signal.SIGKILL)
                            self.killed.append(proc.pid)
                    except psutil.Error:
                        pass
                if self.killed:
                    return
            time.sleep(0.02)


def test_killed_pseudo_label_actor_loses_and_duplicates_nothing(ray_session, digits_root, tmp_path):
    from pipeline.ray_pseudo_label import LabelResources, run_pseudo_label
    from stages.models import ModelSpec, create_model, model_card, save_model
    from stages.pseudo_label import PseudoLabelConfig, sidecar_path

    # 24 shards of 250 (the digits unlabeled images, repeated under new keys): long enough to kill mid-stage.
    base = [s for p in sorted((digits_root / "unlabeled").glob("*.tar")) for s in iter_raw_samples(str(p))]
    samples = [{"__key__": f"r{i:05d}", "png": base[i % len(base)]["png"]} for i in range(6000)]
    shards = write_shards(samples, tmp_path / "shards", "unlabeled", 24)
    spec = ModelSpec("resnet18")
    save_model(
        create_model(spec, 10, 1, noised=False), tmp_path / "teacher", model_card(spec, 10, 1, 32, (0.5,), (0.5,))
    )
    out = tmp_path / "pseudo_labels"
    killer = Killer(lambda: len(list(out.glob("*.parquet"))) >= 2, "ShardLabeler")
    killer.probe = lambda: len(list(out.glob("*.parquet")))
    killer.start()
    summary = run_pseudo_label(
        str(tmp_path / "teacher"),
        shards,
        str(out),
        PseudoLabelConfig(batch_size=128),
        1,
        LabelResources(threads=1),
        progress=False,
    )
    killer.join(timeout=1)
    print(f"\ninjected: SIGKILL of the labeling actor {killer.killed} with {killer.at_kill}/24 sidecars written")
    assert killer.killed, "the actor was never found to kill"
    assert killer.at_kill < 24, "the stage had finished before the kill: nothing was tested"
    keys: list[str] = []
    for shard in shards:
        table = pq.read_table(sidecar_path(out, shard))
        assert table.column("key").to_pylist() == [s["__key__"] for s in iter_raw_samples(shard)]
        keys += table.column("key").to_pylist()
    print(f"observed: {summary['rows']} rows in {len(shards)} sidecars, {len(set(keys))} distinct keys")
    assert summary["rows"] == len(keys) == len(set(keys)) == len(samples)


def digits_train_plan(digits_root: Path, tmp_path: Path, epochs: int):
    """A small teacher run on the real digits labeled shards: 100 images, batch 16, a checkpoint per epoch."""
    from stages.models import ModelSpec
    from stages.train import TrainConfig, TrainPlan

    return TrainPlan(
        spec=ModelSpec("resnet10t", drop_rate=0.1, randaug_n=1, randaug_m=3),
        cfg=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0, loader_workers=0, checkpoint_every=1),
        num_classes=10,
        channels=1,
        image_size=16,
        mean=(0.5,),
        std=(0.5,),
        labeled=tuple(str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))),
        pseudo=(),
        labeled_count=100,
        pseudo_count=0,
        metrics_path=str(tmp_path / "metrics.jsonl"),
        threads=1,
    )


def test_killed_training_worker_resumes_from_its_checkpoint(ray_session, digits_root, tmp_path):
    from pipeline.ray_train import TrainResources, run_training

    epochs, per_epoch = 8, 7  # ceil(100 labeled / 16)
    plan = digits_train_plan(digits_root, tmp_path, epochs)
    storage = tmp_path / "ray_train"
    killer = Killer(lambda: len(list(storage.glob("kill-test/checkpoint_2*"))) >= 2, "RayTrainWorker")
    killer.probe = lambda: sorted(p.name for p in storage.glob("kill-test/checkpoint_2*"))
    killer.start()
    final = run_training(plan, str(storage), "kill-test", TrainResources(max_failures=2), tmp_path / "final")
    killer.join(timeout=1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\ninjected: SIGKILL of training worker {killer.killed} after checkpoints {killer.at_kill}")
    print(f"observed: epochs reported {[r['epoch'] for r in lines]}, final epoch {final['epoch']} step {final['step']}")
    assert killer.killed, "the training worker was never found to kill"
    assert final["epoch"] == epochs and final["step"] == epochs * per_epoch
    assert [r["epoch"] for r in lines].count(1) == 1, "training restarted from epoch 1 instead of the checkpoint"
    assert lines[-1]["epoch"] == epochs and lines[-1]["step"] == epochs * per_epoch
    assert (tmp_path / "final" / "final-model.safetensors").exists()


def test_killed_driver_resumes_training_from_the_checkpoint(ray_session, digits_root, tmp_path):
    from tests.conftest import tiny_tree

    tree = tiny_tree(digits_root, tmp_path / "runs")
    tree["teacher"]["epochs"] = 8
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "pipeline", "iterate", "--config", str(config), "--rounds", "1", "--run", "r"]
    checkpoints = tmp_path / "runs" / "r" / "ray_train"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(checkpoints.glob("round-000-*/checkpoint_2*"))) < 2:
        assert first.poll() is None, "the first driver ended early: " + (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.02)
    at_kill = sorted(p.name for p in checkpoints.glob("round-000-*/checkpoint_2*"))
    first.send_signal(signal.SIGKILL)
    first.wait()
    print(f"\ninjected: SIGKILL of the driver after round-000 checkpoints {at_kill}")
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    epochs = [
        json.loads(line)["epoch"] for line in (run / "round-000" / "train_metrics.jsonl").read_text().splitlines()
    ]
    status = json.loads((run / "run.json").read_text())
    print(f"observed: round-000 epochs reported {epochs}; run status {status['status']}")
    assert status["status"] == "finished"
    assert epochs.count(1) == 1 and epochs[-1] == 8, "the teacher restarted from epoch 1 instead of resuming"
    keys = [
        k for p in (run / "round-001" / "pseudo_labels").glob("*.parquet") for k in pq.read_table(p)["key"].to_pylist()
    ]
    assert len(keys) == len(set(keys)) == 1337


def test_two_workers_split_each_epoch_as_documented(ray_session, digits_root, tmp_path):
    """README: a teacher epoch is ceil(labeled / (batch_size * workers)) steps on every worker."""
    from pipeline.ray_train import TrainResources, run_training

    plan = digits_train_plan(digits_root, tmp_path, epochs=2)
    resources = TrainResources(workers=2, cpus_per_worker=0.5, max_failures=0)
    final = run_training(plan, str(tmp_path / "ray_train"), "two", resources, tmp_path / "final")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\nobserved: 2 workers, steps per epoch {[r['step'] for r in lines]}, final {final}")
    assert [r["step"] for r in lines] == [4, 8]  # ceil(100 / (16 * 2)) = 4, where one worker takes 7
    assert lines[0]["images"] == 4 * 16 * 2  # both ranks' samples are counted
    assert (tmp_path / "final" / "final-model.safetensors").exists()
