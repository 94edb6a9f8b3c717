"""Faults injected into real runs: a pseudo-label actor, a training worker and the driver are SIGKILLed mid-stage.

Each test prints what it injected and what it observed (``pytest -s`` shows it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.data.shards import expand_shards, iter_raw_samples, write_shards

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


def labeling_to_kill(digits_root: Path, tmp_path: Path) -> tuple[list[dict], list[str]]:
    """24 shards of 250 (the digits unlabeled images, repeated under new keys: long enough to kill mid-stage) and a
    resnet18 teacher in ``tmp_path/teacher``."""
    from stages.models.factory import ModelSpec, create_model, model_card, save_model

    base = [s for p in sorted((digits_root / "unlabeled").glob("*.tar")) for s in iter_raw_samples(str(p))]
    samples = [{"__key__": f"r{i:05d}", "png": base[i % len(base)]["png"]} for i in range(6000)]
    shards = write_shards(samples, tmp_path / "shards", "unlabeled", 24)
    spec = ModelSpec("resnet18")
    save_model(
        create_model(spec, 10, 1, noised=False), tmp_path / "teacher", model_card(spec, 10, 1, 32, (0.5,), (0.5,))
    )
    return samples, shards


def label_on_ray(tmp_path: Path, shards: list[str], out: Path, resources, executor=None) -> dict:
    """The pseudo-label stage over ``shards`` with ``labeling_to_kill``'s teacher, on Ray actors (or ``executor``'s
    warm trainer), into ``out``; returns its summary."""
    from pipeline.distributed.executor import RayExecutor
    from stages.pseudo_label import PseudoLabelConfig, label_shards

    return label_shards(
        tmp_path / "teacher",
        "sha",
        shards,
        out,
        PseudoLabelConfig(batch_size=128),
        1,
        resources,
        executor or RayExecutor(False),
        progress=False,
    )


def with_warm_trainer(tmp_path: Path):
    """A ``RayExecutor`` holding a warm trainer (``resources.train_runtime: warm``, ``max_failures`` 2), made by one
    trivial fit: the session's other CPU is room for one pool actor, so its pools run on the trainer."""
    from pipeline.distributed.executor import RayExecutor
    from stages.core.stage import TrainResources

    def fit(hooks):  # defined here: pickled by value into the actor
        import tempfile
        from pathlib import Path

        ckpt = Path(tempfile.mkdtemp())
        (ckpt / "model.safetensors").write_bytes(b"weights")
        hooks.report({"epoch": 1}, ckpt)
        return {}

    executor = RayExecutor(False)
    executor.fit(fit, "warm-up", str(tmp_path / "warm"), TrainResources(runtime="warm", max_failures=2), tmp_path / "w")
    return executor


def assert_each_key_once(out: Path, shards: list[str], samples: list[dict], summary: dict) -> None:
    """Every shard's sidecar holds its keys once each, in the shard's order; the stage counted each row once."""
    from stages.storage.layout import sidecar_file

    keys: list[str] = []
    for shard in shards:
        table = pq.read_table(out / sidecar_file(shard))
        assert table.column("key").to_pylist() == [s["__key__"] for s in iter_raw_samples(shard)]
        keys += table.column("key").to_pylist()
    print(f"observed: {summary['rows']} rows in {len(shards)} sidecars, {len(set(keys))} distinct keys")
    assert summary["rows"] == len(keys) == len(set(keys)) == len(samples)


