"""Online distillation in the student stage: the frozen teacher beside the noised student, and the DML peer.

When ``student.distill`` lists terms (``stages/models/distill.py``), ``stages.train.prepare_distill`` wraps the student
in a ``DistillStudent``: the student (``.module``, so ``unwrap`` still finds it for checkpoints and EMA), the
objective's learnable parts (hint regressors, uncertainty log-variances) and, for ``dml``, the peer model
(``.aux``). That one module is what ``hooks.prepare`` hands to DDP, so every learnable part's gradients are
synchronised across workers; the student's weights alone become the round's model.

The teacher (``OnlineTeacher``) is the previous round's model loaded from its folder: built un-noised, in eval mode,
``requires_grad=False``, run under ``torch.no_grad()``, never given to ``hooks.prepare`` (so never DDP-wrapped) and
never saved. It reads ``batch["x_clean"]``, the clean transform of the very images whose RandAugmented version the
student reads in ``batch["x"]`` (``stages.data.loader.MixedStream`` yields both views when ``clean_transform`` is set).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from stages.models.device import place_model
from stages.models.distill import (
    DistillLoss,
    DistillTermConfig,
    Shape,
    Tap,
    describe,
    needs_features,
    pair_stages,
    term_pairs,
)
from stages.models.factory import ModelSpec, check_classifier, create_model, load_model

log = logging.getLogger(__name__)


def tap(model: nn.Module, x: torch.Tensor, features: bool) -> Tap:
    """Logits, plus every stage's output when ``features`` (one pass through timm's ``forward_intermediates``)."""
    if not features:
        return Tap(model(x), [])
    final, maps = model.forward_intermediates(x)
    return Tap(model.forward_head(final), list(maps))


def stage_shapes(model: nn.Module, in_chans: int, image_size: int, name: str = "") -> list[Shape]:
    """``(C, H, W)`` of each stage ``forward_intermediates`` returns for this input size (one eval-mode pass)."""
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{name or type(model).__name__} has no forward_intermediates in timm, so feature losses "
            "(at, fitnet, sp, fsp) cannot tap its stages; use kd or dml with it"
        )
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            _, maps = model.forward_intermediates(torch.zeros(2, in_chans, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return [tuple(int(d) for d in m.shape[1:]) for m in maps]


def probe_shapes(spec: ModelSpec, num_classes: int, in_chans: int, image_size: int) -> list[Shape]:
    """Stage shapes of a ladder rung, from a freshly built model (config checks, before any training)."""
    return stage_shapes(create_model(spec, num_classes, in_chans, noised=False), in_chans, image_size, spec.model)


# Cached by timm name: noise settings change neither the parameter count nor the stage shapes.
@functools.lru_cache(maxsize=64)
def _rung_shapes(model: str, num_classes: int, channels: int, image_size: int) -> list[Shape]:
    spec = ModelSpec(model)
    check_classifier(spec, num_classes, channels, image_size)  # a model that cannot take this input says so first
    return probe_shapes(spec, num_classes, channels, image_size)


def check_feature_pairs(
    rungs: list[tuple[int, ModelSpec, ModelSpec]],
    terms: tuple[DistillTermConfig, ...],
    num_classes: int,
    channels: int,
    image_size: int,
) -> None:
    """Feature losses need stages of equal size in every ``(round, teacher, student)`` pair; a ``ValueError``
    naming the round and the pair otherwise (checked at config load, before any training)."""
    for r, teacher, student in rungs:
        s_shapes = _rung_shapes(student.model, num_classes, channels, image_size)
        t_shapes = _rung_shapes(teacher.model, num_classes, channels, image_size)
        try:
            pairs = pair_stages(s_shapes, t_shapes, student.model, teacher.model)
            for term in terms:
                if needs_features(term.name):
                    term_pairs(term.name, pairs, s_shapes, t_shapes, student.model, teacher.model)
        except ValueError as exc:
            raise ValueError(f"round {r}, {teacher.model} teaching {student.model}: {exc}") from exc


class OnlineTeacher:
    """The frozen teacher: un-noised, eval mode, no grad, never DDP-wrapped; reads the clean view."""

    def __init__(self, model_dir: str | Path, device: torch.device, features: bool):
        model, self.card = load_model(model_dir, device)  # built without dropout / drop path, in eval mode
        self.model = place_model(model.requires_grad_(False), device)
        self.features, self.name = features, self.card["timm_name"]

    def check_input(self, num_classes: int, channels: int, image_size: int, mean, std) -> None:
        """The teacher must see what it was trained on: same classes, input size and normalisation."""
        card = self.card
        want = {"num_classes": num_classes, "input_size": [channels, image_size, image_size]}
        want.update({"mean": list(mean), "std": list(std)})
        got = {k: card.get(k) for k in want}
        if got != want:
            raise ValueError(f"online teacher {self.name}: its model.json has {got}, the student is trained on {want}")

    @torch.no_grad()
    def __call__(self, x_clean: torch.Tensor) -> Tap:
        self.model.eval()  # never noised, whatever a caller did to it
        return tap(self.model, x_clean, self.features)


class DistillStudent(nn.Module):
    """The student (``.module``) with the objective and the optional DML peer (``.aux``), one DDP unit.

    ``forward(x, teacher)`` returns ``(student_logits, peer_logits | None, distill_loss, parts)``.
    """

    def __init__(self, student: nn.Module, objective: DistillLoss, peer: nn.Module | None = None):
        super().__init__()
        self.module = student
        self.aux = nn.ModuleDict({"objective": objective, **({"peer": peer} if peer is not None else {})})

    @property
    def objective(self) -> DistillLoss:
        return self.aux["objective"]

    def forward(self, x: torch.Tensor, teacher: Tap | None):
        student = tap(self.module, x, self.objective.needs_features)
        peer_logits = self.aux["peer"](x) if "peer" in self.aux else None
        # The loss maths (Gram and FSP matrices, normalised maps) stays in float32 under bf16 autocast.
        with torch.autocast(x.device.type, enabled=False):
            loss, parts = self.objective(student, teacher, peer_logits)
        return student.logits, peer_logits, loss, parts


def build_distill(
    student: nn.Module,
    spec: ModelSpec,
    terms: tuple[DistillTermConfig, ...],
    weighting: str,
    num_classes: int,
    channels: int,
    image_size: int,
    teacher: OnlineTeacher | None,
) -> DistillStudent:
    """Wrap ``student`` with the objective (stage pairs resolved from both models' shapes) and a peer for dml."""
    features = any(needs_features(t.name) for t in terms)
    s_shapes: list[Shape] = []
    t_shapes: list[Shape] = []
    if features:
        if teacher is None:
            raise ValueError("feature distillation needs the online teacher")
        s_shapes = stage_shapes(student, channels, image_size, spec.model)
        t_shapes = stage_shapes(teacher.model, channels, image_size, teacher.name)
    objective = DistillLoss(terms, weighting, s_shapes, t_shapes, spec.model, teacher.name if teacher else "")
    peer = create_model(spec, num_classes, channels, noised=True) if objective.needs_peer else None
    pairs = ", ".join(f"{n} {p}" for n, p in objective.pairs.items())
    log.info("distillation: %s%s", describe(terms, weighting), f"; stage pairs {pairs}" if pairs else "")
    return DistillStudent(student, objective, peer)
