"""Recipe search on validation: ``python -m pipeline tune --config C [--trials N] [--budget-minutes M]``.

1. A base run (rounds 0 and 1 of the config, an ordinary run made by the CLI, or ``--run`` naming an existing one of
   the same config) gives the teacher, its soft labels for every unlabeled sample, and the current recipe's round-1
   student as the baseline.
2. Ray Tune samples the knobs of ``stages/maths/tuning.SPACE`` (random search) under ASHA. A trial is only the
   round-1 student, made by the round's own stages: the base run's soft labels re-tempered to the trial's
   temperature stand in for the pseudo-label stage, then ``stages.select.Select`` and ``stages.train.Train`` (its
   plan from ``pipeline.plan.plan_for``, as the run's) in the trial's process. It reports validation top-1 five
   times along its schedule, at 20%, 40%, ... of its own epochs, and ASHA compares trials at equal fractions of
   their schedules (``percent``), so a short schedule is not favoured for being further along its cosine.
3. The best trial that ran to the end (highest validation top-1, the earlier on a tie) becomes ``best.yaml``: the
   whole config with its knobs, for every student round. ``trials.csv`` and ``trials.md`` list every trial; a trial
   whose recipe the pipeline refuses (a floor that keeps nothing) is listed as refused, never chosen.

Scoring is validation only. Test is neither read nor printed here: the base run's own ``metrics.json`` still holds
its test figures, as every run's does. ``--budget-minutes`` bounds the search (Ray Tune's ``time_budget_s``; trials
still running then are stopped); the base run comes first and is not counted in it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import tempfile
import time
from pathlib import Path

from pipeline.config import PipelineConfig, dump_config, load_config
from stages.core.errors import ConfigError
from stages.core.stage import InProcess
from stages.data.shards import expand_shards
from stages.maths.tuning import SPACE, apply_knobs, recipe
from stages.storage.files import Location, atomic_write_text, join, read_json
from stages.storage.layout import TUNE_BEST, TUNE_SUMMARY, TUNE_TRIALS_CSV, TUNE_TRIALS_MD, RoundLayout, RunLayout

log = logging.getLogger(__name__)

REPORTS = 5  # validation reports per trial, at 20%, 40%, ... 100% of its epochs


@dataclasses.dataclass(frozen=True)
class TuneSetup:
    """What every trial reads: the validated base config as a tree, the base run, the labeling temperature."""

    tree: dict
    run_dir: str
    labeled_at: float
    threads: int


def search_space(space: dict[str, tuple[str, tuple]]) -> dict:
    """Ray Tune's search space for ``stages/tuning.SPACE`` (or another mapping of the same knobs)."""
    from ray import tune

    kinds = {"choice": lambda a: tune.choice(list(a)), "uniform": lambda a: tune.uniform(*a)}
    kinds["loguniform"] = lambda a: tune.loguniform(*a)
    return {name: kinds[kind](args) for name, (kind, args) in space.items()}