@pytest.mark.parametrize("on", ["pool", "warm_trainer"])
def test_killed_pseudo_label_actor_loses_and_duplicates_nothing(ray_session, digits_root, tmp_path, on):
    """A Ray Data pool's actor, or the run's warm trainer labeling as a pool of one (``pool_on_trainer``)."""
    from stages.core.stage import LabelResources

    samples, shards = labeling_to_kill(digits_root, tmp_path)
    out = tmp_path / "pseudo_labels"
    executor = with_warm_trainer(tmp_path) if on == "warm_trainer" else None
    killer = Killer(lambda: len(list(out.glob("*.parquet"))) >= 2, "WarmTrainer" if executor else "MapWorker")
    killer.probe = lambda: len(list(out.glob("*.parquet")))
    killer.start()
    summary = label_on_ray(tmp_path, shards, out, LabelResources(threads=1), executor)
    killer.join(timeout=1)
    print(f"\ninjected: SIGKILL of the labeling actor {killer.killed} ({on}) with {killer.at_kill}/24 sidecars written")
    if executor:
        assert executor._trainer is None, "a restarted warm trainer was kept"
    assert killer.killed, "the actor was never found to kill"
    assert killer.at_kill < 24, "the stage had finished before the kill: nothing was tested"
    assert_each_key_once(out, shards, samples, summary)
    assert summary["devices"] == {"cpu": 24}  # one result row per shard: a killed actor's shard counts once


def test_killed_decode_task_and_label_actor_lose_and_duplicate_nothing(ray_session, digits_root, tmp_path):
    """``label_decode: tasks``: a decode task is SIGKILLed, then the label actor it feeds; Ray retries the task and
    restarts the actor, rows may come twice, and every shard's sidecar still holds each of its keys once, in order."""
    from stages.core.stage import LabelResources

    samples, shards = labeling_to_kill(digits_root, tmp_path)
    out = tmp_path / "pseudo_labels"
    written = lambda: len(list(out.glob("*.parquet")))  # noqa: E731
    decode_killer = Killer(lambda: written() >= 2, "_decode_task")
    actor_killer = Killer(lambda: written() >= 8, "MapWorker")
    for killer in (decode_killer, actor_killer):
        killer.probe = written
        killer.start()
    summary = label_on_ray(tmp_path, shards, out, LabelResources(threads=1, decode="tasks"))
    for killer in (decode_killer, actor_killer):
        killer.join(timeout=1)
        print(f"\ninjected: SIGKILL of {killer.marker} {killer.killed} with {killer.at_kill}/24 sidecars written")
        assert killer.killed, f"no {killer.marker} process was found to kill"
        assert killer.at_kill < 24, "the stage had finished before the kill: nothing was tested"
    assert_each_key_once(out, shards, samples, summary)
    assert summary["decode"] == {"tasks": 24} and summary["devices"] == {"cpu": 24}


def digits_train_plan(digits_root: Path, tmp_path: Path, epochs: int):
    """A small teacher run on the real digits labeled shards: 100 images, batch 16, a checkpoint per epoch."""
    from stages.models.factory import ModelSpec
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


def run_training(plan, storage: str, name: str, resources, out: Path) -> dict:
    """The train stage's Ray Train call (``RayExecutor.fit``) for a plan made here."""
    import functools

    from pipeline.distributed.executor import RayExecutor
    from stages.train import train_model

    return RayExecutor(False).fit(functools.partial(train_model, plan), name, storage, resources, out)


