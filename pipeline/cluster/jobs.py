"""Ray Jobs: submit a run to a cluster, follow it, stop it (``python -m pipeline submit|status|logs|stop``).

``submit`` validates the config here, resolves every relative path in it (storage root, shard patterns, the
default-data folder) against the submitter's working directory, prepares the default digits data if the config
asks for it, and ships the project source plus that resolved config as the job's ``working_dir``. The job runs
``python -m pipeline iterate`` on the cluster, so a submitted run and a local one are the same code path.

Before the run, ``submit`` sends a short check job with the same ``working_dir`` and the run's interpreter
(``--python``) that looks up every top-level module of pyproject's dependencies: a cluster whose ``python`` lacks
the project (a node started from a shell without the venv) is one clear error before anything runs, not a
``ModuleNotFoundError`` mid-run. ``--no-check`` skips it.

Token authentication (on by default in Ray 2.60) stays on. The token is looked up the way Ray's own clients do —
``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` — and sent as an
``Authorization: Bearer`` header, so it never appears in the job's runtime environment, metadata or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.storage.files import is_url

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

# Never shipped to the cluster: environments, outputs, data (read from storage instead), caches.
SHIP_EXCLUDES = (
    ".venv",
    "venv",
    "runs",
    "data",
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "docs",
)
SUBMITTED_CONFIG = "submitted-config.yaml"
AGENT_WAIT_S = 120.0  # how long submit waits for a freshly started head's job agent
CHECK_WAIT_S = 180.0  # how long submit waits for the interpreter check (runtime-env setup included)
# pyproject distribution names whose import name is not the distribution name with "-" -> "_"
IMPORT_NAMES = {"scikit-learn": "sklearn", "pillow": "PIL", "pyyaml": "yaml"}
CHECK_MARK = "noisy-student-check:"
CHECK_FIX = (
    "pass --python /path/to/venv/bin/python (an interpreter on the cluster with this project installed) or install "
    "the project on the cluster (pip install -e .); --no-check skips this check"
)
# Run by the cluster's interpreter, so plain Python with no project imports. find_spec locates a module without
# importing it: the check costs milliseconds where importing torch, timm and Ray Train would take seconds.
CHECK_CODE = f"""
import importlib.util, json, sys
missing = []
for name in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(name) is not None
    except Exception:  # an import hook or a broken package that fails the lookup is as good as missing
        found = False
    if not found:
        missing.append(name)
print({CHECK_MARK!r}, json.dumps({{"python": sys.executable, "missing": missing}}), flush=True)
"""

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A cluster/job problem a user can fix (address, token, unknown job); the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Submission:
    job_id: str
    run: str
    storage: str


def find_token() -> str | None:
    """The Ray auth token, looked up as Ray's clients do: env var, then token file path, then ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError:
        return None


def connect(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (default ``RAY_ADDRESS``) carrying the auth token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise JobError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    token = find_token()
    if token is None:
        raise JobError(
            "no Ray auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
            "~/.ray/auth_token (on the head node: ray get-auth-token)"
        )
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError as exc:
        raise JobError(f"the cluster at {address} refused the auth token ({_first_line(exc)})") from exc
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Make storage, publish, shard patterns and the default-data folder absolute (object-store URLs stay as written).

    A job runs in Ray's temporary copy of the working dir: a relative path there would read nothing and write
    into a folder that vanishes with the job."""

    def absolute(path: str) -> str:
        if not path or is_url(path):
            return path
        local = path.removeprefix("file://")
        return os.path.normpath(base / os.path.expanduser(local))

    data = dataclasses.replace(
        cfg.data,
        labeled=tuple(absolute(p) for p in cfg.data.labeled),
        unlabeled=tuple(absolute(p) for p in cfg.data.unlabeled),
        test=tuple(absolute(p) for p in cfg.data.test),
        val=tuple(absolute(p) for p in cfg.data.val),
        prepare_digits=absolute(cfg.data.prepare_digits),
    )
    teacher = dataclasses.replace(
        cfg.teacher, init=absolute(cfg.teacher.init), from_model=absolute(cfg.teacher.from_model)
    )
    mlflow = cfg.tracking.mlflow  # a plain folder is a file store beside the submitter; URIs stay as written
    tracking = dataclasses.replace(cfg.tracking, mlflow=mlflow if ":" in mlflow else absolute(mlflow))
    return dataclasses.replace(
        cfg, storage=absolute(cfg.storage), publish=absolute(cfg.publish), data=data, teacher=teacher, tracking=tracking
    )


def project_root() -> Path:
    """The source checkout holding this package (what a job ships); a clear error for an installed copy."""
    root = Path(__file__).resolve().parents[2]  # pipeline/cluster/jobs.py -> the checkout
    if not (root / "pyproject.toml").is_file() or not (root / "stages").is_dir():
        raise JobError(f"submit ships the project source, but {root} is not a source checkout (no pyproject.toml)")
    return root


def stage_working_dir(cfg: PipelineConfig, out: Path) -> Path:
    """Copy the project (minus ``SHIP_EXCLUDES``) to ``out`` and add the resolved config; returns ``out``."""
    shutil.copytree(project_root(), out, ignore=shutil.ignore_patterns(*SHIP_EXCLUDES))
    from pipeline.config import dump_config

    (out / SUBMITTED_CONFIG).write_text(dump_config(cfg))
    return out


def entrypoint(run: str, python: str = "python") -> str:
    return f"{python} -m pipeline iterate --config {SUBMITTED_CONFIG} --run {run} --no-progress"


def submit(
    cfg: PipelineConfig, run: str, address: str | None, python: str = "python", check: bool = True
) -> Submission:
    """Submit ``cfg`` (already resolved) as a Ray Job; returns its id, run name and storage root.

    With ``check``, a short job first looks up the project's dependencies with ``python`` (``check_interpreter``)."""
    client = connect(address)
    job_id = f"noisy-student-{run}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="ns-submit-") as tmp:
        working_dir = stage_working_dir(cfg, Path(tmp) / "project")
        # one runtime env for both jobs: Ray uploads the working_dir once (its package is named by content hash)
        runtime_env = {"working_dir": str(working_dir), "excludes": list(SHIP_EXCLUDES)}
        if check:
            check_interpreter(client, python, runtime_env)
        _submit_job(
            client,
            entrypoint=entrypoint(run, python),
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"run": run, "storage": cfg.storage, "config_digest": cfg.digest()},
        )
    return Submission(job_id, run, cfg.storage)


