"""The pipeline config: frozen, typed dataclasses composed from each stage's own config, loaded from YAML.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load`` and applies ``key.path=value`` overrides
(``read_tree``: the overrides are parsed as YAML scalars and written into the tree, knowing nothing of the fields;
a file or override that is not YAML is one ``ConfigError`` naming the file's line and column, or the override), then
validates the tree once: an unknown key, a wrong type or a value out of range is one
``ConfigError`` line naming the field. ``configs/digits.yaml`` documents every key.

Validation is pydantic v2's (``stages/core/config.py``: strict scalars, ``Many[T]``, the one-line message). Pydantic
dataclasses, not ``BaseModel``s: they stay standard-library dataclasses, so ``fields``, ``replace`` and ``asdict``
keep working for their callers, and ``to_dict``/``digest`` (part of a run's resume identity) come out as before.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError, model_validator
from pydantic_core import ArgsKwargs

from stages.core.config import LATE, Many, config, identity_tree, one_line
from stages.core.errors import ConfigError
from stages.core.stage import LabelResources, TrainResources
from stages.data.corruptions import RobustnessConfig
from stages.data.folder import read_classes
from stages.maths.selection import AlignTo, SelectConfig, SelectMode
from stages.maths.stopping import StopConfig
from stages.models.factory import ModelSpec
from stages.pretrain import PretrainConfig
from stages.pseudo_label import PseudoLabelConfig
from stages.storage.files import StorageError, check_storage
from stages.train import TrainConfig

Shards = Annotated[Many[StrictStr], Field(min_length=1, description="shard path or pattern")]
NonNegative = Annotated[StrictInt, Field(ge=0)]


@config
class DataConfig:
    """Shard lists (paths, globs, brace patterns, object-store URLs) and how images enter the model.

    ``prepare_digits``: a folder; when set and its shards are missing, the built-in digits data is written there,
    with ``prepare_labeled_per_class`` labeled images per class (10; fewer = a seeded subset of those 10, the rest
    unlabeled, validation and test unchanged: 2 is "digits-hard", ``stages/data/digits.py``).
    ``allow_test_overlap``: go on (with a warning) when training images have the same decoded pixels as test images;
    by default that stops the run before round 0 (``stages/data_check.py``).
    ``classes``: class names by index, inline or the path of a ``classes.json`` (read here, so the run's config.yaml
    holds the names); ``num_classes`` follows from them. ``augment``: ``digits`` (resize, no crop or flip, the
    default) or ``natural`` (timm's random-resized crop and flip, centre-crop evaluation;
    ``stages/models/transforms.py``).
    ``mean``/``std`` left empty: the model's pretrained normalisation under ``natural``, 0.5 per channel otherwise.
    ``val`` (shards) or ``val_per_class`` (K per class carved from the labeled shards by ``val_seed``, never trained
    on): the validation split every choice is made on (``stages/maths/validation.py``); neither = no validation.
    """

    labeled: Shards = ()
    unlabeled: Shards = ()
    test: Shards = ()
    num_classes: Annotated[StrictInt, Field(ge=2)] = 10
    channels: StrictInt = 1
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    mean: Many[StrictFloat] = ()
    std: Many[StrictFloat] = ()
    max_bad_fraction: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.01
    prepare_digits: StrictStr = ""
    prepare_labeled_per_class: Annotated[StrictInt, Field(ge=1, le=10), LATE] = 10
    allow_test_overlap: StrictBool = False
    classes: Annotated[StrictStr | Many[StrictStr], LATE] = ()
    augment: Annotated[Literal["digits", "natural"], LATE] = "digits"

    @model_validator(mode="before")
    @classmethod
    def _class_names(cls, data):
        """A ``classes.json`` path becomes its names; ``num_classes`` follows them unless given (then must agree)."""
        args = data if isinstance(data, dict) else data.kwargs if isinstance(data, ArgsKwargs) else None
        if not args or not args.get("classes"):
            return data
        try:
            names = read_classes(args["classes"]) if isinstance(args["classes"], (str, list, tuple)) else None
        except ValueError as exc:
            raise ValueError(f"classes: {exc}") from exc
        if names is None:
            return data
        given = args.get("num_classes")
        if given is not None and given != len(names):
            source = args["classes"] if isinstance(args["classes"], str) else "the list"
            raise ValueError(
                f"num_classes: {given}, but {source} names {len(names)} classes; drop num_classes (it follows the "
                "names) or make them agree"
            )
        args = {**args, "classes": names, "num_classes": len(names)}
        return args if isinstance(data, dict) else ArgsKwargs(data.args, args)

    val: Many[StrictStr] = ()
    val_per_class: NonNegative = 0
    val_seed: StrictInt = 0

    @property
    def has_validation(self) -> bool:
        return bool(self.val or self.val_per_class)

    @model_validator(mode="after")
    def _per_channel(self) -> DataConfig:
        # Not Literal[1, 3] (pydantic's Literal would take true for 1), nor a per-entry std bound (the message
        # names the list, whose length is checked here too).
        if self.channels not in (1, 3):
            raise ValueError(f"channels: must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if isinstance(self.classes, str):  # only "" reaches here: a path was read by _class_names
            object.__setattr__(self, "classes", ())
        for name in ("mean", "std"):
            if not getattr(self, name) and self.augment == "digits":
                object.__setattr__(self, name, (0.5,) * self.channels)  # frozen: the default, filled in once
            if not getattr(self, name):
                continue  # natural: the model's own (stages/transforms.preprocessing)
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name}: needs {self.channels} value(s), one per channel, got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be > 0, got {self.std}")
        if self.val and self.val_per_class:
            raise ValueError("val_per_class: give validation shards (data.val) or a carve (val_per_class), not both")
        if self.prepare_labeled_per_class != 10 and not self.prepare_digits:
            raise ValueError(
                f"prepare_labeled_per_class: {self.prepare_labeled_per_class} says how prepare_digits writes the "
                "digits; set prepare_digits (the folder) too, or leave it at 10"
            )
        return self

    def names(self) -> list[str]:
        """The class names by index: ``classes``, or the indices as text when none are given."""
        return list(self.classes) or [str(c) for c in range(self.num_classes)]


@config
class ResourcesConfig:
    """Where and how wide to run. ``address: ""`` uses ``RAY_ADDRESS`` if set, else starts a local Ray.

    ``label_actors: 0`` starts one pseudo-label actor per ``gpus_per_label_actor`` GPUs of the cluster, or on a
    CPU-only cluster one per ``cpus_per_label_actor`` CPUs, and lets the pool grow with the cluster up to
    ``label_max_actors`` (0 = one per shard); ``label_threads: 0`` gives each actor one torch thread and one decode
    thread per CPU it holds; ``label_decode`` is where the images are decoded: ``cpu`` in each actor's threads,
    ``gpu`` on the actors' GPUs (needs ``gpus_per_label_actor``), ``tasks`` by Ray Data CPU tasks of
    ``label_decode_cpus`` each, on any node, feeding the actors model-sized uint8 batches (Ray's pattern for GPU
    nodes with few CPUs per GPU; on the in-process executor the two take turns). ``torch_threads`` is for the
    training workers (0 = the CPUs a worker holds, less its loader workers: ``stages.models.device.training_threads``).
    ``train_runtime`` (Ray runs): ``ray_train`` starts a Ray Train worker group per training stage; ``warm`` keeps
    one training actor on this node for the whole run, so only the first stage pays the start (one worker only);
    ``auto`` keeps one when a single worker trains from local checkpoints and holds at most a quarter of the
    cluster's CPUs and GPUs (the labeling and evaluation pools are sized from the rest; a pool of one actor runs on
    the trainer).
    ``gpus_per_train_worker``: a fraction shares a GPU (``warm`` on a one-GPU node beside a label actor of the rest).
    ``executor``: where the run's work runs: ``ray`` (Ray tasks, actor pools, Ray Train), ``local`` (this process),
    or ``auto``: this process for a small local run (under 64 MB of shards, no cluster, no GPU), Ray otherwise
    (``pipeline/distributed/executor.choose_executor``).
    """

    address: StrictStr = ""
    num_cpus: NonNegative = 0
    train_workers: Annotated[StrictInt, Field(ge=1)] = 1
    cpus_per_train_worker: Annotated[StrictFloat, Field(gt=0)] = 1.0
    gpus_per_train_worker: Annotated[StrictFloat, Field(gt=0), LATE] = 1.0
    train_runtime: Annotated[Literal["auto", "warm", "ray_train"], LATE] = "auto"
    use_gpu: StrictBool = False
    max_failures: NonNegative = 2
    label_actors: NonNegative = 0
    cpus_per_label_actor: Annotated[StrictFloat, Field(gt=0)] = 1.0
    gpus_per_label_actor: Annotated[StrictFloat, Field(ge=0)] = 0.0
    label_threads: NonNegative = 0
    label_decode: Annotated[Literal["cpu", "gpu", "tasks"], LATE] = "cpu"
    label_decode_cpus: Annotated[StrictFloat, Field(gt=0), LATE] = 1.0
    label_max_actors: Annotated[NonNegative, LATE] = 0
    torch_threads: NonNegative = 0
    executor: Annotated[Literal["auto", "local", "ray"], LATE] = "auto"
    cpu_decoder: Annotated[StrictStr, LATE] = "auto"

    @model_validator(mode="after")
    def _gpu_decode_needs_a_gpu(self) -> ResourcesConfig:
        if self.label_decode == "gpu" and not self.gpus_per_label_actor:
            raise ValueError("label_decode: gpu needs gpus_per_label_actor > 0 (the actors decode on their GPU)")
        if self.train_runtime == "warm" and self.train_workers != 1:
            raise ValueError(
                f"train_runtime: warm keeps one training actor; train_workers {self.train_workers} (DDP) needs "
                "ray_train or auto"
            )
        from stages.data.decoders import DECODERS  # torch-free at import; the backends load their libraries lazily

        if self.cpu_decoder != "auto" and self.cpu_decoder not in DECODERS:
            raise ValueError(f"cpu_decoder: one of auto, {', '.join(DECODERS)}; got {self.cpu_decoder!r}")
        return self

    def train(self) -> TrainResources:
        return TrainResources(
            self.train_workers,
            self.use_gpu,
            self.cpus_per_train_worker,
            self.max_failures,
            self.train_runtime,
            self.gpus_per_train_worker,
        )

    def label(self) -> LabelResources:
        return LabelResources(
            self.label_actors,
            self.cpus_per_label_actor,
            self.gpus_per_label_actor,
            self.label_threads,
            self.label_decode,
            self.label_max_actors,
            self.cpu_decoder,
            self.label_decode_cpus,
        )


@config
class TeacherConfig(TrainConfig):
    """The round-0 teacher: ``TrainConfig`` plus where it starts. ``init``: weights to start training from (a
    ``.safetensors`` state dict, a timm checkpoint, or a model folder of this pipeline;
    ``stages/models/pretrained.py``).
    ``from_model``: a trained model folder (``model.json`` + ``model.safetensors``) that *is* round 0, not trained."""

    init: Annotated[StrictStr, LATE] = ""
    from_model: Annotated[StrictStr, LATE] = ""

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.init and self.from_model:
            raise ValueError("from_model: a model that is used as it is cannot also start from teacher.init; keep one")
        return self


@config
class TrackingConfig:
    """Experiment tracking (``pipeline/report/tracking.py``). ``mlflow``: a tracking URI (``file:///abs/mlruns``, a
    folder, or ``http://host:5000``); each round is one MLflow run under one parent run per pipeline run. ``""`` =
    off. ``experiment``: the MLflow experiment (default: the config's ``name``)."""

    mlflow: StrictStr = ""
    experiment: StrictStr = ""


@config
class RunSelectConfig(SelectConfig):
    """A run's ``select`` section: ``SelectConfig`` with ``mode`` and ``align`` ``auto`` unless given, which each run
    resolves (``SelectConfig.resolve``: class shares aligned to a uniform prior when round 0 pretrains, the
    paper's balanced selection otherwise; ``run.json`` records the outcome under ``pretrain.then``)."""

    mode: SelectMode = "auto"
    align: Annotated[AlignTo, LATE] = "auto"


@config
class PipelineConfig:
    """One Noisy Student run: ``rounds`` student rounds after the round-0 teacher.

    ``storage``: where the run is written and read, by every node: a local folder, a shared filesystem, or an
    object-store URL (``s3://bucket/runs``, ``gs://…``, any fsspec URL; ``stages/storage/files.py``).
    ``publish``: optional folder or fsspec URL
    (``s3://bucket/runs``) that receives each finished round's model, metrics and manifest (``rounds`` and
    ``download`` read from it).
    ``ladder_mode``: ``expand`` (each rung has at least as many parameters as the one before: Noisy Student's
    equal-or-larger students), ``compress`` (never more: knowledge compression into smaller students), ``any``
    (unchecked). Equal sizes pass both, since a ladder shorter than the run repeats its last rung.
    ``seed``: the run seed; every round's training and selection get their own seed derived from it and the stage's
    ``seed`` key (``stages/stopping.round_seed``). ``stop``: the stop rule on validation (``stages/maths/stopping.py``).
    ``robustness``: corrupted copies of the test set scored every round (``stages/data/corruptions.py``).
    ``pretrain``: self-supervised pretraining of round 0's encoder before the teacher trains (``stages/pretrain.py``).
    """

    name: StrictStr = "run"
    storage: StrictStr = "runs"
    publish: StrictStr = ""
    rounds: Annotated[StrictInt, Field(ge=1, description="round 0 trains the teacher, rounds 1..N the students")] = 3
    # A missing data section is validated as an empty one, so the error names data.labeled.
    data: DataConfig = dataclasses.field(default_factory=dict)
    ladder: Annotated[Many[ModelSpec], Field(min_length=1, description="model")] = (ModelSpec(),)
    ladder_mode: Literal["any", "expand", "compress"] = "any"
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = dataclasses.field(default_factory=PseudoLabelConfig)
    select: RunSelectConfig = dataclasses.field(default_factory=RunSelectConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    tracking: Annotated[TrackingConfig, LATE] = dataclasses.field(default_factory=TrackingConfig)
    seed: StrictInt = 0
    stop: StopConfig = dataclasses.field(default_factory=StopConfig)
    robustness: RobustnessConfig = dataclasses.field(default_factory=RobustnessConfig)
    pretrain: Annotated[PretrainConfig, LATE] = dataclasses.field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        for name in ("storage", "publish"):
            try:
                check_storage(getattr(self, name))
            except StorageError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        if self.teacher.distill or self.teacher.online_teacher:
            raise ValueError(
                "teacher.distill: round 0 has no earlier model to distil from; put distill and online_teacher under "
                "student"
            )
        given = "teacher.init" if self.teacher.init else "teacher.from_model" if self.teacher.from_model else ""
        if self.pretrain.enabled == "on" and given:
            raise ValueError(
                f"pretrain.enabled: on, but round 0 starts from {given}; drop one (auto pretrains only without them)"
            )
        if self.pretrain.init_students == "on" and self.student.init_from_teacher:
            raise ValueError(
                "pretrain.init_students: students cannot start from both the encoder and their teacher "
                "(student.init_from_teacher); keep one"
            )
        d = self.data
        if self.stop.patience and not d.has_validation:
            raise ValueError(
                "stop.patience: the stop rule needs a validation split; set data.val (shards) or data.val_per_class"
            )
        return self

    def spec(self, round_index: int) -> ModelSpec:
        """Round k's model; a ladder shorter than the run repeats its last entry."""
        return self.ladder[min(round_index, len(self.ladder) - 1)]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain JSON types: tuples become lists

    def identity(self) -> dict:
        """``to_dict`` without the keys added later that hold their defaults: what the digests hash, so a run started
        before a key existed keeps its identity (``stages.core.config.LATE``)."""
        return json.loads(json.dumps(identity_tree(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


_VALIDATE = TypeAdapter(PipelineConfig)


def check_models(cfg: PipelineConfig) -> None:
    """The checks that build models, kept out of loading a config (which stays free of torch and timm): under
    ``ladder_mode`` the rungs' sizes, and the rung pairs that feature-distillation terms must be able to join. One
    ``ConfigError`` line naming the field; the run's preflight and ``submit`` call it before any work."""
    from stages.models.distill import needs_features
    from stages.models.factory import check_ladder
    from stages.models.online_distill import check_feature_pairs

    d = cfg.data
    if cfg.ladder_mode != "any":
        try:
            check_ladder(cfg.ladder, cfg.ladder_mode, d.num_classes, d.channels, d.image_size)
        except ValueError as exc:
            raise ConfigError(f"config.{exc}") from exc
    if any(needs_features(t.name) for t in cfg.student.distill):
        # every (teacher, student) rung pair the run trains; later rounds repeat the last rung's pair
        rungs = [(r, cfg.spec(r - 1), cfg.spec(r)) for r in range(1, min(cfg.rounds, len(cfg.ladder)) + 1)]
        try:
            check_feature_pairs(rungs, cfg.student.distill, d.num_classes, d.channels, d.image_size)
        except ValueError as exc:
            raise ConfigError(f"config.student.distill: {exc}") from exc


def load_config(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> PipelineConfig:
    """The config in YAML file ``path`` (or ``base`` alone), ``--set`` ``overrides`` applied, validated once."""
    tree = read_tree(path, overrides, base)
    try:
        return _VALIDATE.validate_python(tree)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, PipelineConfig, "config")) from exc


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---- the tree: a YAML file and --set overrides (nothing here knows the config's fields) ----


def read_tree(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> dict:
    """``base`` (copied), updated by the YAML mapping in ``path``, then each override applied in order."""
    tree: dict = copy.deepcopy(base or {})  # overrides edit nested sections in place; the caller's base stays as is
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            hint = "; quote strings holding { } [ ] , or : inside [...]" if "flow" in str(exc) else ""
            raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}{hint}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        tree.update(loaded or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def apply_override(tree: dict, assignment: str) -> None:
    """``a.b.c=value`` into a nested dict; the value is parsed as YAML (``5``, ``0.1``, ``[a, b]``, ``true``).

    A number steps into a list (``ladder.1.model=x``); the entry must already exist.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    path = path.strip()
    keys = path.split(".")
    node: dict | list = tree
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            child = node[_list_index(node, key, path, ".".join(keys[:depth]))]
        else:
            child = node.setdefault(key, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {path}: {key} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {path}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
            "quote strings holding { } [ ] , : or #, e.g. data.labeled=['/d/x-{0..3}.tar']"
        ) from exc
    if isinstance(node, list):
        node[_list_index(node, keys[-1], path, ".".join(keys[:-1]))] = value
    else:
        node[keys[-1]] = value


def _list_index(items: list, key: str, path: str, where: str) -> int:
    """``key`` as an index of the list at ``where``, or a ``ConfigError`` saying which indices exist."""
    valid = f"indices 0..{len(items) - 1}" if items else "it is empty"
    if not key.isdigit():
        raise ConfigError(f"--set {path}: {where} is a list ({valid}); put an entry index before {key!r}")
    if int(key) >= len(items):
        raise ConfigError(
            f"--set {path}: {where} has no entry {key} ({valid}); "
            f"add the entry in the config file or set the whole list ({where}=[...])"
        )
    return int(key)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem in one line, without its multi-line location excerpt."""
    context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
    if problem is None:
        return str(exc).splitlines()[0]
    return f"{context}: {problem}" if context else problem
