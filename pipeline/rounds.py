"""The Noisy Student round loop: teacher (round 0), then pseudo-label -> select -> train student -> evaluate.

Every stage of every round is recorded in ``round-NNN/manifest.json`` with the sha256 of its files and the
identity of its inputs (e.g. the teacher's weights). Re-running the same run skips what is done and verifies,
and redoes the first stage that is missing, damaged or stale, plus every stage after it.

Before round 0 the data check (``pipeline/distributed/data_check.py``) refuses test images in the training data and
records what it found in ``run.json``. Errors a user can act on (bad data, a full or read-only disk) reach the CLI
as one line even when a Ray task, actor or training worker raised them (``user_error``).

Every choice (stop rule, best round) is made on the validation split (``pipeline/choices.py``); test is evaluated
and reported, never used to choose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.choices import check_recorded, load_validation, round_seeds, stop_record
from pipeline.cluster.run_store import publish_round
from pipeline.config import ConfigError, PipelineConfig, dump_config, load_config
from pipeline.distributed.data_check import check_data, scan_labeled_splits
from pipeline.distributed.evaluate import run_evaluation
from pipeline.distributed.pseudo_label import run_pseudo_label
from pipeline.distributed.runtime import causes, init_ray
from pipeline.distributed.select import run_selection
from pipeline.distributed.train import run_training
from pipeline.report.page import refresh_report
from pipeline.report.tracking import track_round
from stages.data.compact import SELECTION_FORMAT, pseudo_sources
from stages.data.corruptions import variants
from stages.data.labeled_scan import LabeledIndex
from stages.data.loader import PseudoSource
from stages.data.shards import DataError, expand_shards, shard_id
from stages.evaluate import eval_metrics, eval_sidecar, split_name
from stages.models.factory import atomic_save_safetensors, check_classifier, model_card
from stages.models.pretrained import absolute, adopt_model, check_teacher_source, source_digest
from stages.models.transforms import preprocessing
from stages.storage.files import (
    Location,
    RoundManifest,
    StorageError,
    atomic_write_json,
    atomic_write_text,
    exists,
    is_url,
    join,
    name,
    parent,
    probe_storage,
    read_json,
    read_text,
    remove_temp_files,
    round_dir,
    sha256_file,
    storage_error,
)
from stages.train import TrainPlan

log = logging.getLogger(__name__)

STAGES = ("pseudo_label", "select", "train", "evaluate")


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Location  # a local folder, or a URL (stages/storage/files.py)
    labeled_shards: list[str]
    unlabeled_shards: list[str]
    labeled: LabeledIndex  # keys, labels and pixel digests: the driver holds no image (stages/data/labeled_scan.py)
    test: LabeledIndex
    params: dict[int, int]
    progress: bool = True
    test_shards: list[str] = field(default_factory=list)
    stages_run: int = 0  # stages this process ran (not skipped as done)
    val: LabeledIndex | None = None  # the validation split (labeled holds the training part only)
    validation: dict = field(default_factory=dict)  # how it was made, for run.json

    @property
    def exclude_keys(self) -> frozenset[str]:
        """Labeled keys never trained on: a validation split carved from the labeled shards."""
        return frozenset(self.validation.get("carved_keys", ()))


def preflight(cfg: PipelineConfig, progress: bool = True) -> RunContext:
    """Everything that can be checked before any work: storage writable, shards exist, models classify, labels in
    range and few enough unusable samples (the labeled, test and validation shards scanned by per-shard Ray tasks,
    or in this process when they are small local files; cached per shard, so a resume does not decode them again)."""
    probe_storage(cfg.storage)  # an object-store URL: bucket, credentials and endpoint, before anything else
    data = cfg.data
    labeled_shards = expand_shards(data.labeled, "data.labeled")
    unlabeled_shards = expand_shards(data.unlabeled, "data.unlabeled")
    test_shards = expand_shards(data.test, "data.test")
    params = {
        r: check_classifier(cfg.spec(r), data.num_classes, data.channels, data.image_size)
        for r in range(cfg.rounds + 1)
    }
    splits = {"data.labeled": labeled_shards, "data.test": test_shards}
    if data.val:
        splits["data.val"] = expand_shards(data.val, "data.val")
    scans = scan_labeled_splits(
        splits,
        data.num_classes,
        data.channels,
        data.max_bad_fraction,
        str(scan_cache(cfg)),
        progress,
        start_ray=lambda: init_ray(cfg.resources.address or None, cfg.resources.num_cpus or None),
    )
    labeled, test = scans["data.labeled"], scans["data.test"]
    labeled, val, validation = load_validation(cfg, labeled, scans.get("data.val"))
    counts = [int((labeled.labels == c).sum()) for c in range(data.num_classes)]
    if min(counts) == 0:
        missing = [c for c, n in enumerate(counts) if n == 0]
        log.warning("data.labeled has no samples of class(es) %s; per-class counts: %s", missing, counts)
    t = cfg.teacher
    check_teacher_source(t.init, t.from_model, cfg.spec(0), data.num_classes, data.channels, data.classes)
    ctx = RunContext(cfg, Path(), labeled_shards, unlabeled_shards, labeled, test, params, progress, test_shards)
    ctx.val, ctx.validation = val, validation
    return ctx


def scan_cache(cfg: PipelineConfig) -> Location:
    """``<storage>/.scan-cache``: labeled scans kept per shard identity, shared by the runs under that storage."""
    return join(run_folder(cfg, ".scan-cache"))


def run_folder(cfg: PipelineConfig, run_name: str) -> Location:
    """``<storage>/<run>``: an absolute ``Path`` for a local root, a URL string for an object store."""
    if is_url(cfg.storage):
        return join(cfg.storage, run_name)
    return Path(cfg.storage.removeprefix("file://")).expanduser().resolve() / run_name


def stage_config_digest(cfg: PipelineConfig) -> str:
    """The config as the stages see it. Left out: ``rounds`` (a resumed run may grow), ``name``, ``storage`` and
    ``publish`` (what the run is called, where it lives and is copied to), ``data.allow_test_overlap`` (it only
    lets the data check pass) and ``stop`` (it decides whether a next round runs, not what one computes): none
    changes what a stage computes, so none makes a finished stage stale."""
    tree = cfg.identity()  # keys added later are left out at their defaults (stages.core.config.LATE)
    tree.pop("tracking", None)  # where results are logged, like publish
    for key in ("rounds", "name", "storage", "publish", "stop"):
        tree.pop(key)
    tree["data"].pop("allow_test_overlap")
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def check_same_config(cfg: PipelineConfig, run_dir: Location) -> None:
    """An existing run resumes only with the settings it was started with (rounds may change)."""
    config_path = join(run_dir, "config.yaml")
    if not exists(config_path):
        return
    if is_url(config_path):
        started = load_config(None, base=yaml.safe_load(read_text(config_path)))
    else:
        started = load_config(config_path)
    if stage_config_digest(started) != stage_config_digest(cfg):
        raise ConfigError(
            f"run {run_dir} was started with a different config; resume it with the same settings "
            f"(only rounds may change) or choose a new RUN name"
        )


def prepare_run_dir(cfg: PipelineConfig, run_name: str) -> Location:
    """Create the run folder, or check that an existing one was made by the same config (rounds may grow)."""
    run_dir = run_folder(cfg, run_name)
    check_same_config(cfg, run_dir)
    atomic_write_text(join(run_dir, "config.yaml"), dump_config(cfg))
    return run_dir


def run_pipeline(cfg: PipelineConfig, run_name: str, progress: bool = True) -> list[dict]:
    """Run (or resume) all rounds; returns one metrics dict per round."""
    ctx = preflight(cfg, progress)  # refuse bad data before anything is written
    run_dir = ctx.run_dir = run_folder(cfg, run_name)
    check_same_config(cfg, run_dir)
    log.info("ray: %s", init_ray(cfg.resources.address or None, cfg.resources.num_cpus or None))
    shards = {"labeled": ctx.labeled_shards, "unlabeled": ctx.unlabeled_shards, "test": ctx.test_shards}
    if ctx.validation.get("shards"):
        shards["val"] = ctx.validation["shards"]
    previous = _read_status(run_dir)
    check_recorded(ctx.validation, previous.get("validation"))  # a resumed run holds out what it held out
    with one_line_errors(run_dir):  # a refusal here still leaves no run folder behind
        data_check = check_data(
            cfg.data, ctx.labeled, ctx.test, shards, previous.get("data_check"), ctx.progress, val=ctx.val
        )
    prepare_run_dir(cfg, run_name)
    status = _load_status(run_dir, cfg)
    status["data_check"], status["validation"] = data_check, ctx.validation
    _save_status(run_dir, status)
    rows: list[dict] = []
    try:
        for r in range(cfg.rounds + 1):
            ran = ctx.stages_run
            rows.append(run_round(ctx, r, status))
            status["rounds_completed"] = r + 1
            status["stop"] = stop = stop_record(cfg, rows)
            _save_status(run_dir, status)
            if cfg.publish:
                log.info("round-%03d published to %s", r, publish_round(run_dir, r, cfg.publish))
            if cfg.tracking.mlflow:  # a warning on failure, never raises
                track_round(cfg, run_dir, r, status)
                _save_status(run_dir, status)
            # report.html + TensorBoard events (a warning on failure, never raises), a few seconds each: after a round
            # that did work, and after the last round; a resume does not rewrite it for every round it skips.
            if ctx.stages_run > ran or r == cfg.rounds or stop["stopped_early"]:
                refresh_report(run_dir)
            if stop["stopped_early"]:
                log.info("stopping after round %d: %s; best round %d", r, stop["reason"], stop["best_round"])
                break
    except BaseException as exc:
        status["status"] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
        try:
            _save_status(run_dir, status)
        except StorageError as unrecorded:  # the disk that failed the stage: keep the stage's error, not this one
            log.warning("could not record the failure in run.json: %s", unrecorded)
        raise
    status["status"] = "finished"
    _save_status(run_dir, status)
    if cfg.publish:
        publish_round(run_dir, rows[-1]["round"], cfg.publish)  # again, for the final run.json
    return rows


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


def _read_status(run_dir: Location) -> dict:
    path = join(run_dir, "run.json")
    try:
        return read_json(path) if exists(path) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is damaged; starting a new one (the round manifests still say what is done)", path)
        return {}


def _load_status(run_dir: Location, cfg: PipelineConfig) -> dict:
    status = _read_status(run_dir) or {"run": name(run_dir), "started_at": _now(), "rounds": {}}
    status.update({"status": "running", "rounds_planned": cfg.rounds, "config_digest": cfg.digest()})
    return status


def _save_status(run_dir: Location, status: dict) -> None:
    status["updated_at"] = _now()
    atomic_write_json(join(run_dir, "run.json"), status)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_round(ctx: RunContext, r: int, status: dict) -> dict:
    cfg, rdir = ctx.cfg, round_dir(ctx.run_dir, r)
    manifest = RoundManifest(rdir)
    manifest.data["round"] = r
    timings = status["rounds"].setdefault(str(r), {})
    pseudo: tuple[PseudoSource, ...] = ()
    pseudo_count, inputs = 0, {"config": stage_config_digest(cfg)}
    if r > 0:
        teacher = round_dir(ctx.run_dir, r - 1)
        inputs["teacher"] = sha256_file(join(teacher, "model.safetensors"))
        _stage(ctx, manifest, "pseudo_label", inputs, timings, lambda: _pseudo_label(ctx, teacher, rdir))
        inputs["pseudo_label"] = manifest.stage("pseudo_label")["digest"]
        inputs["selection_format"] = SELECTION_FORMAT  # a selection of an older layout is redone, not read
        summary = _stage(ctx, manifest, "select", inputs, timings, lambda: _select(ctx, rdir, r))
        inputs["select"] = manifest.stage("select")["digest"]
        pseudo = tuple(pseudo_sources(join(rdir, "selection"), ctx.unlabeled_shards))  # the non-empty compact shards
        pseudo_count = int(summary["copies_out"])
        if not pseudo_count:
            raise DataError(
                f"round {r}: selection kept no pseudo-labeled sample of {summary['rows_in']} "
                f"(select.floor={cfg.select.floor}); lower the floor or train a better teacher"
            )
    else:
        inputs.update(source_digest(cfg.teacher.init, cfg.teacher.from_model))  # {} unless round 0 starts from weights
    _stage(ctx, manifest, "train", inputs, timings, lambda: _train(ctx, r, rdir, pseudo, pseudo_count, inputs))
    inputs["train"] = sha256_file(join(rdir, "model.safetensors"))
    evaluate = lambda: _evaluate(ctx, r, rdir, pseudo_count, manifest, inputs["train"])  # noqa: E731
    return _stage(ctx, manifest, "evaluate", inputs, timings, evaluate)


def _stage(ctx: RunContext, manifest: RoundManifest, stage: str, inputs: dict, timings: dict, work) -> dict:
    """Run ``work`` unless the stage is done for these inputs; ``work`` returns ``(files, info)``."""
    if manifest.stage_done(stage, inputs):
        log.info("%s %s: done, skipping", name(manifest.dir), stage)
        return manifest.stage(stage).get("result", {})
    for later in STAGES[STAGES.index(stage) :]:
        manifest.forget(later)  # redoing a stage makes every later one stale
    start = time.perf_counter()
    log.info("%s %s: starting", name(manifest.dir), stage)
    # A writer that does not name its file (Ray Train uploading a checkpoint into <run>/ray_train, a plain open())
    # is reported as the run folder, which holds both.
    with one_line_errors(parent(manifest.dir)):
        if removed := remove_temp_files(manifest.dir):
            log.info("%s: removed %d temporary file(s) an interrupted write left", name(manifest.dir), len(removed))
        files, result = work()
    ctx.stages_run += 1
    seconds = time.perf_counter() - start
    digest = sha256_file(files[0]) if len(files) == 1 else _digest_files(files)
    manifest.record(stage, files, seconds, inputs=dict(inputs), digest=digest, result=result)
    timings[stage] = round(seconds, 2)
    return result


def _digest_files(files: list[Location]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):  # type: ignore[type-var]  # all Paths or all URL strings
        h.update(name(f).encode() + sha256_file(f).encode())
    return h.hexdigest()


def _pseudo_label(ctx: RunContext, teacher: Location, rdir: Location) -> tuple[list[Location], dict]:
    cfg = ctx.cfg
    summary = run_pseudo_label(
        str(teacher),
        ctx.unlabeled_shards,
        str(join(rdir, "pseudo_labels")),
        cfg.pseudo_label,
        cfg.data.channels,
        cfg.resources.label(),
        progress=ctx.progress,
    )
    files = [join(p) for p in summary.pop("sidecars")]
    return files, summary


def _select(ctx: RunContext, rdir: Location, r: int) -> tuple[list[Location], dict]:
    cfg = ctx.cfg
    sidecars = [str(join(rdir, "pseudo_labels", f"{shard_id(s)}.parquet")) for s in ctx.unlabeled_shards]
    select_cfg = dataclasses.replace(cfg.select, seed=round_seeds(cfg, r)["select"])
    summary = run_selection(sidecars, str(join(rdir, "selection")), cfg.data.num_classes, select_cfg)
    files = [join(rdir, "selection", name(p)) for p in sidecars]
    files += [join(src.shard) for src in pseudo_sources(join(rdir, "selection"), ctx.unlabeled_shards)]  # the tars
    files += [
        p for p in (join(rdir, "selection", "selection.json"), join(rdir, "selection", "selection.png")) if exists(p)
    ]
    return files, summary


def plan_input(data, spec) -> tuple[dict, dict]:
    """How a model of ``spec`` sees the data: the ``TrainPlan`` fields of its input (mean/std as trained, the
    model's own under ``augment: natural``, plus interpolation and crop) and its ``model.json`` card. One place for
    the round loop and ``tune``'s trials, so a trial trains and is scored exactly as the round's student is."""
    pre = preprocessing(spec.model, data.channels, data.mean, data.std, data.augment)
    fields = {
        "spec": spec,
        "num_classes": data.num_classes,
        "channels": data.channels,
        "image_size": data.image_size,
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
        "preprocess": tuple((k, v) for k, v in pre.items() if k not in ("mean", "std")),
    }
    card = model_card(spec, data.num_classes, data.channels, data.image_size, data.mean, data.std)
    card.update(pre)  # mean/std as trained, interpolation, crop_pct
    return fields, card


def _train(ctx: RunContext, r: int, rdir: Location, pseudo, pseudo_count: int, inputs: dict) -> tuple[list, dict]:
    cfg, data = ctx.cfg, ctx.cfg.data
    train_cfg = cfg.teacher if r == 0 else cfg.student
    train_cfg = dataclasses.replace(train_cfg, seed=round_seeds(cfg, r)["train"])  # each round its own seed
    spec = cfg.spec(r)
    if r == 0 and cfg.teacher.from_model:  # round 0 is that model: copied with its card, not trained
        return adopt_model(cfg.teacher.from_model, rdir, data.num_classes, data.channels, data.names())
    inputs_of_plan, card = plan_input(data, spec)
    init = ""
    if r > 0 and train_cfg.init_from_teacher:
        init = str(join(round_dir(ctx.run_dir, r - 1), "model.safetensors"))
    metrics_path = join(rdir, "train_metrics.jsonl")
    plan = TrainPlan(
        **inputs_of_plan,
        cfg=train_cfg,
        labeled=tuple(ctx.labeled_shards),
        pseudo=pseudo,
        labeled_count=len(ctx.labeled),
        pseudo_count=pseudo_count,
        metrics_path=str(metrics_path),
        init_weights=init,
        teacher_dir=str(round_dir(ctx.run_dir, r - 1)) if r > 0 and train_cfg.online_teacher else "",
        threads=cfg.resources.torch_threads,
        init_from=absolute(cfg.teacher.init) if r == 0 else "",
        exclude_keys=ctx.exclude_keys,
    )
    key = _digest_dict(inputs)[:10]
    with tempfile.TemporaryDirectory(prefix="ns-final-") as tmp:  # node-local scratch, whatever the storage
        final = run_training(
            plan, str(join(ctx.run_dir, "ray_train")), f"round-{r:03d}-{key}", cfg.resources.train(), Path(tmp)
        )
        weights = Path(tmp) / ("final-ema.safetensors" if train_cfg.ema_decay else "final-model.safetensors")
        from safetensors.torch import load_file

        atomic_save_safetensors(load_file(weights), join(rdir, "model.safetensors"))
    card["round"], card["params"], card["classes"] = r, ctx.params[r], data.names()
    atomic_write_json(join(rdir, "model.json"), card)
    files = [join(rdir, "model.safetensors"), join(rdir, "model.json")]
    return files, {
        "final_epoch": final.get("epoch"),
        "steps": final.get("step"),
        "images_per_s": final.get("images_per_s"),
        "loss": final.get("loss"),
    }


def _digest_dict(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def evaluation_tasks(ctx: RunContext) -> tuple[list[dict], dict[str, frozenset[str]], list[str]]:
    """``(tasks, only, validation shards)``: the test shards, the validation shards (the labeled shards holding the
    carved keys, scored on those keys only, when the split is carved) and the test shards once per corruption."""
    cfg = ctx.cfg
    tasks = [{"shard": s, "split": "test", "corruption": "", "severity": 0} for s in ctx.test_shards]
    only: dict[str, frozenset[str]] = {}
    val_shards: list[str] = []
    if ctx.val is not None:
        val_shards = ctx.val.shards_holding()
        if ctx.exclude_keys:
            only["val"] = ctx.exclude_keys
        tasks += [{"shard": s, "split": "val", "corruption": "", "severity": 0} for s in val_shards]
    for corruption, severity in variants(cfg.robustness):
        split = split_name(corruption, severity)
        tasks += [{"shard": s, "split": split, "corruption": corruption, "severity": severity} for s in ctx.test_shards]
    return tasks, only, val_shards


def _evaluate(ctx: RunContext, r: int, rdir: Location, pseudo_count: int, manifest: RoundManifest, model_sha: str):
    cfg = ctx.cfg
    out = join(rdir, "eval")
    tasks, only, val_shards = evaluation_tasks(ctx)
    summary = run_evaluation(
        str(rdir), model_sha, tasks, str(out), cfg.data.channels, cfg.resources.label(), only,
        cfg.robustness.seed, ctx.progress,
    )  # fmt: skip
    metrics = eval_metrics(out, ctx.test_shards, cfg.data.num_classes, val_shards, variants(cfg.robustness))
    metrics["classes"] = cfg.data.names()  # per_class_top1 and confusion are indexed by these
    metrics["evaluation"] = summary  # where it ran (devices, in-process or actors) and how long it took
    card = read_json(join(rdir, "model.json"))
    metrics["seeds"] = round_seeds(ctx.cfg, r)
    metrics.update(
        {
            "round": r,
            "model": card["timm_name"],
            "params": card.get("params", ctx.params[r]),
            "labeled_images": len(ctx.labeled),
            "pseudo_images": pseudo_count,
            "train_images": len(ctx.labeled) + pseudo_count,
            "stage_seconds": {s: manifest.data["stages"][s]["seconds"] for s in STAGES if s in manifest.data["stages"]},
        }
    )
    if r > 0:
        teacher_metrics = read_json(join(round_dir(ctx.run_dir, r - 1), "metrics.json"))
        metrics["teacher_top1"] = teacher_metrics["test_top1"]
        metrics["teacher_val_top1"] = teacher_metrics.get("val_top1")
        pl = manifest.stage("pseudo_label")["result"]
        metrics["pseudo_label_accuracy"] = pl.get("accuracy")
    atomic_write_json(join(rdir, "metrics.json"), metrics)
    sidecars = [eval_sidecar(out, t["split"], t["shard"]) for t in tasks]
    return [join(rdir, "metrics.json"), *sidecars], metrics
