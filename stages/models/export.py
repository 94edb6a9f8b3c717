"""A round's model as one deployable file, ONNX or TorchScript, that says what it classifies and how to feed it.

``export_model(model_dir, fmt, out, images)``: the model (eval mode, un-noised) is exported with a dynamic batch
dimension; its metadata holds the class names (``classes``, a JSON list, index = output position) and the
preprocessing (``preprocessing``, JSON: input size, mean, std, interpolation, and ``resize``: ``squash`` = resize the
whole image to the input size, or ``centre_crop`` = resize the shorter side to ``size / crop_pct`` then centre-crop),
as ONNX ``metadata_props`` or TorchScript extra files (``classes.json``, ``preprocessing.json``). The exported file is
then run (onnxruntime, ``torch.jit.load``) on ``images`` preprocessed exactly as evaluation does, and its logits are
compared with PyTorch's: the largest absolute difference is returned, and one above ``tolerance`` is an
``ExportError``. ONNX goes through ``torch.onnx.export(dynamo=True)`` (needs ``onnx``, ``onnxscript``; the check
needs ``onnxruntime``: ``pip install -e '.[export]'``).

Run it as ``python -m pipeline export RUN [--round N] --format onnx|torchscript --to FILE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.models.factory import load_model
from stages.models.transforms import card_transform
from stages.storage.files import Location, atomic_target

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3  # max |logit difference|; float32 graphs agree to ~1e-5 here, far below a top-1 flip


class ExportError(ValueError):
    """An export that cannot be made or does not reproduce PyTorch; the CLI prints it as one line."""


def export_metadata(card: dict) -> dict[str, str]:
    """String metadata for the exported file: class names, preprocessing, the timm model."""
    natural = card.get("augment") == "natural"
    preprocessing = {
        "input_size": card["input_size"],
        "channels": card["input_size"][0],
        "mean": card["mean"],
        "std": card["std"],
        "interpolation": card.get("interpolation", "bilinear"),
        "resize": "centre_crop" if natural else "squash",
        **({"crop_pct": card["crop_pct"]} if natural else {}),
        "scale": "pixels / 255, then (x - mean) / std",
    }
    classes = card.get("classes") or [str(c) for c in range(card["num_classes"])]
    return {
        "classes": json.dumps(classes),
        "preprocessing": json.dumps(preprocessing),
        "timm_model": card["timm_name"],
        "producer": "noisy-student pipeline",
    }


def export_model(
    model_dir: Location, fmt: str, out: str | Path, images: Sequence[Image.Image] = (), tolerance: float = TOLERANCE
) -> dict:
    """Export, then check against PyTorch on ``images`` (random inputs when none); returns the check's figures."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    model, card = load_model(model_dir)
    meta = export_metadata(card)
    transform = card_transform(card)
    batch = [transform(im) for im in images] or list(torch.randn(4, *card["input_size"]))
    x = torch.stack(batch * 2 if len(batch) == 1 else batch)  # the exporter wants an example batch of 2 or more
    with torch.inference_mode():
        ref = model(x).float().numpy()
    if fmt == "onnx":
        _export_onnx(model, x, out, meta)
        got = run_onnx(out, x.numpy())
    else:
        _export_torchscript(model, x, out, meta)
        got = run_torchscript(out, x)
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if not diff <= tolerance:  # also refuses NaN
        raise ExportError(
            f"the exported {fmt} model differs from PyTorch by {diff:.3g} (> {tolerance:g}) on {len(x)} image(s); "
            f"top-1 agrees on {agree:.0%}"
        )
    return {"format": fmt, "file": str(out), "images": len(x), "max_abs_diff": diff, "top1_agreement": agree, **meta}


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, out: str | Path, meta: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("--format onnx needs onnx and onnxscript: pip install -e '.[export]'") from exc
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            model,
            (x,),
            input_names=["image"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    except ImportError as exc:
        raise ExportError(f"--format onnx: {exc} (pip install -e '.[export]')") from exc
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    with atomic_target(out) as tmp:
        onnx.save(proto, str(tmp))


def _export_torchscript(model: torch.nn.Module, x: torch.Tensor, out: str | Path, meta: dict[str, str]) -> None:
    extra = {
        "classes.json": meta["classes"],
        "preprocessing.json": meta["preprocessing"],
        "model.txt": meta["timm_model"],
    }
    with _jit_deprecation(), torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        with atomic_target(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)


@contextlib.contextmanager
def _jit_deprecation():
    """torch 2.14 marks TorchScript deprecated (a FutureWarning on every call); the format stays for deployments
    that load ``.pt`` files with libtorch, without a warning per call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def run_onnx(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX model under onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install -e '.[export]'") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def run_torchscript(path: str | Path, x: torch.Tensor) -> np.ndarray:
    with _jit_deprecation():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(x).float().numpy()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an exported file carries (ONNX ``metadata_props`` or TorchScript extra files)."""
    if str(path).endswith(".onnx"):
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    files = {"classes.json": "", "preprocessing.json": "", "model.txt": ""}
    with _jit_deprecation():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in files.items()}
    return {
        "classes": text["classes.json"],
        "preprocessing": text["preprocessing.json"],
        "timm_model": text["model.txt"],
    }
