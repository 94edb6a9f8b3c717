"""Distillation losses by name, and the objective that composes them (fixed or learned weights).

Config (``student`` section)::

    distill: [{name: kd, weight: 1.0, temperature: 4}, {name: at, weight: 1000}]
    distill_weighting: fixed        # fixed | uncertainty
    online_teacher: true            # kd, fitnet, at, sp, fsp read the frozen previous-round model

Registered losses (``DISTILL_LOSSES``; each class's docstring names its paper and the exact formula used):

- response-based: ``kd`` (Hinton et al. 2015), ``dml`` (deep mutual learning, Zhang et al. 2018);
- feature-based: ``fitnet`` (FitNets hints, Romero et al. 2015), ``at`` (attention transfer, Zagoruyko &
  Komodakis 2017);
- relation-based: ``sp`` (similarity-preserving, Tung & Mori 2019), ``fsp`` (FSP matrices, Yim et al. 2017).

``DistillLoss`` sums the terms with their config weights, or with ``distill_weighting: uncertainty`` learns one
log-variance per term (Kendall, Gal & Cipolla 2018): ``sum_i exp(-s_i) * L_i + s_i``, ``s_i`` starting at
``-log(weight_i)`` so the first step equals the fixed weighting. That is twice the paper's Eq. 7 with
``s = log sigma^2``; the factor 2 only rescales the gradient. The supervised loss (labeled CE + pseudo-label soft CE)
stays outside the weighting, at weight 1: it is the task, the terms are the paths that help it.

Feature stages and how they are paired
--------------------------------------
Features come from timm's ``forward_intermediates`` (one pass gives every stage's output and, through
``forward_head``, the logits; ``features_only`` would need a second model for the logits). Its stages are the
models' ``feature_info`` entries (for a ResNet: stem, layer1..layer4).

Student and teacher stages are paired by spatial size: for every ``H x W`` that both models produce, the deepest
student stage of that size is paired with the deepest teacher stage of that size, in order of depth. Channels may
differ (``fitnet``'s 1x1 regressor maps the student's to the teacher's; ``at`` and ``sp`` do not depend on them).
Sizes that only one model produces are left out. When no size is shared (e.g. a ViT at stride 16 against a ResNet
at 32x32, whose stages are 16x16, 8x8, 4x4, 2x2, 1x1), ``pair_stages`` raises a ``ValueError`` naming both
models' stage shapes: feature losses are then not possible, ``kd`` and ``dml`` still are. Teacher maps are never
resized to fit: a pooled map is not what the teacher computed.

Per loss: ``fitnet`` uses one hint, the middle pair (the paper's guided/hint layers are the middle ones); ``at``
and ``sp`` use every pair; ``fsp`` uses consecutive pairs (k, k+1) inside each model, and needs equal channel
counts at every pair, as in the paper (teacher and student of the same widths).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, StrictFloat, StrictStr, model_validator
from torch import nn

from stages.core.config import config

Weighting = Literal["fixed", "uncertainty"]
WEIGHTINGS = get_args(Weighting)


class Tap(NamedTuple):
    """One model's outputs on a batch: logits, and its stage feature maps (``[]`` when no loss reads them)."""

    logits: torch.Tensor
    features: list[torch.Tensor]


# ---------------------------------------------------------------- response-based


class KDLoss(nn.Module):
    """Knowledge distillation: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531.

    ``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over the batch. The ``T^2``
    keeps the gradient's scale independent of ``T`` (paper, section 2).
    """

    kind: ClassVar[str] = "logits"

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kl_div(teacher.detach(), student, self.temperature) * self.temperature**2


class MutualLoss(nn.Module):
    """Deep mutual learning: Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning", arXiv:1706.00384.

    Two students teach each other: ``KL(p_peer || p_student) + KL(p_student || p_peer)`` with the target side
    detached in each, so the student's gradient comes from the first term only and the peer's from the second
    (the paper's Eq. 2 and 3, both networks updated at every step). ``T^2 * ...`` with softened ``p`` when
    ``temperature != 1`` (the paper uses 1).

    Wiring: the peer is a second model of the student's own ladder rung (same timm name and noise, its own random
    initialisation), built by ``stages.models.online_distill`` and trained alongside on the same noised batch with the
    same supervised loss; it is checkpointed with the run and discarded at the end. No teacher is needed.
    """

    kind: ClassVar[str] = "peer"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return (kl_div(peer.detach(), student, t) + kl_div(student.detach(), peer, t)) * t**2


