"""What a run of a config is: its folder and identity, the stages of each round, and each round's training plan.

``round_stages(cfg, r, data, params)`` is the round as a list of stage objects (``stages.core.stage.Stage``):
round 0 pretrains the encoder when the run pretrains (``data.pretrain``, decided before round 0), trains (or adopts)
the teacher and evaluates it; a student round pseudo-labels, selects, trains and evaluates. ``plan_for`` is the one
place a ``TrainPlan`` is made, for the round loop, ``tune``'s trials and the benches alike (``pretrain_plan`` the
encoder's); ``model_input`` says how a round's model sees its images (mean/std as trained, interpolation, crop) and
``model_card_for`` what its ``model.json`` records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline.choices import round_seeds
from pipeline.config import PipelineConfig, load_config
from stages.core.errors import ConfigError
from stages.core.stage import RunData, Stage
from stages.storage.files import Location, exists, is_url, join, read_text
from stages.storage.layout import RunLayout


def run_folder(cfg: PipelineConfig, run_name: str) -> Location:
    """``<storage>/<run>``: an absolute ``Path`` for a local root, a URL string for an object store."""
    if is_url(cfg.storage):
        return join(cfg.storage, run_name)
    return Path(cfg.storage.removeprefix("file://")).expanduser().resolve() / run_name


def storage_root(cfg: PipelineConfig) -> Location:
    return (
        join(cfg.storage) if is_url(cfg.storage) else Path(cfg.storage.removeprefix("file://")).expanduser().resolve()
    )


def stage_config_digest(cfg: PipelineConfig) -> str:
    """The config as the stages see it. Left out: ``rounds`` (a resumed run may grow), ``name``, ``storage`` and
    ``publish`` (what the run is called, where it lives and is copied to), ``tracking`` (where results are logged),
    ``data.allow_test_overlap`` (it only lets the data check pass), ``stop`` (it decides whether a next round runs,
    not what one computes) and ``resources.executor`` (where work runs, not what it computes): none makes a finished
    stage stale."""
    tree = cfg.identity()  # keys added later are left out at their defaults (stages.core.config.LATE)
    for key in ("rounds", "name", "storage", "publish", "stop", "tracking"):
        tree.pop(key, None)
    tree["data"].pop("allow_test_overlap")
    tree["resources"].pop("executor", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def check_same_config(cfg: PipelineConfig, run_dir: Location) -> None:
    """An existing run resumes only with the settings it was started with (rounds may change)."""
    config_path = RunLayout(run_dir).config
    if not exists(config_path):
        return
    started = load_config(None, base=yaml.safe_load(read_text(config_path)))
    if stage_config_digest(started) != stage_config_digest(cfg):
        raise ConfigError(
            f"run {run_dir} was started with a different config; resume it with the same settings "
            f"(only rounds may change) or choose a new RUN name"
        )


def model_input(cfg: PipelineConfig, r: int) -> tuple[dict, dict]:
    """How round ``r``'s model sees the data: the ``TrainPlan`` fields of its input (mean/std as trained, the
    model's own under ``augment: natural``, plus interpolation and crop) and the input half of its card."""
    from stages.models.factory import model_card
    from stages.models.transforms import preprocessing

    data, spec = cfg.data, cfg.spec(r)
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


def model_card_for(cfg: PipelineConfig, r: int, params: int) -> dict:
    """Round ``r``'s ``model.json`` (its round number is added by the stage that writes it)."""
    return model_input(cfg, r)[1] | {"params": params, "classes": cfg.data.names()}


