"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``model.safetensors`` (raw weights), ``ema.safetensors`` (when EMA is on),
``optim.safetensors`` + ``optim.json`` (optimizer state split into tensors and structure) and ``state.json``
(epoch, step, sha256 of each file), and ``aux.safetensors`` when training has learnable parts beside the model
(online distillation's hint regressors, loss weights and DML peer). ``load_checkpoint`` verifies the hashes, so a
truncated file is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from stages.models.factory import atomic_save_safetensors, unwrap
from stages.storage.files import atomic_write_json, sha256_file
from stages.storage.layout import CKPT_AUX, CKPT_STATE, CheckpointFiles


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or does not match its recorded hashes."""


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in structure["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    state: dict,
    aux: nn.Module | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = CheckpointFiles(out_dir)
    atomic_save_safetensors(unwrap(model).state_dict(), files.model)
    if ema is not None:
        atomic_save_safetensors(unwrap(ema).state_dict(), files.ema)
    if aux is not None:
        atomic_save_safetensors(aux.state_dict(), files.aux)
    tensors, structure = optimizer_to_flat(optimizer.state_dict())
    atomic_save_safetensors(tensors, files.optim)
    atomic_write_json(files.optim_meta, structure)
    written = sorted(
        p.name for p in out_dir.iterdir() if p.suffix in (".safetensors", ".json") and p.name != CKPT_STATE
    )
    atomic_write_json(files.state, {**state, "sha256": {f: sha256_file(out_dir / f) for f in written}})
    return out_dir


def read_state(ckpt_dir: Path) -> dict:
    """``state.json`` after checking every file it lists; raises ``CheckpointError`` otherwise."""
    state_path = CheckpointFiles(ckpt_dir).state
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable state.json ({exc})") from exc
    for name, digest in state.get("sha256", {}).items():
        path = ckpt_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {name} is missing or does not match its sha256")
    return state


def load_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    aux: nn.Module | None = None,
) -> dict:
    """Restore weights, EMA, ``aux`` and optimizer in place (strict); returns ``state.json``."""
    state = read_state(ckpt_dir)
    if aux is not None and CKPT_AUX not in state.get("sha256", {}):
        raise CheckpointError(f"checkpoint {ckpt_dir}: no aux.safetensors, but this training has distillation state")
    files = CheckpointFiles(ckpt_dir)
    unwrap(model).load_state_dict(load_file(files.model), strict=True)
    if ema is not None:
        unwrap(ema).load_state_dict(load_file(files.ema), strict=True)
    if aux is not None:
        aux.load_state_dict(load_file(files.aux), strict=True)
    structure = json.loads(files.optim_meta.read_text())
    optimizer.load_state_dict(optimizer_from_flat(load_file(files.optim), structure))
    return state
