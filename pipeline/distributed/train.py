"""The training stage on Ray Train: ``TorchTrainer`` runs ``stages.train.train_model`` on every worker.

Checkpoints go through ``ray.train.report`` into ``<run>/ray_train/<round>``; Ray restores the latest one
after a worker failure (``FailureConfig``), and because each round's Ray Train run has a fixed name under the
run's storage, re-running the pipeline after the driver died resumes that round from its last checkpoint.
On an object-store run the checkpoints go to the same URL through the same fsspec filesystem as every other file
(``storage_filesystem``), so Ray Train uses the credentials and endpoint the rest of the run uses.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.config import TrainResources
from stages.storage.files import filesystem, is_url, local_path
from stages.train import TrainPlan, train_model

log = logging.getLogger(__name__)


class RayHooks:
    """``TrainHooks`` backed by the Ray Train context of the current worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._scratch = Path(tempfile.mkdtemp(prefix="ns-restore-"))

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model.to(self.device)

    def restore(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            shutil.copytree(path, self._scratch / "ckpt", dirs_exist_ok=True)
        return self._scratch / "ckpt"

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _train_func(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    # Ray Train logs every checkpoint and report at INFO; our own per-epoch line says what a user needs.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray 2.60 logs each ray.train.report at INFO through a logger named by its file path, not "ray.train".
    from ray.train.v2._internal.execution import context as _train_context

    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    train_model(config["plan"], RayHooks())


def ray_storage(storage_path: str) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: a local folder as it is; a URL as its path inside
    a pyarrow wrapper of the fsspec filesystem that opens it (Ray would otherwise pick pyarrow's own S3/GCS client,
    with its own idea of endpoint and credentials, and knows no other protocol)."""
    if not is_url(storage_path):
        return str(local_path(storage_path)), None
    import pyarrow.fs

    fs, path = filesystem(storage_path)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_training(plan: TrainPlan, storage_path: str, name: str, resources: TrainResources, out_dir: Path) -> dict:
    """Fit (or resume) one model through Ray Train; copies the final checkpoint's files into ``out_dir``
    (node-local scratch). ``storage_path``: a local folder or a URL, where the checkpoints live."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path, filesystem_ = ray_storage(storage_path)
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})}
    trainer = TorchTrainer(
        _train_func,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=filesystem_,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=resources.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {name}: Ray Train finished without a checkpoint (see the worker log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as path:
        for name_ in ("model.safetensors", "ema.safetensors", "state.json"):
            if (Path(path) / name_).exists():
                shutil.copy2(Path(path) / name_, out_dir / f"final-{name_}")
    return dict(result.metrics or {})