@pytest.mark.parametrize(
    ("runtime", "marker", "checkpoint"),
    [("ray_train", "RayTrainWorker", "checkpoint_2*"), ("warm", "WarmTrainer", "epoch-*[0-9]")],
)
def test_killed_training_worker_resumes_from_its_checkpoint(
    ray_session, digits_root, tmp_path, runtime, marker, checkpoint
):
    """Ray Train's worker group, or the run's warm training actor (``resources.train_runtime``)."""
    import functools

    from pipeline.distributed.executor import RayExecutor
    from stages.core.stage import TrainResources
    from stages.train import train_model

    epochs, per_epoch = 8, 7  # ceil(100 labeled / 16)
    plan = digits_train_plan(digits_root, tmp_path, epochs)
    storage = tmp_path / "ckpt"
    killer = Killer(lambda: len(list(storage.glob(f"kill-test/{checkpoint}"))) >= 2, marker)
    killer.probe = lambda: sorted(p.name for p in storage.glob(f"kill-test/{checkpoint}"))
    killer.start()
    executor = RayExecutor(False)
    resources = TrainResources(max_failures=2, runtime=runtime)
    final = executor.fit(functools.partial(train_model, plan), "kill-test", str(storage), resources, tmp_path / "final")
    killer.join(timeout=1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\ninjected: SIGKILL of training worker {killer.killed} ({runtime}) after checkpoints {killer.at_kill}")
    print(f"observed: epochs reported {[r['epoch'] for r in lines]}, final epoch {final['epoch']} step {final['step']}")
    assert killer.killed, "the training worker was never found to kill"
    assert final["epoch"] == epochs and final["step"] == epochs * per_epoch
    assert [r["epoch"] for r in lines].count(1) == 1, "training restarted from epoch 1 instead of the checkpoint"
    assert lines[-1]["epoch"] == epochs and lines[-1]["step"] == epochs * per_epoch
    assert (tmp_path / "final" / "final-model.safetensors").exists()
    assert executor._trainer is None, "a restarted warm trainer was kept: the next stage would have fewer restarts"


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
    assert len(keys) == len(set(keys)) == 1237


def test_two_workers_split_each_epoch_as_documented(ray_session, digits_root, tmp_path):
    """README: a teacher epoch is ceil(labeled / (batch_size * workers)) steps on every worker."""
    from stages.core.stage import TrainResources

    plan = digits_train_plan(digits_root, tmp_path, epochs=2)
    resources = TrainResources(workers=2, cpus_per_worker=0.5, max_failures=0)
    final = run_training(plan, str(tmp_path / "ray_train"), "two", resources, tmp_path / "final")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\nobserved: 2 workers, steps per epoch {[r['step'] for r in lines]}, final {final}")
    assert [r["step"] for r in lines] == [4, 8]  # ceil(100 / (16 * 2)) = 4, where one worker takes 7
    assert lines[0]["images"] == 4 * 16 * 2  # both ranks' samples are counted
    assert (tmp_path / "final" / "final-model.safetensors").exists()


# ---------------------------------------------------------------- a student round, killed and resumed


def copy_finished_run(finished_run, storage: Path, rounds: int = 2):
    """The session's finished rounds 0-1 copied under ``storage`` (without Ray Train's checkpoints), with a config
    asking for ``rounds``: resuming it runs only the new student round(s), so the teacher is not trained again."""
    import shutil

    cfg, run_dir, _ = finished_run
    shutil.copytree(run_dir, storage / "r", ignore=shutil.ignore_patterns("ray_train", "report*", "tensorboard"))
    return dataclasses.replace(cfg, storage=str(storage), rounds=rounds), storage / "r"


def check_student_round(run_dir: Path, r: int, cfg, unlabeled_shards: list[str]) -> dict:
    """A finished student round holds each unlabeled key exactly once in its pseudo-labels, and a selection equal to
    the in-memory reference over those pseudo-labels, row for row and copy for copy, matching ``selection.json``."""
    import numpy as np

    from pipeline.plan import select_config
    from stages.data.compact import SELECTION_FORMAT
    from stages.maths.selection import select_in_memory
    from stages.storage.artifacts import RoundManifest, read_footer, verify_entry

    rdir = run_dir / f"round-{r:03d}"
    manifest = RoundManifest(rdir)
    for stage in ("pseudo_label", "select", "train", "evaluate"):
        assert all(verify_entry(f, rdir) is None for f in manifest.stage(stage)["files"]), stage
    assert not list(rdir.rglob(".*.tmp")), "temporary files left behind"
    expected = [s["__key__"] for shard in unlabeled_shards for s in iter_raw_samples(shard)]
    pseudo = pa.concat_tables(pq.read_table(f) for f in sorted((rdir / "pseudo_labels").glob("*.parquet")))
    keys = pseudo.column("key").to_pylist()
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected), "pseudo-labels lost or duplicated"
    labels, confidence = pseudo.column("label").to_numpy(), pseudo.column("confidence").to_numpy()
    # the round's own selection seed (ties and which samples get a scarce class's extra copy), as the loop uses it
    select_cfg = select_config(cfg, r, pretrained=False)  # auto resolved as the loop does (no pretraining here)
    reference = select_in_memory(keys, labels, confidence, cfg.data.num_classes, select_cfg)
    files = sorted((rdir / "selection").glob("*.parquet"))
    listed = {e["path"] for e in manifest.stage("select")["files"]}
    for f in files:
        footer = read_footer(f, SELECTION_FORMAT)
        assert footer.rows == pq.read_metadata(f).num_rows, f
        tar = f.with_suffix(".tar")  # the compact training shard: there, whole and in the manifest iff rows were kept
        assert tar.exists() == (footer.rows > 0) == (f"selection/{tar.name}" in listed), tar
        if tar.exists():
            assert tar.stat().st_size == int(footer.meta["tar_bytes"]), tar
            assert sum(1 for _ in iter_raw_samples(str(tar))) == int(footer.meta["train_members"]), tar
    selection = pa.concat_tables(pq.read_table(f) for f in files)
    copies = dict(zip(selection.column("key").to_pylist(), selection.column("copies").to_pylist(), strict=True))
    assert len(copies) == selection.num_rows, "a selection row is duplicated"
    assert copies == {k: int(c) for k, c in zip(keys, reference, strict=True) if c}, "selection differs from reference"
    summary = json.loads((rdir / "selection" / "selection.json").read_text())
    kept = np.bincount(selection.column("label").to_numpy(), minlength=cfg.data.num_classes)
    assert summary["kept"] == selection.num_rows and summary["copies_out"] == int(reference.sum())
    assert summary["per_class_kept"] == kept.tolist()
    return {
        "pseudo_label rows": len(keys),
        "selection rows": selection.num_rows,
        "copies": summary["copies_out"],
        "pseudo_label shards resumed": manifest.stage("pseudo_label")["result"]["shards_resumed"],
        "select shards resumed": manifest.stage("select")["result"]["shards_resumed"],
    }


