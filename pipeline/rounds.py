"""The Noisy Student round loop: round 0 trains the teacher; every later round pseudo-labels, selects, trains a
student and evaluates it. Each round is a list of stages (``pipeline/plan.round_stages``) run by ``run_stage``.

Every stage of every round is recorded in ``round-NNN/manifest.json`` with its inputs (the digests of its config and
of what it reads: the teacher's weights, the pseudo-labels, the selection) and each file it wrote. Re-running the
same run skips what is done from the same inputs with its files whole, and redoes the first stage that is missing,
damaged or stale, plus every stage after it; inside a stage, per-shard files that name the current inputs in their
footers and still hash as written are kept (``stages.storage.artifacts``).

Before round 0, ``preflight`` checks everything that can be checked without work: storage, shards, models, labels,
validation and, by a data check (``stages/data_check.py``), test images in the training data; a refused start writes
no run folder. Where the work runs (this process or Ray) is decided there once (``choose_executor``). Errors a user
can act on (bad data, a full or read-only disk) reach the CLI as one line wherever they were raised
(``user_error``).

Every choice (stop rule, best round) is made on the validation split (``pipeline/choices.py``); test is evaluated
and reported, never used to choose.
"""

from __future__ import annotations

import json
import logging
import time

from pipeline.choices import check_recorded, load_validation, stop_record
from pipeline.cluster.run_store import publish_round
from pipeline.config import PipelineConfig, check_models, dump_config
from pipeline.distributed.executor import choose_executor
from pipeline.distributed.runtime import init_ray, one_line_errors
from pipeline.plan import check_same_config, round_stages, run_folder, stage_config_digest, storage_root
from pipeline.report.page import refresh_report
from pipeline.report.tracking import track_round
from stages.core.stage import ROUND_STAGES, Executor, RunData, Stage, StageContext
from stages.data.shards import expand_shards
from stages.data_check import CheckSettings, check_data, scan_labeled_splits
from stages.maths.classes import stuck_classes
from stages.models.factory import check_classifier
from stages.models.pretrained import check_teacher_source
from stages.storage.artifacts import RoundManifest
from stages.storage.files import (
    StorageError,
    atomic_write_json,
    atomic_write_text,
    exists,
    name,
    probe_storage,
    read_json,
    remove_temp_files,
)
from stages.storage.layout import RunLayout, scan_cache

log = logging.getLogger(__name__)


class Run:
    """A run in progress: its config, files, data, executor, and ``run.json``'s status."""

    def __init__(self, cfg: PipelineConfig, data: RunData, params: dict[int, int], executor: Executor, why: str):
        self.cfg, self.data, self.params, self.executor = cfg, data, params, executor
        self.executor_reason = why
        self.layout = RunLayout("")
        self.stages_run = 0  # stages this process ran (not skipped as done)
        self.config_digest = stage_config_digest(cfg)
        self.progress = True
        self.pretrain: dict = {}  # whether round 0 pretrains its encoder, and why (run.json)


def preflight(cfg: PipelineConfig, progress: bool = True) -> Run:
    """Everything that can be checked before any work: storage writable, shards exist, models classify, labels in
    range and few enough unusable samples (the labeled, test and validation shards scanned per shard, cached per
    shard, so a resume does not decode them again); and where the run's work will run."""
    probe_storage(cfg.storage)  # an object-store URL: bucket, credentials and endpoint, before anything else
    data = cfg.data
    shards = {
        "data.labeled": expand_shards(data.labeled, "data.labeled"),
        "data.unlabeled": expand_shards(data.unlabeled, "data.unlabeled"),
        "data.test": expand_shards(data.test, "data.test"),
    }
    if data.val:
        shards["data.val"] = expand_shards(data.val, "data.val")
    params = {
        r: check_classifier(cfg.spec(r), data.num_classes, data.channels, data.image_size)
        for r in range(cfg.rounds + 1)
    }
    check_models(cfg)
    res = cfg.resources
    every = [s for split in shards.values() for s in split]
    gpus = res.use_gpu or bool(res.gpus_per_label_actor)
    executor, why = choose_executor(res.executor, res.address, gpus, every, cfg.storage, progress)
    log.info("executor: %s (%s)", executor.kind, why)
    if executor.kind == "ray":
        log.info("ray: %s", init_ray(res.address or None, res.num_cpus or None))
    splits = {k: v for k, v in shards.items() if k != "data.unlabeled"}
    scans = scan_labeled_splits(
        splits, data.num_classes, data.channels, data.max_bad_fraction, str(scan_cache(storage_root(cfg))), executor
    )
    labeled, val, validation = load_validation(cfg, scans["data.labeled"], scans.get("data.val"))
    counts = [int((labeled.labels == c).sum()) for c in range(data.num_classes)]
    if min(counts) == 0:
        missing = [c for c, n in enumerate(counts) if n == 0]
        log.warning("data.labeled has no samples of class(es) %s; per-class counts: %s", missing, counts)
    t = cfg.teacher
    check_teacher_source(t.init, t.from_model, cfg.spec(0), data.num_classes, data.channels, data.classes)
    given = f"teacher.init {t.init}" if t.init else f"teacher.from_model {t.from_model}" if t.from_model else ""
    pretrain = cfg.pretrain.decide(counts, given)
    chosen = cfg.select.resolve(pretrain["on"])  # what auto makes of a weak teacher (recorded in run.json)
    students = cfg.pretrain.students_from_encoder(pretrain["on"], cfg.student.init_from_teacher)
    pretrain["then"] = {"select_mode": chosen.mode, "select_align": chosen.align, "students_from_encoder": students}
    log.info(
        "pretrain: %s (%s); select %s, align %s, students from %s",
        "on" if pretrain["on"] else "off",
        pretrain["reason"],
        chosen.mode,
        chosen.align,
        "the encoder" if students else "scratch or their teacher",
    )
    run_data = RunData(
        labeled_shards=shards["data.labeled"],
        unlabeled_shards=shards["data.unlabeled"],
        test_shards=shards["data.test"],
        labeled=labeled,
        test=scans["data.test"],
        num_classes=data.num_classes,
        channels=data.channels,
        names=data.names(),
        val=val,
        validation=validation,
        pretrain=pretrain["on"],
    )
    run = Run(cfg, run_data, params, executor, why)
    run.progress, run.pretrain = progress, pretrain
    return run