def _submit_job(client, **kwargs) -> None:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except Exception as exc:  # the SDK raises RuntimeError/AuthenticationError/requests errors
            # a cluster that just started answers 500 "No available agent" until its job agent is up
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise JobError(f"submitting to {client.get_address()} failed: {_first_line(exc)}") from exc


def dependency_modules(root: Path | None = None) -> list[str]:
    """Top-level import names of pyproject's ``dependencies`` (e.g. ``scikit-learn`` -> ``sklearn``)."""
    deps = tomllib.loads(((root or project_root()) / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9._-]+", d).group().lower() for d in deps]
    return [IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names]


def check_entrypoint(python: str, modules: list[str]) -> str:
    return f"{python} -c {shlex.quote(CHECK_CODE)} {' '.join(modules)}"


def parse_check(log_text: str) -> dict | None:
    """``{"python": path, "missing": [...]}`` from the check job's log, None when the check never printed it."""
    for line in reversed(log_text.splitlines()):
        if line.startswith(CHECK_MARK):
            return json.loads(line.removeprefix(CHECK_MARK))
    return None


def check_interpreter(client, python: str, runtime_env: dict, wait_s: float = CHECK_WAIT_S) -> None:
    """Run the dependency lookup as a job with the run's interpreter and runtime env; JobError when it fails."""
    job_id = f"noisy-student-check-{uuid.uuid4().hex[:6]}"
    log.info("checking that %r on the cluster has the project's dependencies (job %s)", python, job_id)
    _submit_job(
        client,
        entrypoint=check_entrypoint(python, dependency_modules()),
        submission_id=job_id,
        runtime_env=runtime_env,
        metadata={"check": "interpreter"},
    )
    deadline = time.monotonic() + wait_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise JobError(
                f"the interpreter check (job {job_id}) did not finish within {wait_s:.0f} s (status {status.value}):"
                f" see python -m pipeline logs {job_id}, or skip the check with --no-check"
            )
        time.sleep(0.5)
    info, text = client.get_job_info(job_id), client.get_job_logs(job_id)
    with contextlib.suppress(RuntimeError):  # tidiness only: a finished check leaves nothing in `ray job list`
        client.delete_job(job_id)
    result = parse_check(text)
    if result is None:  # the interpreter did not start: no such file, not executable, runtime env setup failed
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), info.message or "")
        raise JobError(f"the cluster could not run {python!r} (check job {status.value}: {last}): {CHECK_FIX}")
    if result["missing"]:
        raise JobError(
            f"the cluster's {python!r} ({result['python']}) cannot import {', '.join(result['missing'])}, which "
            f"the run needs: {CHECK_FIX}"
        )


def _call(what: str, job_id: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        text = _first_line(exc)
        if "does not exist" in text or "404" in text:
            raise JobError(f"no job {job_id!r} on this cluster (list them with: ray job list)") from exc
        raise JobError(f"{what} {job_id}: {text}") from exc


def job_info(address: str | None, job_id: str) -> dict:
    client = connect(address)
    info = _call("status of", job_id, client.get_job_info, job_id)
    meta = info.metadata or {}
    return {
        "job": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "run": meta.get("run", "-"),
        "storage": meta.get("storage", "-"),
        "message": (info.message or "").strip(),
    }


def stop(address: str | None, job_id: str) -> bool:
    """True when a stop was sent, False when the job had already finished."""
    client = connect(address)
    return bool(_call("stop", job_id, client.stop_job, job_id))


def logs(address: str | None, job_id: str) -> str:
    client = connect(address)
    return _call("logs of", job_id, client.get_job_logs, job_id)


def follow(address: str | None, job_id: str) -> Iterator[str]:
    """Yield log chunks as the job writes them, until it ends."""
    client = connect(address)
    _call("logs of", job_id, client.get_job_status, job_id)  # a clear error for an unknown id
    agen = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
