"""Models by timm name, and their artifacts: ``model.safetensors`` (weights, no pickle) + ``model.json``.

A downloaded round loads in one line of user code::

    model = stages.models.factory.load_model("runs/<run>/round-003")            # or, without this package:
    m = timm.create_model(**json.load(open("model.json"))["create"])
    safetensors.torch.load_model(m, "model.safetensors")
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Annotated

import timm
import torch
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from safetensors.torch import load, load_file, save_file
from torch import nn

from stages.core.config import LATE, config
from stages.storage.artifacts import RoundManifest
from stages.storage.files import (
    atomic_target,
    atomic_write_json,
    is_url,
    local_path,
    read_bytes,
    read_text,
    sha256_file,
    write_error,
)
from stages.storage.layout import ModelFiles

# timm's RandAugment magnitude runs 0..10 (its _LEVEL_DENOM); the paper's M=27 is on a 0..30 scale, so timm M = M/3.
RANDAUG_MAX_MAGNITUDE = 10.0


@config
class ModelSpec:
    """One rung of the model ladder: which timm model a round trains, and the noise its student gets.

    ``drop_path_rate`` is 1 - survival probability (the paper's survival 0.8 is ``drop_path_rate=0.2``).
    ``randaug_m`` is on timm's 0..10 scale (paper M=27 on a 0..30 scale is timm M=9); ``randaug_n=0`` disables it.
    ``pretrained``: start this rung from timm's pretrained weights (downloaded by timm: needs the model hub reachable
    from every training worker; the head is re-initialised for ``num_classes``).
    """

    model: StrictStr = "resnet10t"
    drop_rate: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0
    drop_path_rate: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0
    randaug_n: Annotated[StrictInt, Field(ge=0)] = 2
    randaug_m: Annotated[
        StrictFloat, Field(ge=0, le=RANDAUG_MAX_MAGNITUDE, description="timm's scale; paper M=27 of 30 is 9")
    ] = 5.0
    pretrained: Annotated[StrictBool, LATE] = False

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if not timm.is_model(self.model):  # timm's registry; the message lists the closest names
            close = difflib.get_close_matches(self.model, timm.list_models(), n=5)
            hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
            raise ValueError(f"model: unknown timm model {self.model!r}{hint}")
        return self


def create_model(spec: ModelSpec, num_classes: int, in_chans: int, noised: bool) -> nn.Module:
    """Build the model; dropout and stochastic depth only when ``noised`` (the student), never for a teacher."""
    kwargs = {"drop_rate": spec.drop_rate, "drop_path_rate": spec.drop_path_rate} if noised else {}
    return timm.create_model(
        spec.model, pretrained=spec.pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def check_classifier(spec: ModelSpec, num_classes: int, in_chans: int, image_size: int) -> int:
    """Fail early when a ladder entry cannot classify this input; returns its parameter count.

    The check builds the un-noised model and runs it once, so it depends only on the timm name and the input: it
    is cached on those (config validation and the run's preflight ask for the same rungs, the ladder repeats)."""
    return _classifier_params(spec.model, num_classes, in_chans, image_size)


@functools.lru_cache(maxsize=64)
def check_ladder(ladder: tuple[ModelSpec, ...], mode: str, num_classes: int, in_chans: int, image_size: int) -> None:
    """``mode`` ``expand``: no rung has fewer parameters than the one before; ``compress``: none has more."""
    params = [check_classifier(spec, num_classes, in_chans, image_size) for spec in ladder]
    for i in range(1, len(ladder)):
        grows, shrinks = params[i] > params[i - 1], params[i] < params[i - 1]
        if (mode == "compress" and grows) or (mode == "expand" and shrinks):
            change, other = ("grows", "expand") if grows else ("shrinks", "compress")
            raise ValueError(
                f"ladder_mode: the {mode} ladder {change} at ladder[{i}]: {ladder[i].model} has "
                f"{params[i]:,} parameters, {ladder[i - 1].model} before it {params[i - 1]:,}; "
                f"reorder the ladder or set ladder_mode: {other} (or any)"
            )


def _classifier_params(name: str, num_classes: int, in_chans: int, image_size: int) -> int:
    spec = ModelSpec(name)
    try:
        model = create_model(spec, num_classes, in_chans, noised=False).eval()
        with torch.inference_mode():
            out = model(torch.zeros(2, in_chans, image_size, image_size))
    except Exception as exc:  # timm raises many types for inputs a model cannot take
        raise ValueError(
            f"ladder: {spec.model} cannot classify {in_chans}x{image_size}x{image_size} images "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "try a larger data.image_size or another model"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"ladder: {spec.model} is not a classifier here (output {shape}, wanted (2, {num_classes}))")
    return sum(p.numel() for p in model.parameters())


def model_card(spec: ModelSpec, num_classes: int, in_chans: int, image_size: int, mean, std) -> dict:
    return {
        "create": {"model_name": spec.model, "num_classes": num_classes, "in_chans": in_chans},
        "timm_name": spec.model,
        "num_classes": num_classes,
        "input_size": [in_chans, image_size, image_size],
        "mean": list(mean),
        "std": list(std),
        "interpolation": "bilinear",
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write atomically (``stages.storage.files.atomic_target``: a local folder or a URL); a failed write is a
    ``StorageError`` naming ``path``."""
    from safetensors import SafetensorError

    with atomic_target(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # safetensors reports I/O failures (disk full) as its own error, not OSError
            raise write_error(path, exc) from exc


def save_model(model: nn.Module, out_dir: str | Path, card: dict) -> None:
    """Write ``model.safetensors`` then ``model.json``, each atomically."""
    files = ModelFiles(out_dir)
    atomic_save_safetensors(unwrap(model).state_dict(), files.weights)
    atomic_write_json(files.card, card)


def load_weights(location: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file from a local path (memory-mapped) or a URL (read whole through fsspec); no pickle."""
    if not is_url(location):
        return load_file(local_path(location), device=str(device))
    return {k: v.to(device) for k, v in load(read_bytes(location)).items()}


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a round's model (a local folder or a URL) un-noised, in eval mode, ``strict=True``, no unpickling."""
    files = ModelFiles(model_dir)
    card = json.loads(read_text(files.card))
    model = timm.create_model(pretrained=False, **card["create"])
    model.load_state_dict(load_weights(files.weights, device), strict=True)
    return model.to(device).eval(), card


def model_sha(model: ModelFiles) -> str:
    """A model folder's weights sha256: as its round's manifest recorded it when it was trained, else hashed."""
    recorded = RoundManifest(model.dir).file_sha("train", model.weights)
    return recorded or sha256_file(model.weights)