def run_pipeline(cfg: PipelineConfig, run_name: str, progress: bool = True) -> list[dict]:
    """Run (or resume) all rounds; returns one metrics dict per round."""
    with one_line_errors(str(cfg.storage)):  # a refusal here leaves no run folder behind
        run = preflight(cfg, progress)
        run.layout = layout = RunLayout(run_folder(cfg, run_name))
        check_same_config(cfg, layout.dir)
        previous = _read_status(layout)
        check_recorded(run.data.validation, previous.get("validation"))  # a resumed run holds out what it held out
        data_check = _data_check(run, previous.get("data_check"))
    atomic_write_text(layout.config, dump_config(cfg))
    status = _load_status(layout, cfg)
    status |= {"data_check": data_check, "validation": run.data.validation, "pretrain": run.pretrain}
    run.data.unlabeled_images = int(data_check.get("unlabeled", {}).get("images", 0))
    status["executor"] = {"kind": run.executor.kind, "reason": run.executor_reason}
    _save_status(layout, status)
    rows: list[dict] = []
    val: list = []
    try:
        for r in range(cfg.rounds + 1):
            ran = run.stages_run
            rows.append(run_round(run, r, status))
            val.append(round_val_predictions(run, r))
            status["rounds_completed"] = r + 1
            status["stop"] = stop = stop_record(cfg, rows, val)
            status["stuck_classes"] = warn_stuck(rows, cfg.data.names())
            _save_status(layout, status)
            _after_round(run, r, status, report=run.stages_run > ran or r == cfg.rounds or stop["stopped_early"])
            if stop["stopped_early"]:
                log.info("stopping after round %d: %s; best round %d", r, stop["reason"], stop["best_round"])
                break
    except BaseException as exc:
        status["status"] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
        try:
            _save_status(layout, status)
        except StorageError as unrecorded:  # the disk that failed the stage: keep the stage's error, not this one
            log.warning("could not record the failure in run.json: %s", unrecorded)
        raise
    if status["stop"].get("noise_warning"):
        log.warning("%s", status["stop"]["noise_warning"])
    log.info("best round %d: %s", status["stop"]["best_round"], status["stop"]["best_reason"])
    status["status"] = "finished"
    _save_status(layout, status)
    if cfg.publish:
        publish_round(layout.dir, rows[-1]["round"], cfg.publish)  # again, for the final run.json
    return rows


def round_val_predictions(run: Run, r: int):
    """Round ``r``'s predictions on the validation images, from its eval sidecars (None without validation): what
    the best-round and stop rules compare rounds on, image by image."""
    from stages.evaluate import eval_sidecar, val_predictions

    if run.data.val is None:
        return None
    out_dir = run.layout.round(r).eval
    return val_predictions([eval_sidecar(out_dir, "val", s) for s in run.data.val.shards_holding()])[1]


