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
import itertools
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


WARM_SHARE = 0.25  # ``train_runtime: auto`` keeps a warm trainer only when it holds at most this much of the cluster


def warm_trainer(resources: TrainResources, checkpoints: Location, node: dict, cluster: dict) -> tuple[bool, str]:
    """``(keep a warm trainer, why)`` for a Ray run's training stages. ``node``: the total resources of the node this
    process runs on (the trainer lives there: it reads and writes the run's local checkpoints); ``cluster``: the
    cluster's. ``warm`` that cannot be kept is a ``ConfigError``; ``auto`` keeps one only when it is cheap for the
    other stages: the labeling and evaluation pools, sized from what it leaves, lose at most ``WARM_SHARE``."""
    if resources.runtime == "ray_train":
        return False, "resources.train_runtime: ray_train"
    need = resources.per_worker()
    why_not = ""
    if resources.workers != 1:
        why_not = f"{resources.workers} training workers (DDP runs on Ray Train)"
    elif is_url(checkpoints):
        why_not = "checkpoints in an object store"
    elif any(node.get(k, 0) < v for k, v in need.items()):
        why_not = f"this node has {_describe(node, need)}, the training worker needs {_describe(need, need)}"
    if resources.runtime == "warm":
        if why_not:
            raise ConfigError(f"resources.train_runtime: warm cannot keep a training actor here: {why_not}")
        return True, "resources.train_runtime: warm"
    if why_not:
        return False, why_not
    shares = {k: v / cluster[k] for k, v in need.items() if cluster.get(k)}
    kind, share = max(shares.items(), key=lambda kv: kv[1])
    if share > WARM_SHARE:
        return False, f"a kept trainer would hold {share:.0%} of the cluster's {kind}s, which labeling needs"
    return True, f"one worker holding {share:.0%} of the cluster's {kind}s (at most {WARM_SHARE:.0%})"


def pool_on_trainer(trainer: TrainResources, pool: LabelResources, room: dict, grows: bool) -> tuple[bool, str]:
    """``(run the pool on the warm trainer, why)``: a labeling or evaluation pool runs in the run's warm trainer, which
    sits idle between fits, instead of starting actors, when the trainer holds what one pool actor needs and the pool
    would be that one actor anyway: ``label_actors: 1``, or an autoscaling pool with ``room`` (what the trainer
    leaves) for one actor on a cluster that cannot ``grow``. It then starts nothing; a larger pool is left to Ray
    Data, as its actors are more workers than the trainer is."""
    held = trainer.per_worker()
    if not pool.fits([held]):
        need = {"CPU": pool.cpus_per_actor} | ({"GPU": pool.gpus_per_actor} if pool.gpus_per_actor else {})
        return False, f"the trainer holds {_describe(held, need)}, a pool actor needs {_describe(need, need)}"
    if pool.actors > 1:
        return False, f"a fixed pool of {pool.actors} actors (resources.label_actors)"
    if not pool.actors:
        if grows:
            return False, "an autoscaling pool on a cluster that may grow"
        if (count := pool.actor_count(room)) > 1:
            return False, f"room for {count} pool actors beside the trainer"
    return True, "a pool of one actor, which the trainer is already"


def _describe(resources: dict, keys: dict) -> str:
    return " and ".join(f"{resources.get(k, 0):g} {k}s" for k in keys)


