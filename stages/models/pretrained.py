"""Where round 0 starts: a teacher trained from given weights (``teacher.init``), or a trained model used as it is
(``teacher.from_model``).

``teacher.init`` names a ``.safetensors`` state dict, a timm checkpoint (``.pth``/``.pth.tar``: ``state_dict``,
``state_dict_ema`` or ``model`` inside, ``module.`` prefixes stripped; read with ``torch.load(weights_only=True)``),
or a model folder this pipeline wrote (``round-NNN`` or a download: its ``model.safetensors``). Loading is timm's own:
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``, told the file's class count and
input channels so that it re-initialises the classifier only when the data's class count differs and adapts the
stem only when the channels differ. ``check_init`` compares the file's tensors with the model's before any work, so
a file for another architecture is one line, never a silent partial load (timm loads non-strictly once it has
dropped a head).

``ladder[N].pretrained: true`` is timm's own pretrained weights (``stages/models.create_model``), downloaded by timm.

A run's own self-supervised encoder (``stages/pretrain.py``: ``round-000/encoder.safetensors``, the timm model without
its classifier) is loaded by ``load_encoder``: every tensor but the classifier's, which keeps its fresh
initialisation. A headless file given as ``teacher.init`` (such an encoder, or timm weights saved with
``num_classes=0``) loads the same way through timm: its head counts as re-initialised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
from torch import nn

from stages.core.errors import DataError
from stages.models.factory import ModelSpec, load_model, load_weights
from stages.storage.files import Location, atomic_write_json, copy_file, exists, read_text
from stages.storage.layout import MODEL_CARD, MODEL_WEIGHTS, ModelFiles


def weights_file(source: str) -> str:
    """The weights file ``source`` names: the file itself, or a pipeline model folder's ``model.safetensors``."""
    path = Path(source).expanduser()
    if path.is_dir():
        if Path(ModelFiles(path).weights).is_file():
            return str(Path(ModelFiles(path).weights).resolve())
        raise DataError(f"teacher.init: {source} is a folder without model.safetensors (a round folder or a download)")
    if not path.is_file():
        raise DataError(f"teacher.init: no file or folder {source}")
    return str(path.resolve())


def _state_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, as timm's loader reads the file (checkpoint keys unwrapped, prefixes stripped)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=True)
    except Exception as exc:  # torch.load and safetensors raise many types for a file that is not weights
        raise DataError(
            f"teacher.init: {path} is not a state dict or timm checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from exc
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _first(names) -> str:
    return names if isinstance(names, str) else names[0]


def init_overlay(model_name: str, path: str, num_classes: int, in_chans: int) -> dict:
    """The ``pretrained_cfg_overlay`` that makes timm load ``path``: the file's own head size and stem channels."""
    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.classifier:
        raise DataError(
            f"teacher.init: timm has no pretrained config for {model_name}, so it cannot load a file into it"
        )
    shapes = _state_shapes(path)
    head = shapes.get(f"{_first(cfg.classifier)}.weight")
    stem = shapes.get(f"{_first(cfg.first_conv)}.weight") if cfg.first_conv else None
    file_chans = stem[1] if stem is not None and len(stem) == 4 else in_chans
    size = tuple(cfg.input_size[1:]) if cfg.input_size else (224, 224)
    return {
        "file": path,
        "num_classes": head[0] if head is not None else 0,  # no head in the file: timm keeps the model's fresh one
        "input_size": (file_chans, *size),
        "source": "",  # a hub source would win over the file
    }


def check_init(spec: ModelSpec, num_classes: int, in_chans: int, source: str) -> dict:
    """Refuse (one line) weights that do not fit ``spec``'s model outside its classifier; returns what will happen:
    ``{"file", "head": "kept" | "re-initialised", "file_classes"}``."""
    path = weights_file(source)
    overlay = init_overlay(spec.model, path, num_classes, in_chans)
    shapes = _state_shapes(path)
    model = timm.create_model(spec.model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    cfg = timm.get_pretrained_cfg(spec.model)
    heads = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)
    stems = (cfg.first_conv,) if isinstance(cfg.first_conv, str) else tuple(cfg.first_conv or ())
    adapted = {f"{n}.{p}" for n in heads for p in ("weight", "bias")} | {f"{n}.weight" for n in stems}
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in wanted if k not in shapes and k not in adapted)
    unexpected = sorted(k for k in shapes if k not in wanted and k not in adapted)
    wrong = sorted(k for k in wanted if k in shapes and k not in adapted and shapes[k] != wanted[k])
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise DataError(
            f"teacher.init: {source} does not fit {spec.model} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensor(s), e.g. {first}); give weights of the ladder[0] model"
        )
    head = "kept" if overlay["num_classes"] == num_classes else "re-initialised"
    return {"file": path, "head": head, "file_classes": overlay["num_classes"]}


