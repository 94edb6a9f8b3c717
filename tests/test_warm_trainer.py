"""The warm training actor of a Ray run (``resources.train_runtime``): when it is kept (a pure rule), that it trains
every stage in one process, that the pools are sized and checked against what it leaves, and that a pool of one
actor runs on it (another pure rule). The killed-trainer faults (training, labeling) are in ``tests/test_faults.py``."""

from __future__ import annotations

import pytest

from pipeline.distributed.executor import RayExecutor, check_room, pool_on_trainer, warm_trainer
from stages.core.errors import ConfigError
from stages.core.stage import LabelResources, TrainResources

CPU16 = {"CPU": 16.0}
GPU8 = {"CPU": 64.0, "GPU": 8.0}


@pytest.mark.parametrize(
    ("resources", "checkpoints", "node", "cluster", "kept", "why"),
    [
        (TrainResources(runtime="ray_train"), "/r", CPU16, CPU16, False, "resources.train_runtime: ray_train"),
        (TrainResources(runtime="warm"), "/r", {"CPU": 2.0}, {"CPU": 2.0}, True, "resources.train_runtime: warm"),
        (TrainResources(runtime="auto"), "/r", CPU16, CPU16, True, "holding 6% of the cluster's CPUs"),
        (TrainResources(runtime="auto"), "/r", {"CPU": 2.0}, {"CPU": 2.0}, False, "hold 50% of the cluster's CPUs"),
        (TrainResources(runtime="auto", use_gpu=True), "/r", GPU8, GPU8, True, "holding 12% of the cluster's GPUs"),
        (TrainResources(runtime="auto", use_gpu=True), "/r", CPU16 | {"GPU": 1.0}, CPU16 | {"GPU": 1.0}, False, "100%"),
        (
            TrainResources(runtime="auto", use_gpu=True, gpus_per_worker=0.25),
            "/r",
            CPU16 | {"GPU": 1.0},
            CPU16 | {"GPU": 1.0},
            True,
            "holding 25% of the cluster's GPUs",
        ),
        (TrainResources(runtime="auto"), "s3://b/r", CPU16, CPU16, False, "checkpoints in an object store"),
        (TrainResources(runtime="auto", workers=2), "/r", CPU16, CPU16, False, "2 training workers (DDP"),
        (
            TrainResources(runtime="auto", use_gpu=True),
            "/r",
            CPU16,
            GPU8,
            False,
            "this node has 16 CPUs and 0 GPUs, the training worker needs 1 CPUs and 1 GPUs",
        ),
    ],
)
def test_when_a_warm_trainer_is_kept(resources, checkpoints, node, cluster, kept, why):
    decided, reason = warm_trainer(resources, checkpoints, node, cluster)
    assert decided is kept and why in reason


def test_a_warm_trainer_that_cannot_be_kept_is_one_line():
    with pytest.raises(ConfigError) as info:
        warm_trainer(TrainResources(runtime="warm", use_gpu=True), "/r", CPU16, GPU8)
    assert str(info.value) == (
        "resources.train_runtime: warm cannot keep a training actor here: this node has 16 CPUs and 0 GPUs, "
        "the training worker needs 1 CPUs and 1 GPUs"
    )
    with pytest.raises(ConfigError, match="object store"):
        warm_trainer(TrainResources(runtime="warm"), "gs://b/r", CPU16, CPU16)


