"""Shared fixtures: a temporary HOME for Ray's auth token, one session-scoped Ray, tiny digits shards, and one
finished one-round run (used by test_pipeline.py and test_report.py, trained once per session)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Ray writes its auth token under HOME; keep the user's real token out of the tests (and vice versa).
# Once per session: test modules that import this file as ``tests.conftest`` must not move HOME again.
if "NS_TEST_HOME" not in os.environ:
    os.environ["NS_TEST_HOME"] = tempfile.mkdtemp(prefix="ns-test-home-")
os.environ["HOME"] = os.environ["NS_TEST_HOME"]
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object-store tests talk to a local S3 (moto) on this port; set before Ray starts so its workers inherit it.
# Fake credentials only: nothing here can reach a real bucket.
if "NS_TEST_S3_PORT" not in os.environ:
    os.environ["NS_TEST_S3_PORT"] = str(_free_port())
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{os.environ['NS_TEST_S3_PORT']}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (a per-test Ray costs ~5 s each)."""
    import ray
    from ray.data import DataContext

    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=2, object_store_mb=512)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A local S3 server (moto) with an empty bucket; yields ``(fsspec filesystem, bucket name)``."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(os.environ["NS_TEST_S3_PORT"]), verbose=False)
    server.start()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("ns-test")
    yield fs, "ns-test"
    server.stop()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The real default data set written as shards once per session."""
    from stages.data.digits import write_digits_shards

    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(root)
    return root


def tiny_tree(digits_root: Path, storage: Path) -> dict:
    """A config tree for the real digits shards with tiny models and few steps (seconds per stage)."""
    spec = {"model": "resnet10t", "drop_rate": 0.1, "drop_path_rate": 0.05, "randaug_n": 1, "randaug_m": 3}
    train = {"epochs": 2, "batch_size": 16, "lr": 0.003, "loader_workers": 0, "checkpoint_every": 1}
    return {
        "name": "tiny",
        "storage": str(storage),
        "rounds": 1,
        "data": {
            "labeled": [f"{digits_root}/labeled/labeled-{{000000..000003}}.tar"],
            "unlabeled": [f"{digits_root}/unlabeled/*.tar"],
            "test": [f"{digits_root}/test/test-{{000000..000003}}.tar"],
            "val": [f"{digits_root}/val/*.tar"],
            "num_classes": 10,
            "image_size": 16,
        },
        "ladder": [spec],
        "teacher": dict(train),
        "student": {**train, "epochs": 1, "unlabeled_ratio": 2.0},
        "pseudo_label": {"topk": 3},
        "select": {"floor": 0.0},
        "resources": {"torch_threads": 2},
        "robustness": {"severities": [3]},
    }


@pytest.fixture
def tiny_config(digits_root, tmp_path):
    """Build a ``PipelineConfig`` from the tiny tree plus ``key.path=value`` overrides."""
    from pipeline.config import load_config

    def make(*overrides: str):
        return load_config(None, list(overrides), base=tiny_tree(digits_root, tmp_path / "runs"))

    return make


@pytest.fixture(scope="session")
def finished_run(ray_session, digits_root, tmp_path_factory):
    """A tiny run of rounds 0 and 1 through Ray (``resources.executor: ray``: Ray tasks, the label actors' pool and
    Ray Train, though the data is small enough to run in process) on the real digits data: ``(cfg, run_dir, rows)``.

    Shared by the whole session because training it is the slow part; tests that change the run must leave it as
    they found it (test_pipeline.py's damage test redoes the round it damages), or work on a copy.
    """
    from pipeline.config import load_config
    from pipeline.rounds import run_pipeline

    storage, published = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("published")
    cfg = load_config(None, [f"publish={published}", "resources.executor=ray"], base=tiny_tree(digits_root, storage))
    rows = run_pipeline(cfg, "one-round", progress=False)
    return cfg, storage / "one-round", rows