def run_tune(
    cfg: PipelineConfig,
    run_dir: Location,
    trials: int,
    budget_minutes: float,
    out: Path | None = None,
    cpus_per_trial: int = 1,
    progress: bool = True,
    space: dict[str, tuple[str, tuple]] = SPACE,
) -> dict:
    """The search over a finished base run (rounds 0 and 1 of ``cfg`` at ``run_dir``), then the outputs; returns
    the summary also written as ``tune.json``. ``space``: where each knob of ``SPACE`` is searched (the tests narrow
    it to seconds-long trials)."""
    if not cfg.data.has_validation:
        raise ConfigError("tune scores on validation: set data.val (shards) or data.val_per_class in the config")
    layout = RunLayout(run_dir)
    baseline_val = read_json(layout.round(1).metrics)["val_top1"]
    out = Path(out) if out else Path(str(layout.tune))
    out.mkdir(parents=True, exist_ok=True)
    setup = TuneSetup(trial_tree(cfg), str(run_dir), cfg.pseudo_label.temperature, cpus_per_trial)
    from pipeline.distributed.runtime import init_ray

    log.info("ray: %s", init_ray(cfg.resources.address or None, cfg.resources.num_cpus or None))
    start = time.perf_counter()
    results = _search(setup, search_space(space), trials, budget_minutes, out, progress)
    table = trial_table(results)
    if table and all(t["ended"] == "error" for t in table):
        raise _trial_error(results)
    best = pick_best(table)
    baseline = {"knobs": recipe(setup.tree), "val_top1": baseline_val}
    summary = {
        "base_run": str(run_dir),
        "trials": len(table),
        "finished": sum(t["ended"] == "finished" for t in table),
        "refused": sum(t["ended"] == "refused" for t in table),
        "search_seconds": round(time.perf_counter() - start, 1),
        "baseline": baseline,
        "best": best,
        "outputs": {},
    }
    if best is not None:
        best_cfg = load_config(None, base=apply_knobs(cfg.to_dict(), best["knobs"]))
        summary["outputs"][TUNE_BEST] = _write(out / TUNE_BEST, _best_yaml(best_cfg, best, baseline))
    summary["outputs"][TUNE_TRIALS_CSV] = _write(out / TUNE_TRIALS_CSV, table_csv(table))
    summary["outputs"][TUNE_TRIALS_MD] = _write(out / TUNE_TRIALS_MD, table_markdown(table, baseline))
    _write(out / TUNE_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def base_run_done(run_dir: Location) -> bool:
    """Whether a run's round 1 is finished (``tune`` reads it as it is, rather than running it again)."""
    from stages.storage.files import exists

    status = RunLayout(run_dir).status
    return exists(status) and read_json(status).get("rounds_completed", 0) >= 2


def trial_tree(cfg: PipelineConfig) -> dict:
    """The config as trials read it: the shards they open expanded here to absolute paths (a Ray Tune trial runs in
    Ray's artifacts folder, where a relative pattern matches nothing)."""
    tree = cfg.to_dict()
    for split in ("labeled", "unlabeled", "val"):
        if tree["data"][split]:
            tree["data"][split] = expand_shards(tree["data"][split], f"data.{split}")
    return tree


def _trial_error(results) -> Exception:
    """The first trial's error as the one line a user can act on (a bad path, bad data), else a summary."""
    from pipeline.distributed.runtime import user_error

    first = next(r.error for r in results if r.error)
    return user_error(first, "") or RuntimeError(f"every tune trial failed; the first: {first}")


def _write(path: Path, text: str) -> str:
    atomic_write_text(path, text)
    return str(path)


def _best_yaml(cfg: PipelineConfig, best: dict, baseline: dict) -> str:
    header = (
        f"# Written by `python -m pipeline tune`: trial {best['trial']}, round-1 student validation top-1 "
        f"{best['val_top1'] * 100:.2f}% (the config's own recipe: {baseline['val_top1'] * 100:.2f}%).\n"
        f"# Chosen on validation only. Knobs: {json.dumps(best['knobs'])}\n"
    )
    return header + dump_config(cfg)


def _search(setup: TuneSetup, param_space: dict, trials: int, budget_minutes: float, out: Path, progress: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="percent", max_t=100, grace_period=40, reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": setup.threads}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            scheduler=scheduler,
            num_samples=trials,
            time_budget_s=budget_minutes * 60,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str((out / "ray_tune").resolve()),
            verbose=1 if progress else 0,
        ),
    )
    return tuner.fit()


def trial_table(results) -> list[dict]:
    """One row per trial: its knobs, the last validation top-1 it reported, how far it ran, how it ended."""
    rows = []
    for i, result in enumerate(results):
        m = result.metrics or {}
        rows.append(
            {
                "trial": i,
                "val_top1": None if m.get("refused") else m.get("val_top1"),
                "percent": int(m.get("percent", 0)),
                "epoch": m.get("epoch"),
                "ended": _ended(result.error, m),
                "knobs": {k: result.config[k] for k in SPACE},
            }
        )
    return rows


def _ended(error, metrics: dict) -> str:
    if error:
        return "error"
    if metrics.get("refused"):
        return "refused"  # the pipeline would refuse this recipe (its floor keeps nothing): never chosen
    return "finished" if metrics.get("percent", 0) >= 100 else "stopped"


