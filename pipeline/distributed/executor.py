"""Where a run's work runs, decided once: in this process (``stages.core.stage.InProcess``) or on Ray
(``RayExecutor``): Ray tasks for per-shard work, a Ray Data actor pool for model workers, Ray Train for training.

``choose_executor`` is the one rule, applied once per run before any work: a run that joined a cluster
(``RAY_ADDRESS`` or ``resources.address``), asks for GPUs, keeps its shards or its storage in an object store, or
reads more than ``INLINE_BYTES`` of shards runs on Ray; a small local run (the digits default: about 1 MB of shards)
runs in this process, where Ray's start-up (seconds per worker group and actor pool, ~24 s of a digits round on 2
cores) would cost more than the work. ``resources.executor: ray`` or ``local`` overrides it; the choice and its reason
are logged and recorded in ``run.json``.

Errors come back as themselves. A Ray task's exception is unwrapped from ``RayTaskError``; a pool worker's is caught
in the worker and re-raised in the driver (Ray Data would otherwise turn it into a ``UserCodeException`` that no
longer holds the original), with the remote traceback kept as a note. So a ``DataError`` raised while decoding a
shard on a remote node reaches the CLI as a ``DataError``: one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.distributed.runtime import can_grow
from stages.core.errors import ConfigError
from stages.core.stage import Executor, InProcess, LabelResources, TrainResources, copy_final
from stages.storage.files import Location, filesystem, is_url, local_path

log = logging.getLogger(__name__)

INLINE_BYTES = 64 << 20  # below this much local shard data (and no cluster, no GPU) a run stays in this process


def choose_executor(
    mode: str,
    address: str,
    gpus: bool,
    shards: Sequence[str],
    storage: str = "",
    progress: bool = True,
    inline_bytes: int = INLINE_BYTES,
) -> tuple[Executor, str]:
    """``(executor, reason)`` for a run: ``mode`` ``local``, ``ray`` or ``auto`` (the rule in the module doc)."""
    if mode == "local":
        return InProcess(progress), "resources.executor: local"
    if mode == "ray":
        return RayExecutor(progress), "resources.executor: ray"
    if address or os.environ.get("RAY_ADDRESS"):
        return RayExecutor(progress), "joined a Ray cluster"
    if gpus:
        return RayExecutor(progress), "GPUs asked for (resources.use_gpu or gpus_per_label_actor)"
    if any(map(is_url, shards)) or is_url(storage):
        return RayExecutor(progress), "shards or run storage in an object store"
    total = sum(os.path.getsize(local_path(s)) for s in shards)
    if total >= inline_bytes:
        return RayExecutor(progress), f"{total / 2**20:.0f} MB of shards (>= {inline_bytes >> 20} MB)"
    return InProcess(progress), f"{total / 2**20:.1f} MB of local shards, no cluster, no GPU"


class RayExecutor:
    """Ray tasks, a Ray Data actor pool, Ray Train (``init_ray`` must have been called)."""

    kind = "ray"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn: Callable, args: Iterable[tuple], total: int, desc: str) -> Iterator:
        """``fn(*a)`` as Ray tasks (1 CPU each, retried on worker death), a bounded number in flight; results as
        they finish. A task's exception is raised here as itself."""
        import ray
        from ray.exceptions import RayTaskError

        remote = ray.remote(num_cpus=1, max_retries=3)(fn)
        window = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
        pending: list = []
        bar = tqdm(total=total, unit="shard", desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False)

        def finished():
            nonlocal pending
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(1)
            try:
                return ray.get(done[0])
            except RayTaskError as exc:
                raise _unwrapped(exc) from None

        try:
            for a in args:
                pending.append(remote.remote(*a))
                if len(pending) >= window:
                    yield finished()
            while pending:
                yield finished()
        finally:  # a failed task (e.g. a full disk) stops the pass: the tasks still in flight are not left writing
            for ref in pending:
                ray.cancel(ref)
            bar.close()

    def share(self, obj):
        import ray

        return ray.put(obj)

    @contextlib.contextmanager
    def pool(self, cls: type, kwargs: dict, items: list[dict], resources: LabelResources) -> Iterator[Iterator[dict]]:
        """Streams ``items`` through a Ray Data pool of ``cls`` workers, sized and placed by ``resources``
        (autoscaling or fixed, CPUs and GPUs per actor). An actor that fits on no node is refused first
        (``check_room``). Leaving the block ends the dataset's execution, so no actor works on in the background."""
        worker_kwargs = {"cls": cls, "kwargs": kwargs | {"threads": resources.torch_threads(), "decode_threads": 0}}
        ds = _on_actors(_item_dataset(items, resources), _PoolWorker, worker_kwargs, 1, resources, len(items))
        with contextlib.closing(iter(ds.iter_rows())) as rows:
            yield (_result(row) for row in rows)

    @contextlib.contextmanager
    def stream(
        self,
        decode: Callable[..., Iterator[dict]],
        items: list[dict],
        cls: type,
        kwargs: dict,
        resources: LabelResources,
        batch_size: int,
        decode_bytes: int,
    ) -> Iterator[Iterator[dict]]:
        """Ray's batch-inference pattern: ``decode`` as CPU tasks of ``resources.decode_cpus`` and ``decode_bytes``
        of memory each, on any node, streamed with backpressure into a Ray Data pool of ``cls`` workers (sized and
        placed as in ``pool``) that take ``batch_size`` rows at a time. A killed decode task is retried, a killed
        worker restarted and its batch retried: rows may come twice, never not at all. A worker's exception is
        raised here as itself."""
        threads = max(1, int(resources.decode_cpus))
        ds = _item_dataset(items, resources)
        # Reserving the decode tasks' memory also keeps Ray Data from fusing them into the actors (it fuses a task
        # stage into the actor stage after it when their resources match, as CPU actors' do).
        ds = ds.map_batches(
            _decode_task,
            fn_kwargs={"decode": decode, "threads": threads},
            batch_size=1,
            num_cpus=resources.decode_cpus,
            memory=decode_bytes,
        )
        worker_kwargs = {"cls": cls, "kwargs": kwargs | {"threads": resources.torch_threads()}}
        ds = _on_actors(ds, _BatchWorker, worker_kwargs, batch_size, resources, len(items))
        with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
            yield (_batch_result(batch) for batch in batches)

    def fit(
        self, train: Callable[[object], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        """Fit (or resume) one model through Ray Train: ``TorchTrainer`` runs ``train(RayHooks())`` on every worker;
        checkpoints go through ``ray.train.report`` into ``checkpoints/name`` (a fixed name, so a re-run resumes from
        the last one; Ray restores it after a worker failure, ``FailureConfig``). On an object-store run the
        checkpoints go through the same fsspec filesystem as every other file."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        path, filesystem_ = ray_storage(str(checkpoints))
        per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})}
        trainer = TorchTrainer(
            _train_func,
            train_loop_config={"train": train},
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
        with result.checkpoint.as_directory() as final:
            copy_final(Path(final), out)
        return dict(result.metrics or {})


class _PoolWorker:
    """The Ray Data face of a ``stages.core.stage.Worker``: one pickled item in, one pickled outcome out (the result,
    or the exception it raised, re-raised by the driver as itself)."""

    def __init__(self, cls: type, kwargs: dict) -> None:
        self.worker = cls(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for blob in batch["item"]:
            try:
                outcomes.append(pickle.dumps(("ok", self.worker.process(**pickle.loads(blob)))))
            except Exception as exc:  # noqa: BLE001 - every error goes back whole; the driver decides
                outcomes.append(pickle.dumps(("error", _with_traceback(exc))))
        return {"outcome": np.array(outcomes, dtype=object)}


def _item_dataset(items: list[dict], resources: LabelResources):
    """The items as a Ray Data dataset, one block each (pickled: any Python value), after ``check_room``, with Ray
    Data's own progress output off (the stages draw their own bars, counting shards and images)."""
    import ray

    check_room(resources)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray.data.from_items([{"item": pickle.dumps(i)} for i in items], override_num_blocks=max(1, len(items)))


def _on_actors(ds, udf: type, constructor_kwargs: dict, batch_size: int, resources: LabelResources, items: int):
    """``ds`` through a Ray Data actor pool of ``udf``, sized and placed by ``resources`` for ``items`` items."""
    import ray
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        udf,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(**resources.pool(ray.cluster_resources(), items)),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )


def _decode_task(batch: dict[str, np.ndarray], decode: Callable[..., Iterator[dict]], threads: int) -> Iterator[dict]:
    """A Ray Data task: every item of its batch (one) decoded into column batches, yielded as they come."""
    for blob in batch["item"]:
        yield from decode(**pickle.loads(blob), threads=threads)


class _BatchWorker:
    """The Ray Data face of a stream worker: a column batch in, the worker's column batch out, or the exception it
    raised as a one-row ``__error__`` batch (the last operator: no later one has to take its columns)."""

    def __init__(self, cls: type, kwargs: dict) -> None:
        self.worker = cls(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self.worker(batch)
        except Exception as exc:  # noqa: BLE001 - goes back whole; the driver raises it
            return {"__error__": np.array([pickle.dumps(_with_traceback(exc))], dtype=object)}


def _with_traceback(exc: Exception) -> Exception:
    """``exc`` with its traceback in the worker as a note: the driver raises it as itself, far from where it was."""
    exc.add_note("in a pool worker:\n" + "".join(traceback.format_exception(exc)))
    return exc


def _batch_result(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "__error__" in batch:
        raise pickle.loads(batch["__error__"][0])
    return batch


def _result(row: dict) -> dict:
    kind, value = pickle.loads(row["outcome"])
    if kind == "error":
        raise value
    return value


def _unwrapped(exc) -> BaseException:
    """A Ray task's own exception, with the remote traceback as a note (Ray's wrapper when there is none)."""
    cause = getattr(exc, "cause", None)
    if cause is None:
        return exc
    cause.add_note(f"in a Ray task:\n{exc}")
    return cause


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


class _QuietReports(logging.Filter):
    """Drops Ray Train 2.60's INFO line for each ``ray.train.report`` (logged through a logger named by its source
    file, not under ``ray.train``); our own per-epoch line says what a user needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and "ray/train" in record.name.replace(os.sep, "/"))


def _train_func(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietReports())
    config["train"](RayHooks())


def ray_storage(storage_path: str) -> tuple[str, object | None]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: a local folder as it is; a URL as its path inside
    a pyarrow wrapper of the fsspec filesystem that opens it (Ray would otherwise pick pyarrow's own S3/GCS client,
    with its own idea of endpoint and credentials, and knows no other protocol)."""
    if not is_url(storage_path):
        return str(local_path(storage_path)), None
    import pyarrow.fs

    fs, path = filesystem(storage_path)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def check_room(resources: LabelResources) -> None:
    """A label actor that fits on no node waits for the autoscaler to add one; on a local Ray that this process
    started, nothing ever will, so that is one ``ConfigError`` line instead of a stage that waits forever."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    cpus = sum(node.get("CPU", 0) for node in nodes)
    fixed = resources.actors * resources.cpus_per_actor
    if resources.reserved_cpus() and fixed and fixed + resources.reserved_cpus() > cpus and not can_grow():
        raise ConfigError(
            f"resources: {resources.actors} label actors of {resources.cpus_per_actor:g} CPUs leave none of this "
            f"local Ray's {cpus:g} CPUs to the decode tasks (label_decode: tasks, label_decode_cpus "
            f"{resources.decode_cpus:g}); use fewer actors, or label_decode: cpu"
        )
    if resources.fits(nodes):
        return
    big = max(nodes, key=lambda n: (n.get("CPU", 0), n.get("GPU", 0)), default={})
    largest = f"{big.get('CPU', 0):g} CPUs and {big.get('GPU', 0):g} GPUs"
    if not can_grow():
        raise ConfigError(
            f"resources: a label actor needs {resources.describe()} (cpus_per_label_actor, gpus_per_label_actor), "
            f"but this local Ray's largest node has {largest}; lower them, or join a cluster with such nodes "
            "(RAY_ADDRESS)"
        )
    log.warning("no node has %s for a label actor yet; waiting for the autoscaler", resources.describe())