def create_from_weights(spec: ModelSpec, num_classes: int, in_chans: int, source: str, noised: bool) -> nn.Module:
    """``stages.models.factory.create_model`` starting from the weights in ``source`` (see the module docstring)."""
    info = check_init(spec, num_classes, in_chans, source)
    kwargs = {"drop_rate": spec.drop_rate, "drop_path_rate": spec.drop_path_rate} if noised else {}
    return timm.create_model(
        spec.model,
        pretrained=True,
        pretrained_cfg_overlay=init_overlay(spec.model, info["file"], num_classes, in_chans),
        num_classes=num_classes,
        in_chans=in_chans,
        **kwargs,
    )


def load_encoder(model: nn.Module, location: Location) -> None:
    """Load a pretrained encoder (a state dict without the classifier; a local path or a URL) into ``model``: every
    tensor but the classifier's must be there with its shape, and nothing else. The classifier keeps its fresh
    initialisation. Anything that does not fit is one ``DataError`` line."""
    state = load_weights(location)
    classifier = _first(model.pretrained_cfg.get("classifier") or "fc")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        reason = str(exc).splitlines()[-1].strip()[:200]
        raise DataError(f"encoder {location} does not fit {type(model).__name__}: {reason}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(f"{classifier}.")]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise DataError(
            f"encoder {location} does not fit {type(model).__name__} ({len(missing)} missing, "
            f"{len(result.unexpected_keys)} unexpected tensor(s), e.g. {first})"
        )


def read_model_card(model_dir: Location) -> dict:
    """``model.json`` of a model folder (local or URL), with a one-line error when it is not one."""
    files = ModelFiles(model_dir)
    if not exists(files.card) or not exists(files.weights):
        raise DataError(f"teacher.from_model: {model_dir} needs {MODEL_CARD} and {MODEL_WEIGHTS} (a round folder)")
    return json.loads(read_text(files.card))


def check_adoptable(model_dir: Location, num_classes: int, channels: int, classes: tuple[str, ...]) -> dict:
    """The card of a trained model that can be round 0 for this data (class count, channels, names agree)."""
    card = read_model_card(model_dir)
    if card["num_classes"] != num_classes or card["input_size"][0] != channels:
        raise DataError(
            f"teacher.from_model: {model_dir} classifies {card['num_classes']} classes from {card['input_size'][0]}-"
            f"channel images; the data has {num_classes} classes and {channels} channel(s)"
        )
    if classes and card.get("classes") and list(card["classes"]) != list(classes):
        raise DataError(
            f"teacher.from_model: {model_dir} names its classes {card['classes']}, the data {list(classes)}"
        )
    return card


def adopt_model(model_dir: Location, out_dir: Location, num_classes: int, channels: int, classes) -> tuple[list, dict]:
    """Round 0 from a trained model: its weights copied into ``out_dir`` (atomically) and its card kept (it says how
    the model sees images), with the round, parameter count and class names added; returns ``(files, result)``."""
    card = check_adoptable(model_dir, num_classes, channels, tuple(classes))
    source, target = ModelFiles(model_dir), ModelFiles(out_dir)
    copy_file(source.weights, target.weights)
    params = sum(t.numel() for t in load_model(model_dir)[0].parameters())
    card.update({"round": 0, "params": params, "classes": list(classes), "adopted_from": str(model_dir)})
    atomic_write_json(target.card, card)
    return [target.weights, target.card], {"adopted_from": str(model_dir)}


def absolute(path: str) -> str:
    """A local path made absolute (Ray Train workers run in another folder); a URL or ``""`` as it is."""
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def check_teacher_source(
    init: str, from_model: str, spec: ModelSpec, num_classes: int, channels: int, classes: tuple[str, ...]
) -> None:
    """Before any work: ``teacher.init`` fits the round-0 model, ``teacher.from_model`` fits the data."""
    if init:
        check_init(spec, num_classes, channels, init)
    if from_model:
        check_adoptable(from_model, num_classes, channels, classes)


def source_digest(init: str, from_model: str) -> dict:
    """What round 0's training depends on beyond the config: the sha256 of the weights it starts from or adopts."""
    from stages.storage.files import sha256_file

    if init:
        return {"teacher_init": sha256_file(weights_file(init))}
    if from_model:
        return {"teacher_from_model": sha256_file(ModelFiles(from_model).weights)}
    return {}