def pick_best(table: list[dict]) -> dict | None:
    """The finished trial with the highest validation top-1, the earliest on a tie (None when none finished)."""
    done = [t for t in table if t["ended"] == "finished" and t["val_top1"] is not None]
    return max(done, key=lambda t: (t["val_top1"], -t["trial"])) if done else None


def table_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "val_top1", "percent", "ended", *SPACE])
    for t in table:
        writer.writerow([t["trial"], t["val_top1"], t["percent"], t["ended"], *(t["knobs"][k] for k in SPACE)])
    return buf.getvalue()


def table_markdown(table: list[dict], baseline: dict) -> str:
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["trial", "val top-1", "ran", *SPACE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = [
        "config's recipe",
        f"{baseline['val_top1'] * 100:.2f}%",
        "100%",
        *(fmt(baseline["knobs"][k]) for k in SPACE),
    ]
    lines.append("| " + " | ".join(base) + " |")
    ranked = sorted(table, key=lambda t: (-(t["val_top1"] or 0), t["trial"]))
    for t in ranked:
        val = "-" if t["val_top1"] is None else f"{t['val_top1'] * 100:.2f}%"
        row = [str(t["trial"]), val, f"{t['percent']}% ({t['ended']})", *(fmt(t["knobs"][k]) for k in SPACE)]
        lines.append("| " + " | ".join(row) + " |")
    return "Trials ranked by validation top-1 (round-1 student). Test is not used.\n\n" + "\n".join(lines) + "\n"


# ---- one trial, in a Ray Tune worker --------------------------------------------------------------------------


def run_trial(knobs: dict, setup: TuneSetup) -> None:
    """Re-temper, select, train the round-1 student with the round's stages; report validation top-1 along the way
    (ASHA may stop it). A recipe whose selection keeps nothing reports ``refused`` and is never chosen."""
    from ray import tune

    from stages.core.errors import DataError

    cfg = load_config(None, base=apply_knobs(setup.tree, {k: knobs[k] for k in SPACE}))
    with tempfile.TemporaryDirectory(prefix="ns-trial-") as tmp:
        try:
            train_trial(cfg, setup, Path(tmp), tune.report)
        except DataError as exc:
            if "selection kept no" not in str(exc):
                raise
            # ASHA wants a number: 0, but the trial is listed as refused and never chosen (trial_table, pick_best)
            tune.report({"val_top1": 0.0, "epoch": 0, "percent": 0, "loss": None, "refused": str(exc)})


def train_trial(cfg: PipelineConfig, setup: TuneSetup, work: Path, report) -> None:
    """The round-1 student of ``cfg`` in ``work``: the base run's soft labels at this temperature, selected and
    trained by ``stages.select.Select`` and ``stages.train.Train`` in this process, each checkpoint scored on
    validation and handed to ``report``."""
    import dataclasses

    from pipeline.choices import load_validation
    from pipeline.plan import model_card_for, plan_for, select_stage, stage_config_digest
    from stages.core.stage import RunData, StageContext
    from stages.data.labeled_scan import scan_split
    from stages.data.shards import load_labeled
    from stages.maths.validation import split_off
    from stages.storage.artifacts import RoundManifest
    from stages.train import Train

    data = cfg.data
    base, trial = RunLayout(setup.run_dir), RunLayout(work)
    link_teacher(base.round(0), trial.round(0))
    shards = {s: expand_shards(getattr(data, s), f"data.{s}") for s in ("labeled", "unlabeled", "test")}
    labeled = scan_split(shards["labeled"], data.num_classes, data.channels, data.max_bad_fraction, "data.labeled")
    val = None
    if data.val:  # a trial scores its checkpoints on the decoded validation images, in its own process
        val = load_labeled(expand_shards(data.val, "data.val"), data.num_classes, data.channels, 1.0, "data.val")
    train_part, _, record = load_validation(cfg, labeled, val)
    if data.val_per_class:  # the carved images, decoded
        all_labeled = load_labeled(shards["labeled"], data.num_classes, data.channels, 1.0, "data.labeled")
        val = split_off(all_labeled, set(record["carved_keys"]))[1]
    run_data = RunData(
        shards["labeled"],
        shards["unlabeled"],
        shards["test"],
        train_part,
        train_part,
        data.num_classes,
        data.channels,
        data.names(),
        validation=record,
    )
    layout = trial.round(1)
    manifest = RoundManifest(layout.dir)
    t_from, t_to = setup.labeled_at, cfg.pseudo_label.temperature
    manifest.record("pseudo_label", write_retempered(base.round(1), layout, shards["unlabeled"], t_from, t_to), 0.0)
    pretrained = "pretrain" in RoundManifest(base.round(0).dir).data["stages"]  # the base run's round 0 pretrained
    plan = plan_for(
        cfg,
        1,
        shards["labeled"],
        len(train_part),
        exclude_keys=run_data.exclude_keys,
        run=trial,
        threads=setup.threads,
        pretrained=pretrained,
    )
    every = max(1, plan.epochs(1) // REPORTS)  # a "checkpoint" here is a validation report
    plan = dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, checkpoint_every=every))
    card = model_card_for(cfg, 1, 0)

    def hooks(root: Path, device: str) -> ValidationHooks:
        return ValidationHooks(root, plan, card, val, report)

    ctx = StageContext(trial, layout, run_data, InProcess(False, hooks), manifest, stage_config_digest(cfg), False)
    selection = select_stage(cfg, 1, run_data.pretrain).run(ctx)
    manifest.record("select", selection.files, 0.0, result=selection.result)
    Train(plan, card, cfg.resources.train()).run(ctx)


