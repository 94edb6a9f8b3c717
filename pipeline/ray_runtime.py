"""Starting or joining Ray: the one place that calls ``ray.init``.

``RAY_ADDRESS`` set (or an address in config) joins that cluster; otherwise a local Ray is started with its
dashboard bound to 127.0.0.1. Token authentication, on by default in Ray 2.60, is left on: a fresh local
Ray writes its token to ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and clients read it from there.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None) -> str:
    """Start or join Ray once per process; returns a description of where we are running."""
    import ray

    if ray.is_initialized():
        return "already initialised"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"cluster at {address}"
    kwargs: dict = {"num_cpus": num_cpus or os.cpu_count(), "dashboard_host": "127.0.0.1"}
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    ray.init(**kwargs)
    return f"local Ray ({kwargs['num_cpus']} CPUs)"


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