def kl_div(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(target / T) || softmax(logits / T))``, batch mean, in float32."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


# ---------------------------------------------------------------- feature-based


class FitNetsLoss(nn.Module):
    """FitNets hints: Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, "FitNets: Hints for Thin Deep Nets",
    arXiv:1412.6550.

    For each hint pair, a learned 1x1 convolution ``r`` (no bias) maps the student's map to the teacher's channels,
    and the loss is ``1/2 * mean((r(s) - t)^2)`` (the paper's ``1/2 ||u_h - r(v_g)||^2``, averaged over batch,
    channels and positions rather than summed), summed over pairs. Stage pairs have equal ``H x W``, so 1x1 is
    enough (the paper sizes a convolutional regressor's kernel to make the sizes agree). Trained jointly with the
    other terms, not in the paper's separate hint stage.
    """

    kind: ClassVar[str] = "features"

    def __init__(self, channels: Sequence[tuple[int, int]]):
        super().__init__()
        self.regressors = nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1, bias=False) for cs, ct in channels)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = [
            0.5 * (reg(s.float()) - t.detach().float()).pow(2).mean()
            for reg, s, t in zip(self.regressors, student, teacher, strict=True)
        ]
        return torch.stack(losses).sum()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention, p=2: channel mean of ``A^2``, flattened, L2-normalised per sample."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


class AttentionTransferLoss(nn.Module):
    """Attention transfer: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention", arXiv:1612.03928.

    ``1/2 * sum_pairs mean_{b, positions} (a(s) - a(t))^2`` with ``a`` the normalised p=2 attention map
    (``attention_map``): the paper's ``beta/2 * sum_j || Q_S/||Q_S|| - Q_T/||Q_T|| ||`` as the authors' code computes
    it (squared, averaged over batch and positions). ``beta`` is the config weight (the paper uses 1000).
    """

    kind: ClassVar[str] = "features"

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = [
            (attention_map(s) - attention_map(t.detach())).pow(2).mean() for s, t in zip(student, teacher, strict=True)
        ]
        return 0.5 * torch.stack(losses).sum()


# ---------------------------------------------------------------- relation-based


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Tung & Mori's ``G~``: the ``b x b`` Gram matrix of the flattened maps, each row L2-normalised."""
    q = features.float().flatten(1)
    return F.normalize(q @ q.t(), dim=1)