def link_teacher(source: RoundLayout, target: RoundLayout) -> None:
    """The base run's round 0 as the trial's: a link to a local folder, a copy of its model files from a URL."""
    from stages.storage.files import copy_file, exists, is_url

    if not is_url(source.dir):
        Path(str(target.dir)).symlink_to(Path(str(source.dir)), target_is_directory=True)
        return
    for f in (source.model.weights, source.model.card, source.manifest, source.encoder):
        if f != source.encoder or exists(f):  # the encoder: only a run that pretrained has one
            copy_file(f, join(target.dir, str(f).rsplit("/", 1)[-1]))


def write_retempered(base: object, layout: object, shards: list[str], t_from: float, t_to: float) -> list:
    """The base run's round-1 sidecars as if labeled at ``t_to``, written as the trial round's pseudo-labels."""
    from stages.maths.tuning import retemper_table
    from stages.pseudo_label import SIDECAR_FORMAT
    from stages.storage.artifacts import read_footer, write_table
    from stages.storage.files import read_table

    written = []
    for shard in shards:
        source = base.pseudo_label(shard)
        footer = read_footer(source, SIDECAR_FORMAT)
        table = retemper_table(read_table(source), t_from, t_to)
        write_table(
            table,
            layout.pseudo_label(shard),
            format=SIDECAR_FORMAT,
            made_by=f"retempered:{t_to}",
            **(footer.meta if footer else {}),
        )
        written.append(layout.pseudo_label(shard))
    return written


class ValidationHooks:
    """``TrainHooks`` for a trial: one process, checkpoints kept locally (the last one is the trial's model), each
    scored on the validation images and reported."""

    def __init__(self, root: Path, plan, card: dict, val, report) -> None:
        from stages.core.hooks import LocalHooks

        self.local = LocalHooks(root)
        self.rank, self.world_size, self.device = 0, 1, self.local.device
        self.plan, self.card, self.val, self._report = plan, card, val, report

    def prepare(self, model):
        return model

    def restore(self):
        return self.local.restore()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from stages.evaluate import predict_probs
        from stages.models.factory import create_model, load_weights
        from stages.storage.layout import CheckpointFiles

        if checkpoint_dir is None:
            return
        self.local.report(metrics, checkpoint_dir)
        files = CheckpointFiles(checkpoint_dir)
        model = create_model(self.plan.spec, self.plan.num_classes, self.plan.channels, noised=False)
        model.load_state_dict(load_weights(files.ema if self.plan.cfg.ema_decay else files.model), strict=True)
        probs = predict_probs(model.eval(), self.val.images, self.card)
        self._report(
            {
                "val_top1": float((probs.argmax(axis=1) == self.val.labels).mean()),
                "epoch": metrics["epoch"],
                "percent": round(100 * metrics["epoch"] / metrics["epochs"]),
                "loss": metrics.get("loss"),
            }
        )
