"""Starting or joining Ray: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set (or an address in config) joins that cluster; otherwise a local Ray is started with its
dashboard bound to 127.0.0.1. Token authentication, on by default in Ray 2.60, is left on: a fresh local
Ray writes its token to ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and clients read it from there.

Also ``causes``: the exceptions a Ray task, Ray Data or Ray Train error wraps (``pipeline/rounds.user_error`` finds
the one a user can act on among them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from stages.core.errors import ConfigError, DataError
from stages.storage.files import Location, StorageError, storage_error

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


def user_error(exc: BaseException, where: Location) -> Exception | None:
    """The error a user can act on inside ``exc``, however Ray wrapped it: a ``ConfigError``, ``DataError`` or
    ``StorageError``, or an ``OSError`` saying the disk is full or read-only (as a ``StorageError``; the path is
    the failing file when known, else ``where``). None when there is none."""
    for cause in causes(exc):
        if isinstance(cause, (ConfigError, DataError, StorageError)):
            return cause
        if (storage := storage_error(cause, where)) is not None:
            return storage
    return None


@contextlib.contextmanager
def one_line_errors(where: Location) -> Iterator[None]:
    """Re-raise what ``user_error`` finds, so that the CLI prints one line instead of a remote traceback."""
    try:
        yield
    except Exception as exc:
        clear = user_error(exc, where)
        if clear is None or clear is exc:
            raise
        raise clear from exc
