"""A round's model as one deployable file, ONNX or ``torch.export`` (``.pt2``), that says what it classifies and how
to feed it.

``export_model(model_dir, fmt, out, images)``: the model (eval mode, un-noised) is exported with a dynamic batch
dimension; its metadata holds the class names (``classes``, a JSON list, index = output position) and the
preprocessing (``preprocessing``, JSON: input size, mean, std, interpolation, and ``resize``: ``squash`` = resize the
whole image to the input size, or ``centre_crop`` = resize the shorter side to ``size / crop_pct`` then centre-crop),
as ONNX ``metadata_props`` or the ``.pt2`` archive's extra files (``torch.export.save``; TorchScript, deprecated in
torch 2.14, is gone). The exported file is then run (onnxruntime, ``torch.export.load``) on ``images`` preprocessed
exactly as evaluation does, and its logits are
compared with PyTorch's: the largest absolute difference is returned, and one above ``tolerance`` is an
``ExportError``. ONNX goes through ``torch.onnx.export(dynamo=True)`` (needs ``onnx``, ``onnxscript``; the check
needs ``onnxruntime``: ``pip install -e '.[export]'``).

Run it as ``python -m pipeline export RUN [--round N] --format onnx|pt2 --to FILE``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.core.errors import ExportError
from stages.models.factory import load_model
from stages.models.transforms import card_transform
from stages.storage.files import Location, atomic_target, atomic_write_bytes

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
METADATA_KEYS = ("classes", "preprocessing", "timm_model", "producer")
TOLERANCE = 1e-3  # max |logit difference|; float32 graphs agree to ~1e-5 here, far below a top-1 flip


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
        _export_program(model, x, out, meta)
        got = run_program(out, x)
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


def _export_program(model: torch.nn.Module, x: torch.Tensor, out: str | Path, meta: dict[str, str]) -> None:
    """``torch.export`` with a dynamic batch dimension, saved as a ``.pt2`` archive with the metadata as extra files."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # an archive; its temporary file would not end in .pt2, which torch warns about
    torch.export.save(program, buffer, extra_files=dict(meta))
    atomic_write_bytes(out, buffer.getvalue())


def run_onnx(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX model under onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install -e '.[export]'") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def run_program(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """Logits of an exported ``.pt2`` program."""
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        return module(x).float().numpy()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an exported file carries (ONNX ``metadata_props`` or the ``.pt2`` archive's extra files)."""
    if str(path).endswith(".onnx"):
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    extra = dict.fromkeys(METADATA_KEYS, "")
    torch.export.load(str(path), extra_files=extra)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}