def test_driver_killed_at_every_boundary_and_mid_stage_resumes_losing_nothing(ray_session, finished_run, tmp_path):
    """A subprocess driver runs round 2 on a copy of the session's finished run and is SIGKILLed at each stage
    boundary and mid pseudo-label and mid train, relaunched (same RUN) after each kill, then let finish.

    The boundary before round 2's pseudo-label is where the copy starts (round 1 recorded, round 2 not begun, as
    after a kill there), so the first launch resumes from it without a kill of its own (each launch costs ~6 s of
    imports). Mid select and mid evaluate are not targeted: on the tiny data each takes well under a second, so a
    kill "in the middle" could not be aimed; the kills at their boundaries land within ~20 ms of the stage starting
    (its log line), which is as close to mid-stage as they can be hit reliably.
    """
    from pipeline.config import dump_config
    from stages.storage.artifacts import RoundManifest

    cfg, run = copy_finished_run(finished_run, tmp_path / "runs")
    before = {r: (run / f"round-{r:03d}" / "manifest.json").read_text() for r in (0, 1)}
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "iterate", "--config", str(config), "--run", "r", "--no-progress"]
    rdir = run / "round-002"

    def stages_done() -> list[str]:
        return list(RoundManifest(rdir).data["stages"]) if (rdir / "manifest.json").exists() else []

    def checkpointed() -> bool:
        snapshots = list((run / "ray_train").glob("round-002-*/checkpoint_manager_snapshot.json"))
        return any(json.loads(p.read_text() or "{}").get("checkpoint_results") for p in snapshots)

    def started(stage: str) -> Callable[[str], bool]:
        return lambda log: f"round-002 {stage}: starting" in log

    points = [  # (where the driver is killed, when that is: a predicate over this launch's log)
        ("mid pseudo_label (a sidecar written)", lambda log: any((rdir / "pseudo_labels").glob("*.parquet"))),
        ("boundary pseudo_label -> select", started("select")),
        ("boundary select -> train", started("train")),
        ("mid train (checkpoint registered)", lambda log: checkpointed()),
        ("boundary train -> evaluate", started("evaluate")),
        ("after evaluate (round 2 recorded, report being written)", lambda log: "evaluate" in stages_done()),
    ]
    for i, (where, ready) in enumerate(points):
        log_path = tmp_path / f"launch-{i}.log"
        with log_path.open("w") as out:
            driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready(log_path.read_text()):
            assert driver.poll() is None, f"launch {i} ended before '{where}': " + log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, f"launch {i}: '{where}' never came"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        sidecars = len(list((rdir / "pseudo_labels").glob("*.parquet")))
        print(f"\ninjected: SIGKILL at {where}; stages recorded then {stages_done()}, {sidecars}/4 sidecars")
        if where.startswith("mid"):
            stage = where.split()[1]
            assert stage not in stages_done(), f"the kill meant for mid {stage} came after the stage was recorded"
    final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    (tmp_path / "final.log").write_text(final.stdout + final.stderr)
    assert final.returncode == 0, final.stderr[-3000:]

    status = json.loads((run / "run.json").read_text())
    epochs = [json.loads(line)["epoch"] for line in (rdir / "train_metrics.jsonl").read_text().splitlines()]
    observed = check_student_round(run, 2, cfg, expand_shards(cfg.data.unlabeled))
    resumed = [
        line for p in sorted(tmp_path.glob("*.log")) for line in p.read_text().splitlines() if "resumed from" in line
    ]
    print(f"observed: run {status['status']}, {status['rounds_completed']} rounds; round 2 {observed}")
    print(f"observed: round-002 epochs in train_metrics.jsonl {epochs}; {resumed[-1:] or 'no checkpoint resume'}")
    assert status["status"] == "finished" and status["rounds_completed"] == 3
    assert {r: (run / f"round-{r:03d}" / "manifest.json").read_text() for r in (0, 1)} == before, "rounds 0-1 redone"
    assert epochs == [1] and resumed, "the student was trained again instead of resuming from its checkpoint"