def plan_for(
    cfg: PipelineConfig,
    r: int,
    labeled_shards: Sequence[str],
    labeled_count: int,
    *,
    exclude_keys: frozenset[str] = frozenset(),
    run: RunLayout | None = None,
    pseudo: tuple = (),
    pseudo_count: int = 0,
    metrics_path: str = "",
    threads: int | None = None,
    pretrained: bool = False,
):
    """Round ``r``'s ``TrainPlan``: the teacher's (``r == 0``) or the student's recipe with the round's own seed,
    the model's input, the labeled shards (``exclude_keys`` never trained on), and, with ``run``, the paths the
    round trains from and writes to (the previous model for ``init_from_teacher`` and ``online_teacher``, its
    ``train_metrics.jsonl``, and with ``pretrained`` round 0's encoder for the teacher and, under
    ``pretrain.init_students``, the students; with ``init_students: on`` they also start from ``teacher.init``). The
    pseudo-labeled sources come from the round's selection (the train stage adds them) or are given here."""
    from stages.models.pretrained import absolute
    from stages.train import TrainPlan

    train_cfg = cfg.teacher if r == 0 else cfg.student
    train_cfg = dataclasses.replace(train_cfg, seed=round_seeds(cfg, r)["train"])  # each round its own seed
    previous = run.round(r - 1) if run is not None and r > 0 else None
    if run is not None and not metrics_path:
        metrics_path = str(run.round(r).train_metrics)
    fields, _ = model_input(cfg, r)
    students = cfg.pretrain.students_from_encoder(pretrained, cfg.student.init_from_teacher)
    from_encoder = pretrained and run is not None and (r == 0 or students)
    return TrainPlan(
        **fields,
        cfg=train_cfg,
        labeled=tuple(labeled_shards),
        pseudo=pseudo,
        labeled_count=labeled_count,
        pseudo_count=pseudo_count,
        metrics_path=metrics_path,
        init_weights=str(previous.model.weights) if previous and train_cfg.init_from_teacher else "",
        teacher_dir=str(previous.dir) if previous and train_cfg.online_teacher else "",
        threads=cfg.resources.torch_threads if threads is None else threads,
        init_from=absolute(cfg.teacher.init) if r == 0 or cfg.pretrain.init_students == "on" else "",
        init_encoder=str(run.round(0).encoder) if from_encoder and run is not None else "",
        exclude_keys=exclude_keys,
    )


def pretrain_plan(cfg: PipelineConfig, data: RunData, threads: int | None = None):
    """The round-0 encoder's ``PretrainPlan``: the round-0 model and its input, the labeled (carved validation
    keys left out) and unlabeled shards, and its own seed."""
    from stages.maths.stopping import round_seed
    from stages.pretrain import PretrainPlan

    fields, _ = model_input(cfg, 0)
    return PretrainPlan(
        spec=fields["spec"],
        cfg=cfg.pretrain,
        channels=fields["channels"],
        image_size=fields["image_size"],
        mean=fields["mean"],
        std=fields["std"],
        natural=cfg.data.augment == "natural",
        labeled=tuple(data.labeled_shards),
        unlabeled=tuple(data.unlabeled_shards),
        images=len(data.labeled) + data.unlabeled_images,
        seed=round_seed(cfg.seed, cfg.pretrain.seed, 0, "pretrain"),
        exclude_keys=data.exclude_keys,
        threads=cfg.resources.torch_threads if threads is None else threads,
    )


def round_stages(cfg: PipelineConfig, r: int, data: RunData, run: RunLayout, params: int) -> list[Stage]:
    """Round ``r`` as its list of stages, in order."""
    from stages.evaluate import Evaluate
    from stages.pretrain import Pretrain
    from stages.pseudo_label import PseudoLabel
    from stages.train import Adopt, Train

    seeds, label = round_seeds(cfg, r), cfg.resources.label()
    if r == 0 and cfg.teacher.from_model:
        train: Stage = Adopt(cfg.teacher.from_model)
    else:
        plan = plan_for(
            cfg,
            r,
            data.labeled_shards,
            len(data.labeled),
            exclude_keys=data.exclude_keys,
            run=run,
            pretrained=data.pretrain,
        )
        train = Train(plan, model_card_for(cfg, r, params), cfg.resources.train())
    evaluate = Evaluate(cfg.robustness, label, seeds)
    if r == 0:
        pretrain: list[Stage] = [Pretrain(pretrain_plan(cfg, data), cfg.resources.train())] if data.pretrain else []
        return [*pretrain, train, evaluate]
    return [PseudoLabel(cfg.pseudo_label, label), select_stage(cfg, r, data.pretrain), train, evaluate]


def select_config(cfg: PipelineConfig, r: int, pretrained: bool):
    """Student round ``r``'s selection settings: ``auto`` resolved (a weak teacher, one whose round 0 pretrained,
    gets class shares aligned to a uniform prior; ``SelectConfig.resolve``) and the round's own seed. What the stage
    runs with, and what a reference selection outside the loop (benches, tests) must use too."""
    return dataclasses.replace(cfg.select.resolve(pretrained), seed=round_seeds(cfg, r)["select"])


def select_stage(cfg: PipelineConfig, r: int, pretrained: bool) -> Stage:
    """Student round ``r``'s ``Select`` (``select_config``)."""
    from stages.select import Select

    return Select(select_config(cfg, r, pretrained), temperature=cfg.pseudo_label.temperature, student_round=r)