def test_a_warm_trainer_trains_every_stage_in_one_process_and_the_pools_get_the_rest(ray_session, tmp_path):
    def fit(hooks):  # defined here: pickled by value into the actor
        import os
        import tempfile
        from pathlib import Path

        resumed = hooks.restore() is not None
        ckpt = Path(tempfile.mkdtemp())
        (ckpt / "model.safetensors").write_bytes(b"weights")
        hooks.report({"epoch": 2 if resumed else 1}, ckpt)
        return {"pid": os.getpid(), "device": str(hooks.device), "resumed": resumed}

    executor = RayExecutor(False)
    resources = TrainResources(runtime="warm")
    first = executor.fit(fit, "teacher", str(tmp_path / "ckpt"), resources, tmp_path / "a")
    assert executor.room()["CPU"] == 1.0  # of the session's 2: the trainer holds one for the run
    with pytest.raises(ConfigError, match="free beside the run's warm trainer"):
        check_room(LabelResources(cpus_per_actor=2.0), executor._held_on())
    check_room(LabelResources(cpus_per_actor=1.0), executor._held_on())
    second = executor.fit(fit, "student", str(tmp_path / "ckpt"), resources, tmp_path / "b")
    print(f"\nobserved: teacher in pid {first['pid']}, student in pid {second['pid']}")
    assert first["pid"] == second["pid"] and first["device"] == "cpu"
    assert (tmp_path / "b" / "final-model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "ckpt" / "student" / "epoch-0001").is_dir()  # LocalHooks' layout: a re-run resumes from it
    assert not first["resumed"] and not second["resumed"]
    executor.close()
    assert executor.room()["CPU"] == 2.0
    again = RayExecutor(False).fit(fit, "teacher", str(tmp_path / "ckpt"), resources, tmp_path / "d")
    assert again["resumed"], "a new driver's trainer did not find the stage's checkpoint"
    ray_train = RayExecutor(False)
    ray_train.fit(fit, "plain", str(tmp_path / "rt"), TrainResources(runtime="ray_train"), tmp_path / "c")
    assert ray_train.room()["CPU"] == 2.0 and (tmp_path / "c" / "final-model.safetensors").exists()


GPU_HALF = TrainResources(use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=4.0)


@pytest.mark.parametrize(
    ("trainer", "pool", "room", "grows", "hosted", "why"),
    [
        (TrainResources(), LabelResources(), {"CPU": 1.0}, False, True, "a pool of one actor"),
        (TrainResources(), LabelResources(), {"CPU": 3.0}, False, False, "room for 3 pool actors beside the trainer"),
        (TrainResources(), LabelResources(), {"CPU": 1.0}, True, False, "a cluster that may grow"),
        (TrainResources(), LabelResources(actors=1), {"CPU": 15.0}, True, True, "a pool of one actor"),
        (TrainResources(), LabelResources(actors=2), {"CPU": 1.0}, False, False, "a fixed pool of 2 actors"),
        (TrainResources(), LabelResources(cpus_per_actor=2.0), {"CPU": 2.0}, False, False, "holds 1 CPUs, a pool"),
        (GPU_HALF, LabelResources(gpus_per_actor=0.5), {"CPU": 12.0, "GPU": 0.5}, False, True, "a pool of one"),
        (GPU_HALF, LabelResources(gpus_per_actor=0.25), {"CPU": 12.0, "GPU": 0.5}, False, False, "room for 2"),
        (TrainResources(), LabelResources(gpus_per_actor=1.0), {"CPU": 1.0, "GPU": 1.0}, False, False, "0 GPUs"),
    ],
)
def test_when_a_pool_runs_on_the_warm_trainer(trainer, pool, room, grows, hosted, why):
    decided, reason = pool_on_trainer(trainer, pool, room, grows)
    assert decided is hosted and why in reason


def test_a_pool_of_one_actor_runs_on_the_warm_trainer_and_a_larger_one_on_ray_data(ray_session, tmp_path):
    def fit(hooks):  # defined here: pickled by value into the actor
        import os
        import tempfile
        from pathlib import Path

        ckpt = Path(tempfile.mkdtemp())
        (ckpt / "model.safetensors").write_bytes(b"weights")
        hooks.report({"epoch": 1}, ckpt)
        return {"pid": os.getpid()}

    class Pid:
        """A pool worker that reports the process it ran in (defined here: pickled by value)."""

        def __init__(self, fail: str = "", threads: int = 0, decode_threads: int = 0) -> None:
            self.fail, self.threads = fail, threads

        def process(self, n: int) -> dict:
            import os

            if str(n) == self.fail:
                raise ValueError(f"item {n} is bad")
            return {"n": n, "pid": os.getpid(), "threads": self.threads}

    executor = RayExecutor(False)
    trainer_pid = executor.fit(fit, "teacher", str(tmp_path / "ckpt"), TrainResources(runtime="warm"), tmp_path / "a")[
        "pid"
    ]
    items = [{"n": n} for n in range(5)]
    with executor.pool(Pid, {}, items, LabelResources()) as results:
        hosted = list(results)
    assert [r["n"] for r in hosted] == list(range(5)) and {r["pid"] for r in hosted} == {trainer_pid}
    assert hosted[0]["threads"] == 1  # the trainer's one CPU
    with (
        pytest.raises(ValueError, match="item 3 is bad"),
        executor.pool(Pid, {"fail": "3"}, items, LabelResources()) as results,
    ):
        list(results)
    with executor.pool(Pid, {}, items, LabelResources(actors=2)) as results:
        pooled = list(results)
    pids = [r["pid"] for r in pooled]
    print(f"\nobserved: trainer pid {trainer_pid}; one-actor pool {hosted[0]['pid']}; two-actor pool {pids}")
    assert sorted(r["n"] for r in pooled) == list(range(5)) and trainer_pid not in {r["pid"] for r in pooled}
    assert (
        executor.fit(fit, "student", str(tmp_path / "ckpt"), TrainResources(runtime="warm"), tmp_path / "b")["pid"]
        == trainer_pid
    ), "the trainer was not kept after hosting a pool"
    executor.close()