def warn_stuck(rows: list[dict], names: list[str]) -> list[dict]:
    """One warning line per class the rounds leave behind (``stages.maths.classes.stuck_classes``, on validation);
    returns them for ``run.json``."""
    per_class = [m.get("val_per_class_top1") for m in rows]
    if any(p is None for p in per_class):
        return []
    found = []
    for c in stuck_classes(per_class):
        share = (rows[-1].get("pseudo_per_class") or [None] * len(names))[c]
        total = sum(rows[-1].get("pseudo_per_class") or [0]) or 1
        record = {
            "class": names[c],
            "val_recall_round0": per_class[0][c],
            "val_recall_now": per_class[-1][c],
            "pseudo_share": None if share is None else share / total,
        }
        found.append(record)
        pseudo = "" if share is None else f"; it got {share / total:.0%} of the pseudo-labels"
        log.warning(
            "class %s did not move: validation recall %.0f%% in round 0, %.0f%% after round %d%s; label more of it: "
            "python -m pipeline suggest-labels RUN --n 50 --out DIR",
            names[c],
            100 * per_class[0][c],
            100 * per_class[-1][c],
            rows[-1]["round"],
            pseudo,
        )
    return found


def _data_check(run: Run, previous: dict | None) -> dict:
    cfg, data = run.cfg, run.data
    shards = {"labeled": data.labeled_shards, "unlabeled": data.unlabeled_shards, "test": data.test_shards}
    if data.validation.get("shards"):
        shards["val"] = data.validation["shards"]
    carve = (cfg.data.val_per_class, cfg.data.val_seed) if cfg.data.val_per_class else None
    settings = CheckSettings(cfg.data.channels, cfg.data.allow_test_overlap, carve, cfg.pseudo_label.max_bad_fraction)
    return check_data(settings, data.labeled, data.test, shards, run.executor, previous, val=data.val)


def _after_round(run: Run, r: int, status: dict, report: bool) -> None:
    """Publish the round, log it to MLflow, rewrite the report (a warning on failure, never raised; the report only
    after a round that did work, and after the last)."""
    cfg, layout = run.cfg, run.layout
    if cfg.publish:
        log.info("round-%03d published to %s", r, publish_round(layout.dir, r, cfg.publish))
    if cfg.tracking.mlflow:
        track_round(cfg, layout.dir, r, status)
        _save_status(layout, status)
    if report:
        refresh_report(layout.dir)


def run_round(run: Run, r: int, status: dict) -> dict:
    """Run (or skip) each stage of round ``r``; returns the round's metrics."""
    layout = run.layout.round(r)
    manifest = RoundManifest(layout.dir)
    manifest.data["round"] = r
    ctx = StageContext(run.layout, layout, run.data, run.executor, manifest, run.config_digest, run.progress)
    timings = status["rounds"].setdefault(str(r), {})
    result: dict = {}
    for stage in round_stages(run.cfg, r, run.data, run.layout, run.params[r]):
        result, ran = run_stage(stage, ctx, timings)
        run.stages_run += ran
    return result


def run_stage(stage: Stage, ctx: StageContext, timings: dict) -> tuple[dict, bool]:
    """Run ``stage`` unless the manifest holds it done from the same inputs with its files whole; returns its
    summary and whether it ran. Redoing a stage forgets every later one."""
    manifest, where = ctx.manifest, name(ctx.layout.dir)
    inputs = stage.inputs(ctx)
    if manifest.stage_done(stage.name, inputs):
        log.info("%s %s: done, skipping", where, stage.name)
        return manifest.result(stage.name), False
    for later in ROUND_STAGES[ROUND_STAGES.index(stage.name) :]:
        manifest.forget(later)
    start = time.perf_counter()
    log.info("%s %s: starting", where, stage.name)
    # A writer that does not name its file (Ray Train uploading a checkpoint, a plain open()) is reported as the
    # run folder, which holds both.
    with one_line_errors(ctx.run.dir):
        if removed := remove_temp_files(ctx.layout.dir):
            log.info("%s: removed %d temporary file(s) an interrupted write left", where, len(removed))
        output = stage.run(ctx)
    seconds = time.perf_counter() - start
    manifest.record(stage.name, output.files, seconds, inputs=inputs, result=output.result)
    timings[stage.name] = round(seconds, 2)
    return output.result, True


def _read_status(layout: RunLayout) -> dict:
    try:
        return read_json(layout.status) if exists(layout.status) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is damaged; starting a new one (the round manifests still say what is done)", layout.status)
        return {}


def _load_status(layout: RunLayout, cfg: PipelineConfig) -> dict:
    status = _read_status(layout) or {"run": name(layout.dir), "started_at": _now(), "rounds": {}}
    status.update({"status": "running", "rounds_planned": cfg.rounds, "config_digest": cfg.digest()})
    return status


def _save_status(layout: RunLayout, status: dict) -> None:
    status["updated_at"] = _now()
    atomic_write_json(layout.status, status)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
