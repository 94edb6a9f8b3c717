"""Experiment tracking in MLflow: one parent run per pipeline run, one nested run per round.

``tracking: {mlflow: URI}`` turns it on (``pip install -e '.[mlflow]'``: ``mlflow-skinny``). After each finished round
the driver logs that round's run: params (the round's model, noise and training settings), metrics (test top-1, ECE,
per-class top-1 by class name, the teacher's top-1, pseudo-label counts, stage seconds; per-epoch training loss and
learning rate as steps) and the model (``model.safetensors``, ``model.json``, ``metrics.json`` under ``model/``).
The parent run holds the whole config as params. Run ids go into ``run.json`` (``tracking``), so a resumed run logs
into the same parent and skips rounds already logged.

A file URI (``file:///abs/mlruns`` or a plain folder) works offline; MLflow 3 keeps its file store in maintenance
mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set here for such a URI. Tracking never stops a run: any failure
(package missing, server unreachable) is one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

from stages.storage.files import copy_file, exists, is_url, name, read_json, read_text
from stages.storage.layout import RoundLayout, RunLayout, round_name
from stages.train import read_metrics_lines

log = logging.getLogger(__name__)


def tracking_uri(uri: str) -> str:
    """A plain folder becomes an absolute ``file://`` URI (the driver's working folder may change)."""
    if "://" in uri or uri.startswith(("databricks", "sqlite:")):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def track_round(cfg, run_dir, r: int, status: dict) -> None:
    """Log round ``r`` of the run in ``run_dir`` to MLflow, once, and the run's best round so far on the parent run;
    a failure is a warning, never an exception."""
    tracked = status.setdefault("tracking", {})
    try:
        if str(r) not in tracked.get("rounds", {}):
            _log_round(cfg, run_dir, r, tracked)
        _log_best(_client(tracked["uri"]), tracked["parent_run_id"], status.get("stop") or {})
    except Exception as exc:  # tracking is a side channel: whatever fails there, the run goes on
        log.warning("tracking: round %d not logged to MLflow (%s: %s)", r, exc.__class__.__name__, exc)


def _client(uri: str):
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_round(cfg, run_dir, r: int, tracked: dict) -> None:
    uri = tracking_uri(cfg.tracking.mlflow)
    client = _client(uri)
    parent = tracked.get("parent_run_id")
    if not parent:
        experiment = cfg.tracking.experiment or cfg.name
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=name(run_dir), tags={"noisy_student.run_dir": str(run_dir)})
        parent = run.info.run_id
        _log_params(client, parent, _flatten(cfg.to_dict()))
        tracked.update({"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent, "rounds": {}})
    layout = RunLayout(run_dir).round(r)
    metrics = read_json(layout.metrics)
    child = client.create_run(
        tracked["experiment_id"],
        run_name=round_name(r),
        tags={"mlflow.parentRunId": parent, "noisy_student.round": str(r)},
    )
    run_id = child.info.run_id
    train_cfg = cfg.teacher if r == 0 else cfg.student
    settings = {"model": dataclasses.asdict(cfg.spec(r)), "train": dataclasses.asdict(train_cfg)}
    _log_params(client, run_id, {"round": r, **_flatten(settings)})
    _log_metrics(client, run_id, metrics, layout)
    with tempfile.TemporaryDirectory(prefix="ns-mlflow-") as tmp:
        for local in (layout.model.weights, layout.model.card, layout.metrics):
            if is_url(local):  # MLflow logs local files: an object-store run's are fetched first
                copy_file(local, Path(tmp) / name(local))
                local = Path(tmp) / name(local)
            client.log_artifact(run_id, str(local), artifact_path="model")
    client.set_terminated(run_id)
    tracked["rounds"][str(r)] = run_id
    for key in ("val_top1", "test_top1"):  # per round on the parent: a user compares runs on validation there
        if metrics.get(key) is not None:
            client.log_metric(parent, key, float(metrics[key]), step=r)


def _log_best(client, parent: str, stop: dict) -> None:
    """The run's best round as the parent run's tags and metrics (chosen on validation: run.json's ``stop``)."""
    if stop.get("best_round") is None:
        return
    client.set_tag(parent, "noisy_student.best_round", str(stop["best_round"]))
    client.set_tag(parent, "noisy_student.best_by", str(stop.get("best_by", "")))
    step = len(stop.get("val_top1", [])) - 1  # the round after which this was the best
    client.log_metric(parent, "best_round", float(stop["best_round"]), step=max(step, 0))
    for key in ("best_val_top1", "best_test_top1"):
        if stop.get(key) is not None:
            client.log_metric(parent, key, float(stop[key]), step=max(step, 0))


def _log_metrics(client, run_id: str, metrics: dict, layout: RoundLayout) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    keys = ("val_top1", "teacher_val_top1", "test_top1", "test_ece", "teacher_top1", "pseudo_label_accuracy")
    values = {k: metrics.get(k) for k in keys}
    values.update({k: metrics.get(k) for k in ("train_images", "pseudo_images", "labeled_images", "params")})
    values.update({f"seconds_{k}": v for k, v in metrics.get("stage_seconds", {}).items()})
    names = metrics.get("classes") or [str(c) for c in range(len(metrics.get("per_class_top1", [])))]
    values.update(
        {f"top1_{_metric_name(n)}": v for n, v in zip(names, metrics.get("per_class_top1", []), strict=False)}
    )
    batch = [Metric(k, float(v), now, 0) for k, v in values.items() if isinstance(v, (int, float))]
    log_path = layout.train_metrics
    if exists(log_path):
        for row in read_metrics_lines(read_text(log_path)):
            batch += [Metric(f"train_{k}", float(row[k]), now, int(row["epoch"])) for k in ("loss", "lr") if k in row]
    for i in range(0, len(batch), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=batch[i : i + 900])


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 90):  # at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 90])


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _metric_name(text: str) -> str:
    """MLflow metric names take letters, digits, ``_ - . /`` and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(text))
