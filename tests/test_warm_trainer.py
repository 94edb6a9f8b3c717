"""The warm training actor of a Ray run (``resources.train_runtime``): when it is kept (a pure rule), that it trains
every stage in one process, and that the pools are sized and checked against what it leaves. The killed-trainer
fault is in ``tests/test_faults.py``."""

from __future__ import annotations

import pytest

from pipeline.distributed.executor import RayExecutor, check_room, warm_trainer
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
