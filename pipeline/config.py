"""The pipeline config: frozen, typed dataclasses composed from each stage's own config, loaded from YAML.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load``, applies ``key.path=value`` overrides
(values parsed as YAML scalars), and builds the dataclasses, rejecting unknown keys and wrong types with one
``ConfigError`` line naming the field. Stage dataclasses check their own value ranges in ``__post_init__``.
``configs/digits.yaml`` documents every key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.distributed.pseudo_label import LabelResources
from pipeline.distributed.train import TrainResources
from stages.distill import needs_features, pair_stages, term_pairs
from stages.models import ModelSpec, check_classifier
from stages.pseudo_label import PseudoLabelConfig
from stages.select import SelectConfig
from stages.storage import StorageError, check_storage
from stages.train import TrainConfig


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, value out of range."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Shard lists (paths, globs, brace patterns, object-store URLs) and how images enter the model.

    ``prepare_digits``: a folder; when set and its shards are missing, the built-in digits data is written there.
    ``allow_test_overlap``: go on (with a warning) when training images have the same decoded pixels as test images;
    by default that stops the run before round 0 (``pipeline/distributed/data_check.py``).
    """

    labeled: tuple[str, ...] = ()
    unlabeled: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    num_classes: int = 10
    channels: int = 1
    image_size: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    max_bad_fraction: float = 0.01
    prepare_digits: str = ""
    allow_test_overlap: bool = False

    def __post_init__(self) -> None:
        for name in ("labeled", "unlabeled", "test"):
            if not getattr(self, name):
                raise ValueError(f"{name}: give at least one shard path or pattern")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2, got {self.num_classes}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {self.image_size}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name}: needs {self.channels} value(s), one per channel, got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be > 0, got {self.std}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """Where and how wide to run. ``address: ""`` uses ``RAY_ADDRESS`` if set, else starts a local Ray.

    ``label_actors: 0`` starts one pseudo-label actor per ``gpus_per_label_actor`` GPUs of the cluster, or on a
    CPU-only cluster one per ``cpus_per_label_actor`` CPUs; ``label_threads: 0`` gives each actor one torch thread
    per CPU it holds. ``torch_threads`` is for the training workers (0 = Ray's default, one per CPU held).
    """

    address: str = ""
    num_cpus: int = 0
    train_workers: int = 1
    cpus_per_train_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 2
    label_actors: int = 0
    cpus_per_label_actor: float = 1.0
    gpus_per_label_actor: float = 0.0
    label_threads: int = 0
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if self.train_workers < 1:
            raise ValueError(f"train_workers: must be >= 1, got {self.train_workers}")
        for name in (
            "num_cpus",
            "max_failures",
            "torch_threads",
            "label_actors",
            "label_threads",
            "gpus_per_label_actor",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("cpus_per_train_worker", "cpus_per_label_actor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def train(self) -> TrainResources:
        return TrainResources(self.train_workers, self.use_gpu, self.cpus_per_train_worker, self.max_failures)

    def label(self) -> LabelResources:
        return LabelResources(
            self.label_actors, self.cpus_per_label_actor, self.gpus_per_label_actor, self.label_threads
        )


LADDER_MODES = ("any", "expand", "compress")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One Noisy Student run: ``rounds`` student rounds after the round-0 teacher.

    ``storage``: where the run is written and read, by every node: a local folder, a shared filesystem, or an
    object-store URL (``s3://bucket/runs``, ``gs://…``, any fsspec URL; ``stages/storage.py``).
    ``publish``: optional folder or fsspec URL
    (``s3://bucket/runs``) that receives each finished round's model, metrics and manifest (``rounds`` and
    ``download`` read from it).
    ``ladder_mode``: ``expand`` (each rung has at least as many parameters as the one before: Noisy Student's
    equal-or-larger students), ``compress`` (never more: knowledge compression into smaller students), ``any``
    (unchecked). Equal sizes pass both, since a ladder shorter than the run repeats its last rung.
    """

    name: str = "run"
    storage: str = "runs"
    publish: str = ""
    rounds: int = 3
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    ladder: tuple[ModelSpec, ...] = (ModelSpec(),)
    ladder_mode: str = "any"
    teacher: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    student: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = dataclasses.field(default_factory=PseudoLabelConfig)
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        for name in ("storage", "publish"):
            try:
                check_storage(getattr(self, name))
            except StorageError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        if self.rounds < 1:
            raise ValueError(
                f"rounds: must be >= 1 (round 0 trains the teacher, rounds 1..N the students), got {self.rounds}"
            )
        if not self.ladder:
            raise ValueError("ladder: give at least one model")
        if self.ladder_mode not in LADDER_MODES:
            raise ValueError(f"ladder_mode: must be one of {', '.join(LADDER_MODES)}, got {self.ladder_mode!r}")
        if self.teacher.distill or self.teacher.online_teacher:
            raise ValueError(
                "teacher.distill: round 0 has no earlier model to distil from; put distill and online_teacher under "
                "student"
            )
        if self.ladder_mode != "any":
            self._check_ladder_sizes()
        if any(needs_features(t.name) for t in self.student.distill):
            self._check_stage_pairs()

    def _check_ladder_sizes(self) -> None:
        d = self.data
        params = [check_classifier(spec, d.num_classes, d.channels, d.image_size) for spec in self.ladder]
        for i in range(1, len(self.ladder)):
            grows, shrinks = params[i] > params[i - 1], params[i] < params[i - 1]
            if (self.ladder_mode == "compress" and grows) or (self.ladder_mode == "expand" and shrinks):
                change, other = ("grows", "expand") if grows else ("shrinks", "compress")
                raise ValueError(
                    f"ladder_mode: the {self.ladder_mode} ladder {change} at ladder[{i}]: {self.ladder[i].model} has "
                    f"{params[i]:,} parameters, {self.ladder[i - 1].model} before it {params[i - 1]:,}; "
                    f"reorder the ladder or set ladder_mode: {other} (or any)"
                )

    def _check_stage_pairs(self) -> None:
        """Feature losses need stages of equal size in every (teacher, student) rung pair the run trains."""
        d = self.data
        for r in range(1, min(self.rounds, len(self.ladder)) + 1):  # later rounds repeat the last rung's pair
            teacher, student = self.spec(r - 1), self.spec(r)
            s_shapes = _rung_shapes(student.model, d.num_classes, d.channels, d.image_size)
            t_shapes = _rung_shapes(teacher.model, d.num_classes, d.channels, d.image_size)
            try:
                pairs = pair_stages(s_shapes, t_shapes, student.model, teacher.model)
                for term in self.student.distill:
                    if needs_features(term.name):
                        term_pairs(term.name, pairs, s_shapes, t_shapes, student.model, teacher.model)
            except ValueError as exc:
                where = f"round {r}, {teacher.model} teaching {student.model}"
                raise ValueError(f"student.distill: {where}: {exc}") from exc

    def spec(self, round_index: int) -> ModelSpec:
        """Round k's model; a ladder shorter than the run repeats its last entry."""
        return self.ladder[min(round_index, len(self.ladder) - 1)]

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Cached by timm name: noise settings change neither the parameter count nor the stage shapes.
@functools.lru_cache(maxsize=64)
def _rung_shapes(model: str, num_classes: int, channels: int, image_size: int) -> list:
    from stages.online_distill import probe_shapes

    spec = ModelSpec(model)
    check_classifier(spec, num_classes, channels, image_size)  # a model that cannot take this input says so first
    return probe_shapes(spec, num_classes, channels, image_size)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)) or value is None:
            value = [value]  # a single path or number where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys and wrong types are ``ConfigError``s."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(fields))}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from exc


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


def load_config(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> PipelineConfig:
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
    return build(PipelineConfig, tree)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
