"""The Noisy Student round loop: teacher (round 0), then pseudo-label -> select -> train student -> evaluate.

Every stage of every round is recorded in ``round-NNN/manifest.json`` with the sha256 of its files and the
identity of its inputs (e.g. the teacher's weights). Re-running the same run skips what is done and verifies,
and redoes the first stage that is missing, damaged or stale, plus every stage after it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, dump_config, load_config
from pipeline.ray_pseudo_label import run_pseudo_label
from pipeline.ray_runtime import init_ray
from pipeline.ray_select import run_selection
from pipeline.ray_train import run_training
from pipeline.report import refresh_report
from pipeline.storage import RoundManifest, atomic_write_json, atomic_write_text, read_json, round_dir, sha256_file
from stages.data import DataError, LabeledSet, expand_shards, load_labeled, shard_id
from stages.evaluate import evaluate
from stages.loader import PseudoSource
from stages.models import atomic_save_safetensors, check_classifier, load_model, model_card
from stages.train import TrainPlan

log = logging.getLogger(__name__)

STAGES = ("pseudo_label", "select", "train", "evaluate")


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    labeled_shards: list[str]
    unlabeled_shards: list[str]
    labeled: LabeledSet
    test: LabeledSet
    params: dict[int, int]
    progress: bool = True


def preflight(cfg: PipelineConfig, progress: bool = True) -> RunContext:
    """Everything that can be checked before any work: shards exist, labels in range, models classify."""
    data = cfg.data
    labeled_shards = expand_shards(data.labeled, "data.labeled")
    unlabeled_shards = expand_shards(data.unlabeled, "data.unlabeled")
    test_shards = expand_shards(data.test, "data.test")
    params = {
        r: check_classifier(cfg.spec(r), data.num_classes, data.channels, data.image_size)
        for r in range(cfg.rounds + 1)
    }
    labeled = load_labeled(labeled_shards, data.num_classes, data.channels, data.max_bad_fraction, "data.labeled")
    test = load_labeled(test_shards, data.num_classes, data.channels, data.max_bad_fraction, "data.test")
    counts = [int((labeled.labels == c).sum()) for c in range(data.num_classes)]
    if min(counts) == 0:
        missing = [c for c, n in enumerate(counts) if n == 0]
        log.warning("data.labeled has no samples of class(es) %s; per-class counts: %s", missing, counts)
    return RunContext(cfg, Path(), labeled_shards, unlabeled_shards, labeled, test, params, progress)


def prepare_run_dir(cfg: PipelineConfig, run_name: str) -> Path:
    """Create the run folder, or check that an existing one was made by the same config (rounds may grow)."""
    run_dir = Path(cfg.storage).expanduser().resolve() / run_name
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        previous = load_config(config_path)
        if previous.digest() != _with_rounds(cfg, previous.rounds).digest():
            raise ConfigError(
                f"run {run_dir} was started with a different config; resume it with the same settings "
                f"(only rounds may change) or choose a new RUN name"
            )
    atomic_write_text(config_path, dump_config(cfg))
    return run_dir


def _with_rounds(cfg: PipelineConfig, rounds: int) -> PipelineConfig:
    import dataclasses

    return dataclasses.replace(cfg, rounds=rounds)


def run_pipeline(cfg: PipelineConfig, run_name: str, progress: bool = True) -> list[dict]:
    """Run (or resume) all rounds; returns one metrics dict per round."""
    ctx = preflight(cfg, progress)  # refuse bad data before anything is written
    run_dir = ctx.run_dir = prepare_run_dir(cfg, run_name)
    status = _load_status(run_dir, cfg)
    log.info("ray: %s", init_ray(cfg.resources.address or None, cfg.resources.num_cpus or None))
    rows = []
    try:
        for r in range(cfg.rounds + 1):
            rows.append(run_round(ctx, r, status))
            status["rounds_completed"] = r + 1
            _save_status(run_dir, status)
            refresh_report(run_dir)  # report.html + TensorBoard events; logs a warning on failure, never raises
    except BaseException as exc:
        status["status"] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
        _save_status(run_dir, status)
        raise
    status["status"] = "finished"
    _save_status(run_dir, status)
    return rows


def _load_status(run_dir: Path, cfg: PipelineConfig) -> dict:
    path = run_dir / "run.json"
    status = read_json(path) if path.exists() else {"run": run_dir.name, "started_at": _now(), "rounds": {}}
    status.update({"status": "running", "rounds_planned": cfg.rounds, "config_digest": cfg.digest()})
    return status


def _save_status(run_dir: Path, status: dict) -> None:
    status["updated_at"] = _now()
    atomic_write_json(run_dir / "run.json", status)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_round(ctx: RunContext, r: int, status: dict) -> dict:
    cfg, rdir = ctx.cfg, round_dir(ctx.run_dir, r)
    manifest = RoundManifest(rdir)
    manifest.data["round"] = r
    timings = status["rounds"].setdefault(str(r), {})
    pseudo: tuple[PseudoSource, ...] = ()
    pseudo_count, inputs = 0, {"config": cfg.digest()}
    if r > 0:
        teacher = round_dir(ctx.run_dir, r - 1)
        inputs["teacher"] = sha256_file(teacher / "model.safetensors")
        _stage(manifest, "pseudo_label", inputs, timings, lambda: _pseudo_label(ctx, teacher, rdir))
        inputs["pseudo_label"] = manifest.stage("pseudo_label")["digest"]
        summary = _stage(manifest, "select", inputs, timings, lambda: _select(ctx, rdir))
        inputs["select"] = manifest.stage("select")["digest"]
        pseudo = tuple(
            PseudoSource(s, str(rdir / "selection" / f"{shard_id(s)}.parquet")) for s in ctx.unlabeled_shards
        )
        pseudo_count = int(summary["copies_out"])
        if not pseudo_count:
            raise DataError(
                f"round {r}: selection kept no pseudo-labeled sample of {summary['rows_in']} "
                f"(select.floor={cfg.select.floor}); lower the floor or train a better teacher"
            )
    _stage(manifest, "train", inputs, timings, lambda: _train(ctx, r, rdir, pseudo, pseudo_count, inputs))
    inputs["train"] = sha256_file(rdir / "model.safetensors")
    return _stage(manifest, "evaluate", inputs, timings, lambda: _evaluate(ctx, r, rdir, pseudo_count, manifest))


def _stage(manifest: RoundManifest, stage: str, inputs: dict, timings: dict, work) -> dict:
    """Run ``work`` unless the stage is done for these inputs; ``work`` returns ``(files, info)``."""
    if manifest.stage_done(stage, inputs):
        log.info("%s %s: done, skipping", manifest.dir.name, stage)
        return manifest.stage(stage).get("result", {})
    for later in STAGES[STAGES.index(stage) :]:
        manifest.forget(later)  # redoing a stage makes every later one stale
    start = time.perf_counter()
    log.info("%s %s: starting", manifest.dir.name, stage)
    files, result = work()
    seconds = time.perf_counter() - start
    digest = sha256_file(files[0]) if len(files) == 1 else _digest_files(files)
    manifest.record(stage, files, seconds, inputs=dict(inputs), digest=digest, result=result)
    timings[stage] = round(seconds, 2)
    return result


def _digest_files(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def _pseudo_label(ctx: RunContext, teacher: Path, rdir: Path) -> tuple[list[Path], dict]:
    cfg = ctx.cfg
    summary = run_pseudo_label(
        str(teacher),
        ctx.unlabeled_shards,
        str(rdir / "pseudo_labels"),
        cfg.pseudo_label,
        cfg.data.channels,
        cfg.resources.label(),
        progress=ctx.progress,
    )
    files = [Path(p) for p in summary.pop("sidecars")]
    return files, summary


def _select(ctx: RunContext, rdir: Path) -> tuple[list[Path], dict]:
    cfg = ctx.cfg
    sidecars = [str(rdir / "pseudo_labels" / f"{shard_id(s)}.parquet") for s in ctx.unlabeled_shards]
    summary = run_selection(sidecars, str(rdir / "selection"), cfg.data.num_classes, cfg.select)
    files = [rdir / "selection" / Path(p).name for p in sidecars]
    files += [p for p in (rdir / "selection" / "selection.json", rdir / "selection" / "selection.png") if p.exists()]
    return files, summary


def _train(ctx: RunContext, r: int, rdir: Path, pseudo, pseudo_count: int, inputs: dict) -> tuple[list[Path], dict]:
    cfg, data = ctx.cfg, ctx.cfg.data
    train_cfg = cfg.teacher if r == 0 else cfg.student
    spec = cfg.spec(r)
    init = ""
    if r > 0 and train_cfg.init_from_teacher:
        init = str(round_dir(ctx.run_dir, r - 1) / "model.safetensors")
    metrics_path = rdir / "train_metrics.jsonl"
    plan = TrainPlan(
        spec=spec,
        cfg=train_cfg,
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        labeled=tuple(ctx.labeled_shards),
        pseudo=pseudo,
        labeled_count=len(ctx.labeled),
        pseudo_count=pseudo_count,
        metrics_path=str(metrics_path),
        init_weights=init,
        threads=cfg.resources.torch_threads,
    )
    key = _digest_dict(inputs)[:10]
    with tempfile.TemporaryDirectory(prefix="ns-final-") as tmp:
        final = run_training(
            plan, str(ctx.run_dir / "ray_train"), f"round-{r:03d}-{key}", cfg.resources.train(), Path(tmp)
        )
        weights = Path(tmp) / ("final-ema.safetensors" if train_cfg.ema_decay else "final-model.safetensors")
        from safetensors.torch import load_file

        atomic_save_safetensors(load_file(weights), rdir / "model.safetensors")
    card = model_card(spec, data.num_classes, data.channels, data.image_size, data.mean, data.std)
    card["round"], card["params"] = r, ctx.params[r]
    atomic_write_json(rdir / "model.json", card)
    files = [rdir / "model.safetensors", rdir / "model.json"]
    return files, {
        "final_epoch": final.get("epoch"),
        "steps": final.get("step"),
        "images_per_s": final.get("images_per_s"),
        "loss": final.get("loss"),
    }


def _digest_dict(d: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _evaluate(ctx: RunContext, r: int, rdir: Path, pseudo_count: int, manifest: RoundManifest):
    model, card = load_model(rdir)
    metrics = evaluate(model, card, ctx.test)
    metrics.update(
        {
            "round": r,
            "model": card["timm_name"],
            "params": ctx.params[r],
            "labeled_images": len(ctx.labeled),
            "pseudo_images": pseudo_count,
            "train_images": len(ctx.labeled) + pseudo_count,
            "stage_seconds": {s: manifest.data["stages"][s]["seconds"] for s in STAGES if s in manifest.data["stages"]},
        }
    )
    if r > 0:
        teacher_metrics = read_json(round_dir(ctx.run_dir, r - 1) / "metrics.json")
        metrics["teacher_top1"] = teacher_metrics["test_top1"]
        pl = manifest.stage("pseudo_label")["result"]
        metrics["pseudo_label_accuracy"] = pl.get("accuracy")
    atomic_write_json(rdir / "metrics.json", metrics)
    return [rdir / "metrics.json"], metrics