# ---------------------------------------------------------------- the storage fills up or turns read-only


class SmallDisk:
    """A tmpfs mounted for one test: a real filesystem whose writes fail with the kernel's own ENOSPC / EROFS."""

    def __init__(self, path: Path, size_mb: int = 512) -> None:
        path.mkdir(parents=True)
        self.path, self.filler = path, path / "filler"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"needs mount (root with CAP_SYS_ADMIN) for a real full/read-only disk: {done.stderr.decode()}")

    def fill(self, leave_pages: int) -> int:
        """Take all free space but ``leave_pages`` pages; returns the bytes left."""
        st = os.statvfs(self.path)
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, (st.f_bavail - leave_pages) * st.f_frsize)
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        done = subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)], capture_output=True)
        if done.returncode:
            raise RuntimeError(f"remount failed ({done.stderr.decode().strip()}); open on it: {self.holders()}")

    def holders(self) -> list[str]:
        """What keeps the disk busy: every process's open files under it."""
        found = []
        for fd in Path("/proc").glob("[0-9]*/fd/*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.path)):
                found.append(f"{fd.parts[2]}: {target}")
        return found

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.unmount()


def test_full_then_read_only_storage_fails_the_stage_cleanly_and_a_later_run_resumes(
    ray_session, finished_run, small_disk, tmp_path, capsys, monkeypatch
):
    """Round 2 of a copy of the session's run, on a tmpfs. (1) The disk fills up mid pseudo-label: the labeling actor
    writes one sidecar, the next fails with ENOSPC. (2) With space again, the disk turns read-only mid select, after
    two of its four sidecars. Each time: exit 2 and one ``error:`` line naming the file, no temporary left, the stage
    not in the manifest. (3) Writable again, the run resumes the stages from the files they had completed."""
    import stages.data.compact
    import stages.pseudo_label
    from pipeline.cli import main
    from pipeline.config import dump_config
    from stages.pseudo_label import SIDECAR_FORMAT
    from stages.storage.artifacts import RoundManifest, read_footer

    cfg, run = copy_finished_run(finished_run, small_disk.path)
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    # in this process: the injections below patch this process's functions (the Ray paths' errors: test_select,
    # test_pseudo_label, test_cluster)
    argv = ["iterate", "--config", str(config), "--run", "r", "--no-progress", "--set", "resources.executor=local"]
    rdir = run / "round-002"
    # A pseudo-label sidecar takes the pages of its round-1 twin (same rows and columns): leave room for one only.
    pages = max(-(-p.stat().st_size // 4096) for p in (run / "round-001" / "pseudo_labels").glob("*.parquet"))
    label, write_table = stages.pseudo_label.label_shards, stages.data.compact.write_table
    left = []

    def fill_then_label(*args, **kwargs):
        left.append(small_disk.fill(leave_pages=pages + (pages - 1) // 2))
        return label(*args, **kwargs)

    def say(text: str) -> None:  # capsys holds the CLI's stderr; these lines go straight to the terminal
        with capsys.disabled():
            print(text)

    def refused(reason: str, folder: str) -> None:
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        stages = list(RoundManifest(rdir).data["stages"])
        temps = list(rdir.rglob(".*.tmp"))
        say(f"observed: {line!r}; round-002 stages recorded {stages}; temporary files {temps}")
        assert line.startswith("error: ") and line.endswith(reason) and str(rdir / folder) in line, line
        assert not temps

    monkeypatch.setattr(stages.pseudo_label, "label_shards", fill_then_label)
    say("\ninjected: the disk filled up at the start of round-002 pseudo_label, room left for one sidecar")
    refused("No space left on device", "pseudo_labels")
    sidecars = sorted((rdir / "pseudo_labels").glob("*.parquet"))
    complete = [read_footer(p, SIDECAR_FORMAT) is not None for p in sidecars]
    say(f"observed: {left[0]} bytes were free; {len(sidecars)}/4 sidecars kept, complete: {complete}")
    assert 1 <= len(sidecars) < 4 and all(complete)
    assert "pseudo_label" not in RoundManifest(rdir).data["stages"]

    small_disk.free()
    monkeypatch.setattr(stages.pseudo_label, "label_shards", label)
    calls = []

    def turn_read_only_on_the_third(table, path, **footer):
        calls.append(path)
        if len(calls) == 3:
            small_disk.read_only(True)
        return write_table(table, path, **footer)

    monkeypatch.setattr(stages.data.compact, "write_table", turn_read_only_on_the_third)
    say("injected: space freed, then the disk remounted read-only before the 3rd of 4 selection sidecars")
    refused("Read-only file system", "selection")
    written = sorted((rdir / "selection").glob("*.parquet"))
    say(f"observed: {len(written)} selection sidecars kept")
    assert len(written) == 2 and "select" not in RoundManifest(rdir).data["stages"]

    small_disk.read_only(False)
    monkeypatch.setattr(stages.data.compact, "write_table", write_table)
    # a compact shard lost after its sidecar was written: that sidecar is not trusted on resume, both are rewritten
    tars = [p.with_suffix(".tar") for p in written if p.with_suffix(".tar").exists()]
    tars[0].unlink()
    say(f"injected: {tars[0].name} deleted after its sidecar was written")
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    observed = check_student_round(run, 2, cfg, expand_shards(cfg.data.unlabeled))
    say(f"observed after the resume on a writable disk: {observed}")
    assert observed["pseudo_label shards resumed"] == len(sidecars) and observed["select shards resumed"] == 1
    assert tars[0].exists()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------- artifacts that no longer match what made them


def _teacher(folder: Path, seed: int) -> Path:
    """A random resnet10t teacher folder for the tiny digits config (``teacher.from_model``)."""
    import torch

    from stages.models.factory import ModelSpec, create_model, model_card, save_model

    torch.manual_seed(seed)
    spec = ModelSpec("resnet10t")
    save_model(create_model(spec, 10, 1, noised=False), folder, model_card(spec, 10, 1, 16, (0.5,), (0.5,)))
    return folder


def _teacher_labels(teacher: Path, shards: list[str]) -> dict[str, int]:
    """Each unlabeled key's argmax under ``teacher``, computed here in memory."""
    from stages.data.shards import decode_image, image_field
    from stages.evaluate import predict_probs
    from stages.models.factory import load_model

    model, card = load_model(teacher)
    samples = [s for shard in shards for s in iter_raw_samples(shard)]
    probs = predict_probs(model, [decode_image(image_field(s), 1) for s in samples], card)
    return {s["__key__"]: int(p) for s, p in zip(samples, probs.argmax(axis=1), strict=True)}


def _pseudo_labels(rdir: Path) -> dict[str, int]:
    tables = [pq.read_table(p) for p in sorted((rdir / "pseudo_labels").glob("*.parquet"))]
    return {k: int(v) for t in tables for k, v in zip(t["key"].to_pylist(), t["label"].to_pylist(), strict=True)}


def test_a_teacher_swapped_under_a_finished_run_relabels_and_reselects(tiny_config, tmp_path, caplog):
    """``teacher.from_model`` replaced at the same path by other weights of the same architecture, then the run
    resumed with the same command: round 0 adopts the new model, round 1 labels every shard again with it (before,
    every old sidecar was re-adopted and the student trained on the old teacher's labels), and the selection follows
    the new labels."""
    from pipeline.rounds import run_pipeline

    teacher = _teacher(tmp_path / "teacher", seed=1)
    cfg = tiny_config(f"teacher.from_model={teacher}", "student.epochs=1", "robustness.corruptions=[]")
    unlabeled = expand_shards(cfg.data.unlabeled)
    run_pipeline(cfg, "swap", progress=False)
    rdir = tmp_path / "runs" / "swap" / "round-001"
    old = _pseudo_labels(rdir)
    assert old == _teacher_labels(teacher, unlabeled)

    _teacher(tmp_path / "other", seed=2)
    (teacher / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_pipeline(cfg, "swap", progress=False)
    new = _pseudo_labels(rdir)
    changed = sum(old[k] != new[k] for k in old)
    print(f"\ninjected: the teacher's weights replaced in place\nobserved: {changed}/{len(old)} labels changed")
    assert new == _teacher_labels(teacher, unlabeled), "round 1 kept labels the new teacher did not give"
    assert changed > 0 and "already labeled" not in caplog.text
    manifest = json.loads((rdir / "manifest.json").read_text())
    assert manifest["stages"]["pseudo_label"]["result"]["shards_resumed"] == 0
    check_student_round(tmp_path / "runs" / "swap", 1, cfg, unlabeled)  # the selection is the new labels'


def test_same_size_damage_left_by_an_interrupted_stage_is_redone(tiny_config, tmp_path):
    """Round 1 interrupted (its stages unrecorded, as after a kill) with one pseudo-label sidecar and one compact
    training tar damaged in place at the same size: the resume labels that one shard again and rewrites that one
    selection, keeps every other file, and ends with the bytes a clean run wrote."""
    from pipeline.rounds import run_pipeline
    from stages.storage.artifacts import RoundManifest

    cfg = tiny_config(
        f"teacher.from_model={_teacher(tmp_path / 'teacher', seed=1)}", "student.epochs=1", "robustness.corruptions=[]"
    )
    run_pipeline(cfg, "damage", progress=False)
    rdir = tmp_path / "runs" / "damage" / "round-001"
    sidecars = sorted((rdir / "pseudo_labels").glob("*.parquet"))
    tars = sorted((rdir / "selection").glob("*.tar"))
    clean = {p: p.read_bytes() for p in [*sidecars, *tars]}
    manifest = RoundManifest(rdir)
    for stage in ("evaluate", "train", "select", "pseudo_label"):
        manifest.forget(stage)
    for path, at in ((sidecars[0], len(clean[sidecars[0]]) // 3), (tars[-1], 1000)):
        data = bytearray(clean[path])
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    print(f"\ninjected: round-001 unrecorded; one byte flipped in {sidecars[0].name} and {tars[-1].name}")
    run_pipeline(cfg, "damage", progress=False)
    stages = RoundManifest(rdir).data["stages"]
    resumed = {s: stages[s]["result"]["shards_resumed"] for s in ("pseudo_label", "select")}
    print(f"observed: shards resumed {resumed} of {len(sidecars)}")
    assert resumed == {"pseudo_label": len(sidecars) - 1, "select": len(sidecars) - 1}
    assert {p: p.read_bytes() for p in clean} == clean, "a damaged file was kept, or a clean one changed"
