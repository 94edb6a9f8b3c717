"""Recipe search on validation: ``python -m pipeline tune --config C [--trials N] [--budget-minutes M]``.

1. A base run (rounds 0 and 1 of the config, an ordinary run: ``--run`` names an existing one of the same config to
   reuse, read as it is) gives the teacher, its soft labels for every unlabeled sample, and the current recipe's
   round-1 student as the baseline.
2. Ray Tune samples the knobs of ``stages/tuning.SPACE`` (random search) under ASHA. A trial is only the round-1
   student: the base run's soft labels re-tempered to the trial's temperature (no teacher, no pseudo-labeling),
   selection in-process, then ``stages.train.train_model`` in the trial's process. It reports validation top-1 five
   times along its schedule, at 20%, 40%, ... of its own epochs, and ASHA compares trials at equal fractions of their
   schedules (``percent``), so a short schedule is not favoured for being further along its cosine.
3. The best trial that ran to the end (highest validation top-1, the earlier on a tie) becomes ``best.yaml``: the
   whole config with its knobs, for every student round. ``trials.csv`` and ``trials.md`` list every trial.

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

from pipeline.choices import load_validation, round_seeds
from pipeline.config import ConfigError, PipelineConfig, dump_config, load_config
from pipeline.rounds import check_same_config, plan_input, run_folder, run_pipeline
from stages.data.shards import expand_shards
from stages.maths.stopping import StopConfig
from stages.maths.tuning import SPACE, apply_knobs, recipe
from stages.storage.files import Location, atomic_write_text, exists, join, read_json, round_dir

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
    run_name: str,
    trials: int,
    budget_minutes: float,
    out: Path | None = None,
    cpus_per_trial: int = 1,
    progress: bool = True,
    space: dict[str, tuple[str, tuple]] = SPACE,
) -> dict:
    """Base run, search, outputs; returns the summary also written as ``tune.json``. ``space``: where each knob
    of ``SPACE`` is searched (the tests narrow it to seconds-long trials)."""
    if not cfg.data.has_validation:
        raise ConfigError("tune scores on validation: set data.val (shards) or data.val_per_class in the config")
    run_dir, baseline_val = base_run(cfg, run_name, progress)
    out = Path(out) if out else Path(str(join(run_dir, "tune")))
    out.mkdir(parents=True, exist_ok=True)
    setup = TuneSetup(trial_tree(cfg), str(run_dir), cfg.pseudo_label.temperature, cpus_per_trial)
    from pipeline.distributed.runtime import init_ray

    log.info("ray: %s", init_ray(cfg.resources.address or None, cfg.resources.num_cpus or None))  # a reused run
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
        "finished": sum(t["percent"] >= 100 for t in table),
        "search_seconds": round(time.perf_counter() - start, 1),
        "baseline": baseline,
        "best": best,
        "outputs": {},
    }
    if best is not None:
        best_cfg = load_config(None, base=apply_knobs(cfg.to_dict(), best["knobs"]))
        summary["outputs"]["best.yaml"] = _write(out / "best.yaml", _best_yaml(best_cfg, best, baseline))
    summary["outputs"]["trials.csv"] = _write(out / "trials.csv", table_csv(table))
    summary["outputs"]["trials.md"] = _write(out / "trials.md", table_markdown(table, baseline))
    _write(out / "tune.json", json.dumps(summary, indent=2) + "\n")
    return summary


def base_run(cfg: PipelineConfig, run_name: str, progress: bool) -> tuple[Location, float]:
    """``(run folder, its round-1 validation top-1)``: an existing run of this config with round 1 finished is read
    as it is (running it again with ``rounds: 1`` would rewrite its run.json as a 1-round run); otherwise rounds 0-1
    are run (or resumed)."""
    run_dir = run_folder(cfg, run_name)
    status_path = join(run_dir, "run.json")
    if exists(status_path) and read_json(status_path).get("rounds_completed", 0) >= 2:
        check_same_config(cfg, run_dir)
        return run_dir, read_json(join(round_dir(run_dir, 1), "metrics.json"))["val_top1"]
    rows = run_pipeline(dataclasses.replace(cfg, rounds=1, stop=StopConfig()), run_name, progress=progress)
    return run_dir, rows[1]["val_top1"]


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
    from pipeline.rounds import user_error

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
                "val_top1": m.get("val_top1"),
                "percent": int(m.get("percent", 0)),
                "epoch": m.get("epoch"),
                "ended": "error" if result.error else ("finished" if m.get("percent", 0) >= 100 else "stopped"),
                "knobs": {k: result.config[k] for k in SPACE},
            }
        )
    return rows


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
    """Re-temper, select, train the round-1 student; report validation top-1 along the way (ASHA may stop it)."""
    from ray import tune

    cfg = load_config(None, base=apply_knobs(setup.tree, {k: knobs[k] for k in SPACE}))
    with tempfile.TemporaryDirectory(prefix="ns-trial-") as tmp:
        work = Path(tmp)
        pseudo, count = _trial_selection(cfg, setup, work)
        if not count:  # this floor keeps no pseudo-label: a recipe that cannot train a student scores 0, not an error
            tune.report({"val_top1": 0.0, "epoch": 0, "percent": 100, "loss": None, "note": "selection kept nothing"})
            return
        plan, val, card = _trial_plan(cfg, pseudo, count, work, setup.threads)
        hooks = ValidationHooks(plan, val, card, report=tune.report)
        from stages.train import train_model

        train_model(plan, hooks)


def _trial_selection(cfg: PipelineConfig, setup: TuneSetup, work: Path):
    """The base run's round-1 soft labels at this trial's temperature, selected with its floor and K factor."""
    from pipeline.distributed.select import run_selection
    from stages.data.compact import pseudo_sources
    from stages.data.shards import expand_shards, shard_id
    from stages.maths.tuning import retemper_table
    from stages.pseudo_label import write_sidecar
    from stages.storage.files import read_table

    shards = expand_shards(cfg.data.unlabeled, "data.unlabeled")
    labels = join(round_dir(setup.run_dir, 1), "pseudo_labels")
    sidecars = []
    for shard in shards:
        table = read_table(join(labels, f"{shard_id(shard)}.parquet"))
        path = work / "pseudo_labels" / f"{shard_id(shard)}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sidecar(retemper_table(table, setup.labeled_at, cfg.pseudo_label.temperature), path)
        sidecars.append(str(path))
    select_cfg = dataclasses.replace(cfg.select, seed=round_seeds(cfg, 1)["select"])
    # in this process whatever the size: the trial holds its CPUs, Ray tasks would wait for more
    summary = run_selection(sidecars, str(work / "selection"), cfg.data.num_classes, select_cfg, False, 1 << 62)
    pseudo = tuple(pseudo_sources(work / "selection", shards))
    return pseudo, int(summary["copies_out"])


def _trial_plan(cfg: PipelineConfig, pseudo, count: int, work: Path, threads: int):
    from stages.data.shards import expand_shards, load_labeled
    from stages.train import TrainPlan

    data = cfg.data
    labeled_shards = expand_shards(data.labeled, "data.labeled")
    labeled = load_labeled(labeled_shards, data.num_classes, data.channels, data.max_bad_fraction, "data.labeled")
    val = None
    if data.val:  # a trial scores its checkpoints on the decoded validation images, in its own process
        val = load_labeled(
            expand_shards(data.val, "data.val"), data.num_classes, data.channels, data.max_bad_fraction, "data.val"
        )
    train, val, record = load_validation(cfg, labeled, val)
    train_cfg = dataclasses.replace(cfg.student, seed=round_seeds(cfg, 1)["train"])
    fields, card = plan_input(data, cfg.spec(1))  # the input as the pipeline's own student sees it
    plan = TrainPlan(
        **fields,
        cfg=train_cfg,
        labeled=tuple(labeled_shards),
        pseudo=pseudo,
        labeled_count=len(train),
        pseudo_count=count,
        metrics_path=str(work / "train_metrics.jsonl"),
        threads=threads,
        exclude_keys=frozenset(record.get("carved_keys", ())),
    )
    every = max(1, plan.epochs(1) // REPORTS)  # a "checkpoint" here is a validation report
    plan = dataclasses.replace(plan, cfg=dataclasses.replace(train_cfg, checkpoint_every=every))
    return plan, val, card


class ValidationHooks:
    """``TrainHooks`` for a trial: one process, no resume; each checkpoint is scored on validation and reported."""

    rank, world_size = 0, 1

    def __init__(self, plan, val, card: dict, report) -> None:
        import torch

        self.plan, self.val, self.card, self._report = plan, val, card, report
        self.device = torch.device("cpu")

    def prepare(self, model):
        return model

    def restore(self):
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from stages.evaluate import predict_probs
        from stages.models.factory import create_model, load_weights

        if checkpoint_dir is None:
            return
        name = "ema.safetensors" if self.plan.cfg.ema_decay else "model.safetensors"
        model = create_model(self.plan.spec, self.plan.num_classes, self.plan.channels, noised=False)
        model.load_state_dict(load_weights(Path(checkpoint_dir) / name), strict=True)
        probs = predict_probs(model.eval(), self.val.images, self.card)
        epochs = self.plan.epochs(1)
        self._report(
            {
                "val_top1": float((probs.argmax(axis=1) == self.val.labels).mean()),
                "epoch": metrics["epoch"],
                "percent": round(100 * metrics["epoch"] / epochs),
                "loss": metrics.get("loss"),
            }
        )