class RayExecutor:
    """Ray tasks, a Ray Data actor pool, Ray Train or a warm training actor (``init_ray`` must have been called).

    A warm trainer (``warm_trainer``) is made by the first ``fit`` that keeps one and trains every later stage of
    the run; while it lives, the pools are sized and checked against what it leaves (``room``), and a pool that would
    be one actor runs on the trainer itself (``pool_on_trainer``)."""

    kind = "ray"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self._trainer = None  # (actor handle, its TrainResources, its node id) once a warm trainer is kept
        self._decided: tuple[TrainResources, bool] | None = None  # the last fit's resources and whether it kept one

    def room(self) -> dict[str, float]:
        """The cluster's resources less what a warm trainer holds."""
        import ray

        cluster = dict(ray.cluster_resources())
        held = self._trainer[1].per_worker() if self._trainer else {}
        return {k: v - held.get(k, 0) for k, v in cluster.items()}

    def _held_on(self) -> tuple[str, dict[str, float]]:
        """``(node id, resources)`` a warm trainer holds (``("", {})`` without one)."""
        return (self._trainer[2], self._trainer[1].per_worker()) if self._trainer else ("", {})

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
        (autoscaling or fixed, CPUs and GPUs per actor), or on the run's warm trainer when that pool would be one
        actor (``pool_on_trainer``). An actor that fits on no node is refused first (``check_room``). Leaving the
        block ends the dataset's execution, so no actor works on in the background."""
        room = self.room()
        if self._trainer is not None:
            hosted, why = pool_on_trainer(self._trainer[1], resources, room, can_grow())
            log.info("%s workers: %s (%s)", cls.__name__, "on the warm trainer" if hosted else "a Ray Data pool", why)
            if hosted:
                try:
                    yield self._on_trainer(cls, kwargs, items, resources)
                finally:
                    self._end_hosted()
                return
        worker_kwargs = {"cls": cls, "kwargs": kwargs | {"threads": resources.torch_threads(), "decode_threads": 0}}
        ds = _item_dataset(items, resources, self._held_on())
        ds = _on_actors(ds, _PoolWorker, worker_kwargs, 1, resources, len(items), room)
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
        ds = _item_dataset(items, resources, self._held_on())
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
        ds = _on_actors(ds, _BatchWorker, worker_kwargs, batch_size, resources, len(items), self.room())
        with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
            yield (_batch_result(batch) for batch in batches)

    def fit(
        self, train: Callable[[object], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        """Fit (or resume) one model: on the run's warm trainer when it keeps one (``warm_trainer``, decided at the
        first fit and logged), else through Ray Train (``fit_ray_train``)."""
        if self._keeps_warm(resources, checkpoints):
            return self._fit_warm(train, name, checkpoints, resources, out)
        return self.fit_ray_train(train, name, checkpoints, resources, out)

    def _keeps_warm(self, resources: TrainResources, checkpoints: Location) -> bool:
        import ray

        if self._decided is None or self._decided[0] != resources:
            here = ray.get_runtime_context().get_node_id()
            node = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
            keep, why = warm_trainer(resources, checkpoints, node, dict(ray.cluster_resources()))
            log.info("training runtime: %s (%s)", "one warm training actor for the run" if keep else "Ray Train", why)
            self._decided = (resources, keep)
        return self._decided[1]

    def _fit_warm(
        self, train: Callable[[object], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        """``train`` on the run's ``WarmTrainer`` (made here the first time, on this node, holding one worker's
        resources): ``InProcess.fit`` in that actor, checkpoints under ``checkpoints/name`` as ``LocalHooks`` keeps
        them. Ray restarts a killed trainer and retries the call up to ``max_failures`` times, and the retry resumes
        from the last checkpoint. A trainer that was restarted is not kept: the next stage gets a fresh one, with a
        whole ``max_failures`` of its own, as each Ray Train fit has."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._trainer is not None and self._trainer[1] != resources:
            self.close()
        if self._trainer is None:
            here = ray.get_runtime_context().get_node_id()
            actor = (
                ray.remote(WarmTrainer)
                .options(
                    num_cpus=resources.cpus_per_worker,
                    num_gpus=resources.gpus_per_worker if resources.use_gpu else 0,
                    max_restarts=resources.max_failures,
                    max_task_retries=resources.max_failures,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                )
                .remote(resources.use_gpu)
            )
            self._trainer = (actor, resources, here)
        actor = self._trainer[0]
        metrics = self._from_trainer(actor.fit.remote(train, name, str(checkpoints), str(out)), f"training {name}")
        self._close_if_restarted()
        return metrics

    def _close_if_restarted(self) -> None:
        """A trainer Ray restarted during a stage is not kept: the next stage gets a fresh one, with a whole
        ``max_failures`` of its own."""
        import ray

        if ray.get(self._trainer[0].restarted.remote()):
            self.close()

    def _from_trainer(self, ref, what: str):
        """The result of a warm trainer's call: its exception as itself; a trainer that died more often than Ray
        restarts it (``max_failures``) is dropped and reported in one line."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as exc:
            raise _unwrapped(exc) from None
        except RayActorError as exc:
            failures = self._trainer[1].max_failures
            self._trainer = None
            raise RuntimeError(
                f"{what}: the training actor died {failures + 1} times (resources.max_failures {failures}); "
                "see the worker log above"
            ) from exc

    def _on_trainer(self, cls: type, kwargs: dict, items: list[dict], resources: LabelResources) -> Iterator[dict]:
        """``cls(**kwargs).process(**item)`` for every item on the warm trainer (one worker made there, kept for the
        pool), two calls in flight; results in order. A killed trainer is restarted by Ray and its calls retried
        (``max_failures``), the worker made again in the new process: each item's result comes once."""
        import ray

        actor, trainer, _ = self._trainer
        threads = resources.threads or max(1, int(trainer.cpus_per_worker))
        spec = [ray.put((cls, kwargs | {"threads": threads, "decode_threads": 0}))]  # in a list: not resolved per call
        key = os.urandom(8).hex()
        todo, pending = iter(items), []
        for item in itertools.islice(todo, 2):
            pending.append(actor.process.remote(key, spec, pickle.dumps(item)))
        while pending:
            outcome = self._from_trainer(pending.pop(0), f"{cls.__name__} on the warm trainer")
            if (item := next(todo, None)) is not None:
                pending.append(actor.process.remote(key, spec, pickle.dumps(item)))
            yield _result({"outcome": outcome})

    def _end_hosted(self) -> None:
        """After a pool on the warm trainer: its worker (and model) dropped; a trainer Ray restarted is not kept."""
        import ray
        from ray.exceptions import RayActorError

        if self._trainer is None:
            return
        try:
            ray.get(self._trainer[0].end_pool.remote())
            self._close_if_restarted()
        except RayActorError:
            self._trainer = None

    def close(self) -> None:
        """Ends the warm trainer (if any): its resources go back to the cluster."""
        import ray

        if self._trainer is not None:
            ray.kill(self._trainer[0])
            self._trainer = None

    def fit_ray_train(
        self, train: Callable[[object], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        """Fit (or resume) one model through Ray Train: ``TorchTrainer`` runs ``train(RayHooks())`` on every worker;
        checkpoints go through ``ray.train.report`` into ``checkpoints/name`` (a fixed name, so a re-run resumes from
        the last one; Ray restores it after a worker failure, ``FailureConfig``). On an object-store run the
        checkpoints go through the same fsspec filesystem as every other file."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        path, filesystem_ = ray_storage(str(checkpoints))
        per_worker = resources.per_worker()
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


class WarmTrainer:
    """A Ray actor that trains a run's stages one after another in one process: the worker start, imports and CUDA
    context are paid once per run, not once per stage (``RayExecutor._fit_warm``)."""

    def __init__(self, use_gpu: bool) -> None:
        import stages.train  # noqa: F401 - the imports every fit needs, paid here once

        _worker_logging()
        self.device = "cuda" if use_gpu else "cpu"
        self._pool: tuple[str, _PoolWorker] | None = None  # (pool key, the pool's worker) while it hosts a pool

    def fit(self, train: Callable[[object], dict], name: str, checkpoints: str, out: str) -> dict:
        try:
            return InProcess(progress=False).fit(
                train, name, checkpoints, TrainResources(use_gpu=self.device == "cuda"), Path(out)
            )
        finally:
            self._free_gpu()  # the label actors that come next may share this GPU

    def process(self, key: str, spec: list, item: bytes) -> bytes:
        """One pool item (``RayExecutor._on_trainer``); the pool's worker is made at its first item, here or again
        in a restarted process."""
        if self._pool is None or self._pool[0] != key:
            import ray

            self._pool = None  # an earlier pool's worker and model go before the next is made
            self._pool = (key, _PoolWorker(*ray.get(spec[0])))
        return self._pool[1]({"item": np.array([item], dtype=object)})["outcome"][0]

    def end_pool(self) -> None:
        self._pool = None
        self._free_gpu()

    def _free_gpu(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def restarted(self) -> bool:
        import warnings

        import ray

        with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated ``actor_id``
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray.get_runtime_context().was_current_actor_reconstructed


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


def _item_dataset(items: list[dict], resources: LabelResources, held: tuple[str, dict[str, float]]):
    """The items as a Ray Data dataset, one block each (pickled: any Python value), after ``check_room``, with Ray
    Data's own progress output off (the stages draw their own bars, counting shards and images)."""
    import ray

    check_room(resources, held)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray.data.from_items([{"item": pickle.dumps(i)} for i in items], override_num_blocks=max(1, len(items)))


def _on_actors(
    ds, udf: type, constructor_kwargs: dict, batch_size: int, resources: LabelResources, items: int, room: dict
):
    """``ds`` through a Ray Data actor pool of ``udf``, sized by ``resources`` for ``items`` items and the cluster's
    ``room`` (``RayExecutor.room``)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        udf,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(**resources.pool(room, items)),
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


def _worker_logging() -> None:
    """INFO lines to the driver (Ray forwards a worker's output), without Ray Train's line per report."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietReports())


def _train_func(config: dict) -> None:
    _worker_logging()
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


def check_room(resources: LabelResources, held: tuple[str, dict[str, float]] = ("", {})) -> None:
    """A label actor that fits on no node waits for the autoscaler to add one; on a local Ray that this process
    started, nothing ever will, so that is one ``ConfigError`` line instead of a stage that waits forever. ``held``:
    ``(node id, resources)`` a warm trainer holds for the run, not the pool's."""
    import ray

    at, kept = held
    nodes = [
        {k: v - kept.get(k, 0) for k, v in node["Resources"].items()} if node["NodeID"] == at else node["Resources"]
        for node in ray.nodes()
        if node.get("Alive")
    ]
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
    if kept:
        largest += " free beside the run's warm trainer (resources.train_runtime: ray_train does not keep one)"
    if not can_grow():
        raise ConfigError(
            f"resources: a label actor needs {resources.describe()} (cpus_per_label_actor, gpus_per_label_actor), "
            f"but this local Ray's largest node has {largest}; lower them, or join a cluster with such nodes "
            "(RAY_ADDRESS)"
        )
    log.warning("no node has %s for a label actor yet; waiting for the autoscaler", resources.describe())
