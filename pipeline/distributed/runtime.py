"""Starting or joining Ray: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set (or an address in config) joins that cluster; otherwise a local Ray is started with its
dashboard bound to 127.0.0.1. Token authentication, on by default in Ray 2.60, is left on: a fresh local
Ray writes its token to ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and clients read it from there.

Also the small Ray edges the stages share: ``run_tasks`` (per-shard tasks, bounded in flight), ``actor_pool_rows``
(shards through a pool of model actors: pseudo-labeling and evaluation) and ``causes`` (the exceptions a Ray task,
Ray Data or Ray Train error wraps).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

from pipeline.overrides import ConfigError

log = logging.getLogger(__name__)

# Ray Train 2.60's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and a
# worker's ray.train.report() blocks until the next poll: measured here, 20 reports took 38 s at the default and
# 2 s at 0.1 s (a trivial fit(): 54 s -> 13 s). Our default; a value in the environment wins.
TRAIN_POLL_S = "0.25"


def _job_env() -> dict[str, str]:
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)}


_STARTED_HERE = False  # this process started its own local Ray, to which no node will ever be added


def can_grow() -> bool:
    """Whether nodes may still join: a cluster we joined may autoscale, a local Ray this process started will not."""
    return not _STARTED_HERE


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None) -> str:
    """Start or join Ray once per process; returns a description of where we are running."""
    global _STARTED_HERE
    import ray

    if ray.is_initialized():
        return "already initialised"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": _job_env()})
        return f"cluster at {address}"
    kwargs: dict = {
        "num_cpus": num_cpus or os.cpu_count(),
        "dashboard_host": "127.0.0.1",
        "runtime_env": {"env_vars": _job_env()},
    }
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    ray.init(**kwargs)
    _STARTED_HERE = True
    return f"local Ray ({kwargs['num_cpus']} CPUs)"


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def run_tasks(fn: Callable, args: Iterable[tuple], total: int, desc: str, progress: bool, inline: bool) -> Iterator:
    """Runs ``fn(*a)`` for each ``a`` in ``args`` as Ray tasks (1 CPU each, retried on worker death) with a bounded
    number in flight, or in this process when ``inline``; yields results as they finish. A task's exception comes
    back as Ray's ``RayTaskError(cause)``; ``rounds.user_error`` turns it back into the one-line cause."""
    if inline:
        yield from (fn(*a) for a in args)
        return
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    window = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    pending: list = []
    bar = tqdm(total=total, unit="shard", desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for a in args:
            pending.append(remote.remote(*a))
            if len(pending) >= window:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(1)
                yield ray.get(done[0])
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(1)
            yield ray.get(done[0])
    finally:  # a failed task (e.g. a full disk) stops the pass: the tasks still in flight are not left writing
        for ref in pending:
            ray.cancel(ref)
        bar.close()


@contextlib.contextmanager
def actor_pool_rows(cls: type, kwargs: dict, items: list[dict], resources) -> Iterator[Iterator[dict]]:
    """Streams ``items`` (one row each) through a Ray Data pool of ``cls(**kwargs)`` actors, sized and placed by
    ``resources`` (a ``pipeline.config.LabelResources``: autoscaling or fixed, CPUs and GPUs per actor); yields the
    iterator of result rows. An actor that fits on no node is refused first (``check_room``). Leaving the block ends
    the dataset's execution, so no actor works on in the background."""
    import ray
    from ray.data import ActorPoolStrategy

    check_room(resources)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the stages draw their own bars, counting shards and images
    context.print_on_execution_start = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        compute=ActorPoolStrategy(**resources.pool(ray.cluster_resources(), len(items))),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )
    with contextlib.closing(iter(ds.iter_rows())) as rows:
        yield rows


def check_room(resources) -> None:
    """A label actor that fits on no node waits for the autoscaler to add one; on a local Ray that this process
    started, nothing ever will, so that is one ``ConfigError`` line instead of a stage that waits forever."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
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


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps, outermost first: a task's ``RayTaskError.cause``, Ray Train's per-worker and
    controller failures, and ``__cause__`` chains. Ray's own wrappers are walked through but not yielded: a
    ``RayTaskError(StorageError)`` is also a ``StorageError``, but its message is a whole remote traceback."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if not isinstance(current, RayError) and type(current).__module__.split(".")[0] != "ray":
            yield current
        todo += [getattr(current, "cause", None), getattr(current, "controller_failure", None)]
        todo += list((getattr(current, "worker_failures", None) or {}).values())
        todo.append(current.__cause__)
