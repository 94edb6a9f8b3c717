"""The cluster path: submit / status / logs / rounds / download / predict, token auth, and a real two-node Ray
cluster on loopback that runs a submitted job to the end.

The cluster tests share one cluster (a module fixture): ``ray start --head`` and a second ``ray start --address``
node, both on 127.0.0.1 with their own temp dirs and a fresh token; it kills exactly the processes it started
(tagged through an environment variable) when the module ends, so other Ray instances on the machine (this
session's own) are never touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from pipeline.cli import main
from pipeline.cluster.jobs import (
    SUBMITTED_CONFIG,
    check_entrypoint,
    connect,
    dependency_modules,
    find_token,
    parse_check,
    resolve_paths,
    stage_working_dir,
)
from pipeline.cluster.run_store import RunStore, RunStoreError
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- pieces, no cluster needed


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-path\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert find_token() is None


def test_commands_without_address_or_token_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status", "some-job"]) == 2
    assert "no cluster address" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert main(["stop", "some-job", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Ray auth token" in err[0] and "RAY_AUTH_TOKEN" in err[0]


def test_resolve_paths_makes_local_paths_absolute_and_keeps_urls(tmp_path):
    tree = {
        "storage": "runs",
        "rounds": 1,
        "data": {
            "labeled": ["d/labeled-{000000..000003}.tar"],
            "unlabeled": ["s3://bucket/unlabeled-{000..999}.tar", "~/u/*.tar"],
            "test": ["/abs/test.tar"],
            "val": ["d/val/*.tar"],
            "prepare_digits": "d",
        },
        "ladder": [{"model": "resnet10t"}],
    }
    cfg = resolve_paths(load_config(None, [], base=tree), tmp_path)
    assert cfg.storage == str(tmp_path / "runs")
    assert cfg.data.labeled == (f"{tmp_path}/d/labeled-{{000000..000003}}.tar",)
    assert cfg.data.unlabeled == ("s3://bucket/unlabeled-{000..999}.tar", f"{Path.home()}/u/*.tar")
    assert cfg.data.test == ("/abs/test.tar",) and cfg.data.prepare_digits == str(tmp_path / "d")
    assert cfg.data.val == (f"{tmp_path}/d/val/*.tar",)
    assert cfg.publish == ""
    tree["publish"] = "gs://bucket/runs"
    assert resolve_paths(load_config(None, [], base=tree), tmp_path).publish == "gs://bucket/runs"
    tree["publish"] = "published"
    assert resolve_paths(load_config(None, [], base=tree), tmp_path).publish == str(tmp_path / "published")


def test_shipped_working_dir_has_the_code_and_config_but_no_outputs(tmp_path, tiny_config):
    cfg = tiny_config()
    out = stage_working_dir(cfg, tmp_path / "ship")
    assert (out / "pipeline" / "cli.py").is_file() and (out / "stages" / "train.py").is_file()
    for excluded in (".venv", "runs", "data", ".git"):
        assert not (out / excluded).exists(), excluded
    assert load_config(out / SUBMITTED_CONFIG).digest() == cfg.digest()


def python_without(module: str, folder: Path) -> Path:
    """An interpreter that cannot import ``module`` (like a cluster's system python lacking the project): this venv's
    python behind an import hook that refuses it, as a missing module is refused."""
    hook = folder / f"hide-{module}"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n\n\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] == {module!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    python = folder / f"python-without-{module}"
    path = shlex.quote(str(hook))
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}} exec {shlex.quote(sys.executable)} "$@"\n'
    )
    python.chmod(0o755)
    return python


def test_dependency_modules_are_pyprojects_and_importable_here():
    modules = dependency_modules()
    assert {"torch", "torchvision", "timm", "webdataset", "ray", "sklearn", "PIL", "yaml", "tqdm"} <= set(modules)
    assert [m for m in modules if importlib.util.find_spec(m) is None] == [], "IMPORT_NAMES lacks a mapping"


def test_interpreter_check_names_what_is_missing(tmp_path):
    modules = dependency_modules()

    def check(python: str) -> dict | None:
        out = subprocess.run(check_entrypoint(python, modules), shell=True, capture_output=True, text=True, timeout=60)
        return parse_check(out.stdout + out.stderr)

    assert check(shlex.quote(sys.executable))["missing"] == []
    python = python_without("tqdm", tmp_path)
    assert check(str(python))["missing"] == ["tqdm"]
    assert check(str(tmp_path / "no-such-python")) is None


def test_rounds_download_and_predict(finished_run, tmp_path, capsys, digits_root):
    cfg, run_dir, rows = finished_run
    assert main(["rounds", run_dir.name, "--storage", str(run_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and f"{rows[-1]['test_top1'] * 100:.2f}%" in out

    assert main(["download", str(run_dir), "--all", "--to", str(tmp_path / "dl")]) == 0
    for r in (0, 1):
        got = tmp_path / "dl" / f"round-{r:03d}"
        assert sorted(p.name for p in got.iterdir()) == [
            "manifest.json",
            "metrics.json",
            "model.json",
            "model.safetensors",
        ]
        assert (got / "model.safetensors").read_bytes() == (
            run_dir / f"round-{r:03d}" / "model.safetensors"
        ).read_bytes()
    capsys.readouterr()

    # predict: the CLI's classes are the model's argmax on the same test images
    import tarfile

    shard = sorted((digits_root / "test").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")][:4]
        for m in pngs:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
    images = [str(tmp_path / m.name) for m in pngs]
    assert main(["predict", "--model", str(tmp_path / "dl" / "round-001"), *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    from stages.data.shards import decode_image
    from stages.evaluate import predict_probs
    from stages.models.factory import load_model

    model, card = load_model(tmp_path / "dl" / "round-001")
    probs = predict_probs(model, [decode_image(Path(p).read_bytes(), 1) for p in images], card)
    assert [int(line.split()[1]) for line in lines] == [int(c) for c in probs.argmax(axis=1)]

    # the README's line for users without this package: timm + safetensors give the same model
    import safetensors.torch
    import timm
    import torch

    folder = tmp_path / "dl" / "round-001"
    m = timm.create_model(**json.load(open(folder / "model.json"))["create"])
    safetensors.torch.load_model(m, str(folder / "model.safetensors"))
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        assert torch.equal(m.eval()(x), model(x))


def test_download_refuses_a_file_that_differs_from_the_manifest(finished_run, tmp_path, capsys):
    _, run_dir, _ = finished_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray_train", "pseudo_labels", "selection"))
    weights = copy / "round-001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    assert (
        main(["download", run_dir.name, "--round", "1", "--to", str(tmp_path / "dl"), "--storage", str(copy.parent)])
        == 2
    )
    err = capsys.readouterr().err
    assert "model.safetensors does not match the manifest" in err and "refusing" in err
    assert not (tmp_path / "dl" / "round-001").exists() and not list((tmp_path / "dl").glob(".round-*"))
    # round 0 is intact and still downloads; a round that is not there is a clear error
    assert [p.name for p in RunStore(run_dir.name, str(copy.parent)).download(tmp_path / "dl", 0)] == ["round-000"]
    with pytest.raises(RunStoreError, match="has no round 7"):
        RunStore(str(copy)).download(tmp_path / "dl", 7)
    with pytest.raises(RunStoreError, match="no run 'nope': neither"):
        RunStore("nope", str(tmp_path / "runs"))


def test_download_refuses_an_unfinished_round(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray_train", "pseudo_labels", "selection"))
    manifest = json.loads((copy / "round-001" / "manifest.json").read_text())
    del manifest["stages"]["evaluate"]
    (copy / "round-001" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match=r"round 1 .* is not finished \(stages done: pseudo_label, select, train\)"):
        RunStore(str(copy)).download(tmp_path / "dl", 1)
    assert [p.name for p in RunStore(str(copy)).download(tmp_path / "dl")] == ["round-000"]  # latest finished


def test_local_ray_dashboard_listens_on_loopback_only(ray_session):
    import ray

    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    assert url.split(":")[0] == "127.0.0.1", url


# ---------------------------------------------------------------- a real two-node cluster on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """``ray start --head`` + one ``ray start --address`` node on 127.0.0.1, token auth on, own temp dirs."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nsc-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.token = secrets.token_hex(32)
        (self.dir / "token").write_text(self.token)
        self.marker = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.dir / "token"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "NS_TEST_CLUSTER": self.marker,  # inherited by every process of this cluster: how we find them
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
        }

    def start(self) -> None:
        self._ray(
            "start", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), *self._node_args("head"),
        )  # fmt: skip
        self._ray("start", "--address", f"127.0.0.1:{self.gcs_port}", *self._node_args("node2"))

    def _node_args(self, name: str) -> list[str]:
        """Per-node temp dir and agent ports: two nodes on one host would otherwise race for the same defaults
        (the loser's job agent dies and submissions get 500 "No available agent")."""
        ports = [
            f"--{flag}={_free_port()}"
            for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                         "metrics-export-port")
        ]  # fmt: skip
        return [
            "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
            "--temp-dir", str(self.dir / name), *ports,
        ]  # fmt: skip

    def _ray(self, *args: str) -> None:
        out = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0) -> int:
        """Active nodes per ``ray status``, polled until ``count`` joined (a node registers a few s after start)."""
        deadline, active = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            out = subprocess.run(
                [str(BIN / "ray"), "status", "--address", f"127.0.0.1:{self.gcs_port}"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0].count("node_")
            if active >= count:
                break
            time.sleep(1.0)
        return active

    def cli(self, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def stop(self) -> None:
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("NS_TEST_CLUSTER") == self.marker:
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def loopback_cluster():
    cluster = LoopbackCluster()
    try:
        start = time.perf_counter()
        cluster.start()
        print(f"\ncluster: head + 1 node on 127.0.0.1 up in {time.perf_counter() - start:.1f} s")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_submitted_run_on_a_two_node_cluster(loopback_cluster, s3_bucket, tmp_path, monkeypatch, capsys):
    """Submit a one-round run with relative shard paths from a user folder and its storage in a bucket, follow it,
    download it from the bucket, re-evaluate it. The nodes share no run folder: every stage, on whichever node it
    runs, writes through the ``s3://`` root (the nodes inherit the test's loopback S3 endpoint and fake keys)."""
    cluster, work = loopback_cluster, tmp_path / "work"
    work.mkdir()
    fs, bucket = s3_bucket
    url = f"s3://{bucket}/cluster-runs"
    spec = {"model": "resnet10t", "drop_rate": 0.1, "drop_path_rate": 0.05, "randaug_n": 1, "randaug_m": 3}
    train = {"epochs": 1, "batch_size": 16, "lr": 0.003, "loader_workers": 0, "checkpoint_every": 1}
    config = {
        "name": "cluster",
        "storage": url,
        "rounds": 1,
        "data": {
            "labeled": ["digits/labeled/labeled-{000000..000003}.tar"],
            "unlabeled": ["digits/unlabeled/unlabeled-000000.tar"],
            "test": ["digits/test/test-{000000..000003}.tar"],
            "image_size": 16,
            "prepare_digits": "digits",  # missing: submit prepares it first
        },
        "ladder": [spec],
        "teacher": train,
        "student": {**train, "unlabeled_ratio": 2.0},
        "select": {"floor": 0.0},
        "resources": {"torch_threads": 1},
        "robustness": {"corruptions": []},  # off: this test is about the cluster path
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert cluster.wait_for_nodes(2) == 2, "the second node did not join"

    start = time.perf_counter()
    out = cluster.cli("submit", "--address", cluster.address, "--config", "tiny.yaml", "--run", "c1", cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["job", "run", "storage"], lines
    job = lines[0].split(": ", 1)[1]
    assert lines[1] == "run: c1" and lines[2] == f"storage: {url}"
    assert (work / "digits" / "test").is_dir(), "submit prepares the default data before submitting"

    follow = cluster.cli("logs", job, "--follow", "--address", cluster.address, cwd=work)
    seconds = time.perf_counter() - start
    print(f"job {job}: submit -> finished in {seconds:.0f} s")
    assert follow.returncode == 0, follow.stdout[-4000:] + follow.stderr[-2000:]
    assert "round-001 evaluate: starting" in follow.stdout and f"{job}: SUCCEEDED" in follow.stderr
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster.env["RAY_AUTH_TOKEN_PATH"])
    monkeypatch.chdir(work)
    assert main(["status", job, "--address", cluster.address]) == 0
    out = capsys.readouterr().out
    assert "status: SUCCEEDED" in out and "run: c1" in out

    # the run is in the bucket, nowhere on the nodes' disks or in the user's folder
    assert main(["rounds", "c1", "--storage", url]) == 0
    assert "2 of 2 rounds done" in capsys.readouterr().out
    objects = [p.split("/c1/", 1)[1] for p in fs.find(f"{bucket}/cluster-runs/c1")]
    assert any(p.startswith("round-001/pseudo_labels/") for p in objects), "the labeling actor wrote to the bucket"
    assert any(p.startswith("ray_train/round-001-") and "/checkpoint_" in p for p in objects), "Ray Train too"
    assert not list(cluster.dir.glob("**/c1/round-*")) and not list(cluster.dir.glob("**/s3:"))
    assert sorted(p.name for p in work.iterdir()) == ["digits", "tiny.yaml"]

    assert main(["download", "c1", "--all", "--to", "ckpt", "--storage", url]) == 0
    from stages.data.shards import expand_shards, load_labeled
    from stages.evaluate import evaluate
    from stages.models.factory import load_model

    test = load_labeled(expand_shards([f"{work}/digits/test/*.tar"]), 10, 1, 0.0, "test")
    for r in (0, 1):
        model, card = load_model(work / "ckpt" / f"round-{r:03d}")
        recorded = json.loads((work / "ckpt" / f"round-{r:03d}" / "metrics.json").read_text())["test_top1"]
        assert np.isclose(evaluate(model, card, test)["test_top1"], recorded), r

    # the token is never written into the run's files or the job's log
    for path in fs.find(f"{bucket}/cluster-runs/c1"):
        if fs.size(path) < 5_000_000:
            assert cluster.token.encode() not in fs.cat_file(path), path
    assert cluster.token not in follow.stdout

    # without the token, or with a wrong one, the cluster refuses the job
    no_auth = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    code = f"import ray.job_submission as j; j.JobSubmissionClient({cluster.address!r}).submit_job(entrypoint='echo')"
    anonymous = subprocess.run([sys.executable, "-c", code], env=no_auth, capture_output=True, text=True, timeout=120)
    assert anonymous.returncode != 0 and "AuthenticationError" in anonymous.stderr, anonymous.stderr[-2000:]
    (tmp_path / "wrong").write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "wrong"))
    capsys.readouterr()
    assert main(["submit", "--address", cluster.address, "--config", "tiny.yaml"]) == 2
    refused = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refused the auth token" in refused, refused
    print(f"submit without a token: refused; with a wrong token: {refused}")

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster.env["RAY_AUTH_TOKEN_PATH"])
    assert main(["status", "no-such-job", "--address", cluster.address]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err
    assert main(["stop", job, "--address", cluster.address]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.slow
def test_submit_checks_the_cluster_interpreter_before_the_run(loopback_cluster, tmp_path, monkeypatch, capsys):
    """A cluster python that lacks tqdm (as after `ray start` from a shell without the venv): submit stops with one
    error line naming the interpreter and the module before any job of the run exists; --no-check skips the check."""
    cluster, work = loopback_cluster, tmp_path / "work"
    work.mkdir()
    shards = {split: [f"/nowhere/{split}.tar"] for split in ("labeled", "unlabeled", "test")}  # never read
    config = {"name": "check", "storage": "runs", "data": shards, "ladder": [{"model": "resnet10t"}]}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster.env["RAY_AUTH_TOKEN_PATH"])
    monkeypatch.chdir(work)
    submit = ["submit", "--address", cluster.address, "--config", "tiny.yaml", "--run", "c2"]

    python = python_without("tqdm", tmp_path)
    assert main([*submit, "--python", str(python)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert not out and errors == err.strip().splitlines()[-1:], err
    assert repr(str(python)) in errors[0] and "cannot import tqdm, which the run needs" in errors[0], errors
    assert "--python /path/to/venv/bin/python" in errors[0] and "--no-check" in errors[0], errors

    assert main([*submit, "--python", str(tmp_path / "no-such-python")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not run" in errors[0] and "no-such-python" in errors[0], errors

    assert sorted(p.name for p in work.iterdir()) == ["tiny.yaml"], "no run folder"
    jobs = connect(cluster.address).list_jobs()
    assert not [j for j in jobs if (j.metadata or {}).get("run") == "c2"], "the run was never submitted"
    assert not [j.submission_id for j in jobs if (j.metadata or {}).get("check")], "check jobs are deleted"

    # --no-check submits without looking; this run would fail on the cluster, so stop it at once
    assert main([*submit, "--python", str(tmp_path / "no-such-python"), "--no-check"]) == 0
    job = capsys.readouterr().out.splitlines()[0].removeprefix("job: ")
    runs = [j.submission_id for j in connect(cluster.address).list_jobs() if (j.metadata or {}).get("run") == "c2"]
    assert runs == [job]
    main(["stop", job, "--address", cluster.address])