class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", arXiv:1907.09682.

    ``sum_pairs ||G~_T - G~_S||_F^2 / b^2`` (the paper's Eq. 4), ``G~`` from ``similarity_matrix``. Only the
    batch size has to agree, so channels and sizes may differ; the paper's weight is ``gamma = 3000``.
    """

    kind: ClassVar[str] = "features"

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        b = student[0].shape[0]
        losses = [
            (similarity_matrix(t.detach()) - similarity_matrix(s)).pow(2).sum() / b**2
            for s, t in zip(student, teacher, strict=True)
        ]
        return torch.stack(losses).sum()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Yim et al.'s flow matrix ``G_ij = sum_{h,w} F1_i(h,w) F2_j(h,w) / (h w)``, ``[b, c1, c2]``.

    The two maps come from consecutive stages, so the first is usually larger: it is average-pooled to the second's
    size first (as in the authors' later re-implementations; the paper pairs maps of equal size inside a stage).
    """
    first, second = first.float(), second.float()
    if first.shape[-2:] != second.shape[-2:]:
        first = F.adaptive_avg_pool2d(first, second.shape[-2:])
    h, w = second.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


class FSPLoss(nn.Module):
    """Flow of solution procedure: Yim, Joo, Bae & Kim 2017, "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017 (no arXiv version).

    For consecutive stage pairs ``k, k+1``: ``mean((G_T(k, k+1) - G_S(k, k+1))^2)`` with ``G`` from
    ``fsp_matrix``, summed over ``k`` (the paper's squared L2 with equal lambdas, averaged over the ``c1 x c2``
    entries and the batch instead of summed). The FSP matrices must have equal shapes, i.e. equal channel counts at
    every pair.
    """

    kind: ClassVar[str] = "features"

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = [
            (fsp_matrix(teacher[k].detach(), teacher[k + 1].detach()) - fsp_matrix(student[k], student[k + 1]))
            .pow(2)
            .mean()
            for k in range(len(student) - 1)
        ]
        return torch.stack(losses).sum()


DISTILL_LOSSES: dict[str, type[nn.Module]] = {
    "kd": KDLoss,
    "dml": MutualLoss,
    "fitnet": FitNetsLoss,
    "at": AttentionTransferLoss,
    "sp": SimilarityPreservingLoss,
    "fsp": FSPLoss,
}
TEMPERATURE_LOSSES = ("kd", "dml")


def needs_teacher(name: str) -> bool:
    return DISTILL_LOSSES[name].kind in ("logits", "features")


def needs_features(name: str) -> bool:
    return DISTILL_LOSSES[name].kind == "features"


@config
class DistillTermConfig:
    """One term of the distillation objective: a registered loss name, its weight and (kd, dml) temperature."""

    name: StrictStr = ""
    weight: Annotated[StrictFloat, Field(ge=0)] = 1.0
    temperature: Annotated[StrictFloat, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _check(self) -> DistillTermConfig:
        if self.name not in DISTILL_LOSSES:  # the registry, not a Literal: a new loss registers in one place
            got = f"unknown distillation loss {self.name!r}" if self.name else "missing"
            raise ValueError(f"name: {got}; allowed: {', '.join(DISTILL_LOSSES)}")
        if self.temperature != 1.0 and self.name not in TEMPERATURE_LOSSES:
            raise ValueError(f"temperature: only {' and '.join(TEMPERATURE_LOSSES)} take one, not {self.name!r}")
        return self


def check_terms(terms: Sequence[DistillTermConfig], weighting: str, online_teacher: bool) -> None:
    """The whole list's rules (each term checks itself); ``ValueError`` naming the field."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"distill_weighting: must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    names = [t.name for t in terms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"distill: {', '.join(twice)} listed more than once; give each loss once with its weight")
    if weighting == "uncertainty" and any(t.weight == 0 for t in terms):
        raise ValueError("distill: uncertainty weighting starts each term at its weight; weights must be > 0")
    wants = [n for n in names if needs_teacher(n)]
    if wants and not online_teacher:
        raise ValueError(f"distill: {', '.join(wants)} read the teacher's outputs; set online_teacher: true")
    if online_teacher and not wants:
        raise ValueError(
            "online_teacher: true, but no distill term reads the teacher; add one of "
            f"{', '.join(n for n in DISTILL_LOSSES if needs_teacher(n))} or set online_teacher: false"
        )


# ---------------------------------------------------------------- stage pairing


Shape = tuple[int, int, int]  # one stage's (channels, height, width)


def pair_stages(
    student: Sequence[Shape], teacher: Sequence[Shape], student_name: str = "student", teacher_name: str = "teacher"
) -> list[tuple[int, int]]:
    """``(student stage, teacher stage)`` index pairs of equal ``H x W``, deepest of each size (module docstring)."""
    deepest_s = {tuple(s[1:]): i for i, s in enumerate(student)}
    deepest_t = {tuple(s[1:]): i for i, s in enumerate(teacher)}
    pairs = sorted((i, deepest_t[hw]) for hw, i in deepest_s.items() if hw in deepest_t)
    if not pairs:
        raise ValueError(
            f"cannot pair feature stages by spatial size: student {student_name} has {_shapes(student)}, teacher "
            f"{teacher_name} has {_shapes(teacher)} (C x H x W); no H x W in common, so at/fitnet/sp/fsp cannot run "
            "(kd and dml can); change data.image_size or the models"
        )
    return pairs


def _shapes(shapes: Sequence[Shape]) -> str:
    return "[" + ", ".join("x".join(map(str, s)) for s in shapes) + "]"


def term_pairs(
    name: str,
    pairs: list[tuple[int, int]],
    student: Sequence[Shape],
    teacher: Sequence[Shape],
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> list[tuple[int, int]]:
    """The stage pairs a feature loss reads (module docstring), or a ``ValueError`` saying why it cannot run."""
    if name == "fitnet":
        return [pairs[len(pairs) // 2]]
    if name == "fsp":
        if len(pairs) < 2:
            raise ValueError(
                f"fsp: needs two paired stages, {student_name} and {teacher_name} share one size "
                f"({_shapes(student)} vs {_shapes(teacher)})"
            )
        bad = [(student[i][0], teacher[j][0]) for i, j in pairs if student[i][0] != teacher[j][0]]
        if bad:
            raise ValueError(
                f"fsp: FSP matrices need equal channels at every paired stage; {student_name} "
                f"{_shapes(student)} vs {teacher_name} {_shapes(teacher)} differ ({bad[0][0]} vs {bad[0][1]}); "
                "use at, sp or fitnet across widths"
            )
    return list(pairs)


# ---------------------------------------------------------------- the objective


class DistillLoss(nn.Module):
    """The weighted sum of configured terms; owns their learnable parts (hint regressors, log-variances).

    ``forward(student, teacher, peer_logits)`` returns ``(loss, parts)``: ``parts["loss_<name>"]`` is each term's
    unweighted value and, under uncertainty weighting, ``parts["weight_<name>"]`` its current ``exp(-s)``. Under
    uncertainty weighting the total can be negative (the ``+ s_i`` terms, ``-log(weight)`` at the start); only its
    gradient matters.
    """

    def __init__(
        self,
        terms: Sequence[DistillTermConfig],
        weighting: str = "fixed",
        student_shapes: Sequence[Shape] = (),
        teacher_shapes: Sequence[Shape] = (),
        student_name: str = "student",
        teacher_name: str = "teacher",
    ):
        super().__init__()
        if not terms:
            raise ValueError("distill: no terms given")
        check_terms(terms, weighting, online_teacher=any(needs_teacher(t.name) for t in terms))
        self.names = [t.name for t in terms]
        self.weighting = weighting
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        modules: dict[str, nn.Module] = {}
        pairs: list[tuple[int, int]] = []
        if any(needs_features(n) for n in self.names):
            pairs = pair_stages(student_shapes, teacher_shapes, student_name, teacher_name)
        for t in terms:
            if needs_features(t.name):
                self.pairs[t.name] = term_pairs(
                    t.name, pairs, student_shapes, teacher_shapes, student_name, teacher_name
                )
            if t.name == "fitnet":
                channels = [(student_shapes[i][0], teacher_shapes[j][0]) for i, j in self.pairs[t.name]]
                modules[t.name] = FitNetsLoss(channels)
            elif t.name in TEMPERATURE_LOSSES:
                modules[t.name] = DISTILL_LOSSES[t.name](t.temperature)
            else:
                modules[t.name] = DISTILL_LOSSES[t.name]()
        self.terms = nn.ModuleDict(modules)
        weights = torch.tensor([t.weight for t in terms], dtype=torch.float32)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(-weights.log())
        else:
            self.register_buffer("weights", weights, persistent=False)

    @property
    def needs_features(self) -> bool:
        return bool(self.pairs)

    @property
    def needs_peer(self) -> bool:
        return "dml" in self.names

    def forward(
        self, student: Tap, teacher: Tap | None = None, peer_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        values = []
        for name in self.names:
            term = self.terms[name]
            if term.kind == "peer":
                if peer_logits is None:
                    raise ValueError("dml: no peer logits (the peer model runs beside the student)")
                values.append(term(student.logits, peer_logits))
                continue
            if teacher is None:
                raise ValueError(f"{name}: needs the teacher's outputs (online_teacher: true)")
            if term.kind == "logits":
                values.append(term(student.logits, teacher.logits))
            else:
                s = [student.features[i] for i, _ in self.pairs[name]]
                t = [teacher.features[j] for _, j in self.pairs[name]]
                values.append(term(s, t))
        stacked = torch.stack(values)
        parts = {f"loss_{n}": v.item() for n, v in zip(self.names, stacked.detach(), strict=True)}
        if self.weighting == "uncertainty":
            precision = torch.exp(-self.log_vars)
            parts.update({f"weight_{n}": w.item() for n, w in zip(self.names, precision.detach(), strict=True)})
            return (precision * stacked + self.log_vars).sum(), parts
        return (self.weights * stacked).sum(), parts


def describe(terms: Sequence[DistillTermConfig], weighting: str) -> str:
    """One line for logs: ``kd x1 (T=4) + at x1000, fixed``."""
    parts = [
        f"{t.name} x{t.weight:g}" + (f" (T={t.temperature:g})" if t.name in TEMPERATURE_LOSSES else "") for t in terms
    ]
    return " + ".join(parts) + f", {weighting}"
