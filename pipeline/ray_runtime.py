"""Starting or joining Ray: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set (or an address in config) joins that cluster; otherwise a local Ray is started with its
dashboard bound to 127.0.0.1. Token authentication, on by default in Ray 2.60, is left on: a fresh local
Ray writes its token to ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and clients read it from there.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Ray Train 2.60's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and a
# worker's ray.train.report() blocks until the next poll: measured here, 20 reports took 38 s at the default and
# 2 s at 0.1 s (a trivial fit(): 54 s -> 13 s). Our default; a value in the environment wins.
TRAIN_POLL_S = "0.25"


def _job_env() -> dict[str, str]:
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)}


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None) -> str:
    """Start or join Ray once per process; returns a description of where we are running."""
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
    return f"local Ray ({kwargs['num_cpus']} CPUs)"


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
