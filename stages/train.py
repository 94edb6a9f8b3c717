"""Teacher and student training: losses, learning-rate schedule, optimizer, and the epoch loop.

What ``epochs`` means: for a student, one epoch is one pass over the selected pseudo-labeled set (the sum of
its copies); for the round-0 teacher, one pass over the labeled set. Each optimizer step on each of the
``W`` workers takes ``batch_size`` labeled samples plus ``round(unlabeled_ratio * batch_size)`` pseudo-labeled
ones, so a student epoch is ``ceil(pseudo_total / (pseudo_batch * W))`` steps and a teacher epoch
``ceil(labeled_total / (batch_size * W))`` steps, on every worker alike (``steps_per_epoch``).

Loss: ``CE(labeled, label_smoothing) + pseudo_weight * soft-target CE(pseudo)``, computed over one forward
pass of the mixed batch. With ``distill`` terms (``stages/models/distill.py``) the student stage adds the weighted
distillation objective: the frozen previous-round model runs beside the noised student on the clean view of the
same batch when ``online_teacher`` is on, a DML peer trains alongside with the same supervised loss
(``stages/models/online_distill.py``). ``pseudo_weight: 0`` then distils instead of learning from the stored soft labels
(the selected images are still what the student reads).

Each epoch's row in ``metrics_path`` (``train_metrics.jsonl``) holds its mean losses, images/s, and the bytes the
input stream read from the shards and trained on, labeled and pseudo-labeled apart (``stages.data.loader.BYTE_COUNTS``;
summed over DataLoader workers by the batches that carry them, and over training workers by one all-reduce).

The loop is plain PyTorch; the distributed edge (Ray Train) comes in through ``TrainHooks``: ``prepare`` (DDP),
``restore`` (latest checkpoint) and ``report`` (metrics + checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from torch import nn
from torch.utils.data import DataLoader

from stages.core.config import Many, config
from stages.core.hooks import TrainHooks
from stages.core.stage import StageContext, StageOutput, TrainResources
from stages.data.compact import pseudo_sources
from stages.data.loader import BYTE_COUNTS, MixedStream, PseudoSource, batch_loader
from stages.models.checkpoint import load_checkpoint, read_state, save_checkpoint
from stages.models.device import autocast, place_batch, place_model, torch_threads, training_threads
from stages.models.distill import DistillTermConfig, Weighting, check_terms, needs_features
from stages.models.factory import ModelSpec, atomic_save_safetensors, create_model, load_weights, model_sha, unwrap
from stages.models.online_distill import DistillStudent, OnlineTeacher, build_distill
from stages.models.pretrained import adopt_model, create_from_weights, load_encoder, source_digest
from stages.models.transforms import card_transform, check_ops, train_transform
from stages.storage import files as storage
from stages.storage.artifacts import RoundManifest, inputs_digest
from stages.storage.files import atomic_write_json
from stages.storage.layout import CKPT_EMA, MODEL_WEIGHTS, round_name

log = logging.getLogger(__name__)


@config
class TrainConfig:
    """How one model is trained (the teacher and the students each get one)."""

    epochs: Annotated[StrictInt, Field(gt=0)] = 30
    batch_size: Annotated[StrictInt, Field(gt=0)] = 32
    unlabeled_ratio: Annotated[StrictFloat, Field(gt=0)] = 3.0
    optimizer: Literal["sgd", "adamw", "rmsprop"] = "adamw"
    lr: Annotated[StrictFloat, Field(gt=0)] = 2e-3
    weight_decay: Annotated[StrictFloat, Field(ge=0)] = 0.05
    momentum: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.9
    warmup_epochs: Annotated[StrictFloat, Field(ge=0)] = 1.0
    min_lr_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.01
    label_smoothing: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.1
    pseudo_weight: Annotated[StrictFloat, Field(ge=0)] = 1.0
    grad_clip: Annotated[StrictFloat, Field(ge=0)] = 0.0
    ema_decay: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0
    init_from_teacher: StrictBool = False
    distill: Many[DistillTermConfig] = ()
    distill_weighting: Weighting = "fixed"
    online_teacher: StrictBool = False
    randaug_ops: Many[StrictStr] = ()
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 1
    checkpoint_every: Annotated[StrictInt, Field(gt=0)] = 1
    seed: StrictInt = 0
    min_steps: Annotated[StrictInt, Field(ge=0, description="0 = no floor")] = 0
    max_steps: Annotated[StrictInt, Field(ge=0, description="0 = no cap")] = 0

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.pseudo_batch < 1:
            raise ValueError(
                f"unlabeled_ratio: {self.unlabeled_ratio} x batch_size {self.batch_size} rounds to no pseudo-labeled "
                "sample per step; raise unlabeled_ratio or batch_size"
            )
        check_ops(self.randaug_ops)
        check_terms(self.distill, self.distill_weighting, self.online_teacher)
        if self.min_steps and self.max_steps and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps: {self.min_steps} is above max_steps {self.max_steps}")
        return self

    def epochs_for(self, per_epoch: int) -> int:
        """``epochs``, raised until training takes at least ``min_steps`` and lowered (whole epochs, at least one)
        until it takes at most ``max_steps``: a length that follows the data's size between two bounds, so a data
        set five times larger does not cost five times the steps, nor a tiny one train for a handful of steps."""
        epochs = self.epochs
        if self.min_steps:
            epochs = max(epochs, math.ceil(self.min_steps / per_epoch))
        if self.max_steps:
            epochs = min(epochs, max(1, self.max_steps // per_epoch))
        return epochs

    @property
    def pseudo_batch(self) -> int:
        """Pseudo-labeled samples per step per worker (a student's epoch length is counted in these)."""
        return round(self.unlabeled_ratio * self.batch_size)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c p_c log softmax(logits)_c``; equals CE for one-hot targets."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def noisy_student_loss(
    logits: torch.Tensor, labels: torch.Tensor, pseudo: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Labeled CE (with label smoothing) on the first ``len(labels)`` rows + weighted soft CE on the rest."""
    n = labels.shape[0]
    labeled = F.cross_entropy(logits[:n].float(), labels, label_smoothing=cfg.label_smoothing)
    if pseudo.shape[0] == 0:
        return labeled, {"loss_labeled": labeled.item()}
    pseudo_loss = soft_cross_entropy(logits[n:], pseudo)
    return labeled + cfg.pseudo_weight * pseudo_loss, {
        "loss_labeled": labeled.item(),
        "loss_pseudo": pseudo_loss.item(),
    }


# The paper's RMSprop is TensorFlow's (epsilon inside the square root, 1e-3): timm's ``rmsproptf``. AdamW is torch's
# fused kernel (CPU and CUDA): the same update in one pass over the weights, where the default per-tensor loop took
# ~22 ms a step for resnet10t on this 2-core CPU against ~4 ms fused (a quarter of the digits student's step).
TIMM_OPTIMIZERS = {"sgd": ("sgd", {}), "adamw": ("adamw", {"fused": True}), "rmsprop": ("rmsproptf", {"eps": 1e-3})}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: ``sgd`` is Nesterov SGD, ``rmsprop`` TF-style RMSprop; no weight decay on biases
    and norm weights (1-d parameters)."""
    from timm.optim import create_optimizer_v2

    name, extra = TIMM_OPTIMIZERS[cfg.optimizer]
    kwargs = {"momentum": cfg.momentum} if cfg.optimizer != "adamw" else {}
    return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs, **extra)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    """``cosine_schedule`` from ``cfg.lr`` to ``lr * min_lr_ratio``."""
    return cosine_schedule(optimizer, cfg.lr, cfg.lr * cfg.min_lr_ratio, total_steps, warmup_steps)


def cosine_schedule(optimizer: torch.optim.Optimizer, lr: float, lr_min: float, total_steps: int, warmup_steps: int):
    """timm's ``CosineLRScheduler`` by step: a linear warmup from ``lr / warmup_steps`` to ``lr``, then a cosine
    decay to ``lr_min`` over the remaining steps. Stateless in the step, so a resumed run continues it."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=lr_min,
        warmup_t=warmup_steps,
        warmup_lr_init=lr / max(1, warmup_steps),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def steps_per_epoch(driving_samples: int, per_step: int, world_size: int) -> int:
    return max(1, math.ceil(driving_samples / (per_step * world_size)))


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Everything one training run needs; plain data, so it can travel to Ray Train workers.

    ``teacher_dir``: the previous round's model folder (``model.json`` + ``model.safetensors``), the frozen
    teacher of ``cfg.online_teacher``; ``""`` otherwise. ``init_encoder``: round 0's self-supervised encoder
    (``stages/pretrain.py``), loaded into the new model before its first step, all but the classifier.
    ``exclude_keys``: labeled keys never trained on (a validation split carved from the labeled shards);
    ``labeled_count`` counts the labeled samples without them.
    """

    spec: ModelSpec
    cfg: TrainConfig
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labeled: tuple[str, ...]
    pseudo: tuple[PseudoSource, ...]
    labeled_count: int
    pseudo_count: int
    metrics_path: str
    init_weights: str = ""
    threads: int = 0
    teacher_dir: str = ""
    init_from: str = ""  # teacher.init: weights loaded through timm (stages/models/pretrained.py)
    init_encoder: str = ""  # the run's pretrained encoder (stages/pretrain.py); the classifier stays fresh
    preprocess: tuple[tuple[str, object], ...] = ()  # model.json's input items beyond mean/std (augment, crop_pct)

    @property
    def card(self) -> dict:
        """The input half of this plan's model card (what ``stages.models.transforms`` reads)."""
        size = [self.channels, self.image_size, self.image_size]
        return {"input_size": size, "mean": self.mean, "std": self.std, **dict(self.preprocess)}

    exclude_keys: frozenset[str] = frozenset()

    def steps_per_epoch(self, world_size: int) -> int:
        if self.pseudo:
            return steps_per_epoch(self.pseudo_count, self.cfg.pseudo_batch, world_size)
        return steps_per_epoch(self.labeled_count, self.cfg.batch_size, world_size)

    def epochs(self, world_size: int) -> int:
        """The epochs this plan trains: ``cfg.epochs`` within ``cfg.min_steps``/``cfg.max_steps``."""
        return self.cfg.epochs_for(self.steps_per_epoch(world_size))


def prepare_distill(
    plan: TrainPlan, student: nn.Module, device: torch.device
) -> tuple[DistillStudent, OnlineTeacher | None]:
    """The teacher hook: the student wrapped for ``plan.cfg.distill``, and the online teacher when
    ``plan.cfg.online_teacher`` (lives here, beside ``TrainPlan``, so ``online_distill`` needs nothing of train)."""
    cfg, teacher = plan.cfg, None
    if cfg.online_teacher:
        if not plan.teacher_dir:
            raise ValueError(
                "online_teacher: the plan names no teacher (TrainPlan.teacher_dir, the previous round's model folder)"
            )
        teacher = OnlineTeacher(plan.teacher_dir, device, features=any(needs_features(t.name) for t in cfg.distill))
        teacher.check_input(plan.num_classes, plan.channels, plan.image_size, plan.mean, plan.std)
    shape = (plan.num_classes, plan.channels, plan.image_size)
    return build_distill(student, plan.spec, cfg.distill, cfg.distill_weighting, *shape, teacher), teacher


def _append_metrics(path: str, row: dict, keep_until_epoch: int | None = None) -> None:
    """Append a JSON line. On resume, first drop lines past the restored epoch (they will be redone); a line cut
    short by a kill mid-write is dropped too (the file is rewritten atomically)."""
    p = storage.join(path)
    storage.makedirs(storage.parent(p))
    text = storage.read_text(p) if storage.exists(p) else ""
    if keep_until_epoch is not None or (text and not text.endswith("\n")):
        rows = [r for r in read_metrics_lines(text) if keep_until_epoch is None or r["epoch"] <= keep_until_epoch]
        storage.atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
    storage.append_text(p, json.dumps(row) + "\n")


def read_metrics_lines(text: str) -> list[dict]:
    """The complete records of a ``train_metrics.jsonl`` text (a line cut short by a kill is skipped)."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def build_stream(plan: TrainPlan, epoch: int, rank: int, world_size: int) -> DataLoader:
    spec = plan.spec
    transform = train_transform(plan.card, spec.randaug_n, spec.randaug_m, plan.cfg.randaug_ops)
    clean = card_transform(plan.card) if plan.cfg.online_teacher else None
    stream = MixedStream(
        plan.labeled,
        plan.pseudo,
        plan.cfg.batch_size,
        plan.cfg.pseudo_batch,
        plan.num_classes,
        plan.channels,
        transform,
        seed=plan.cfg.seed * 100_003 + epoch,
        rank=rank,
        world_size=world_size,
        clean_transform=clean,
        exclude_keys=plan.exclude_keys,
    )
    return batch_loader(stream, plan.cfg.loader_workers)


def train_model(plan: TrainPlan, hooks: TrainHooks) -> dict:
    """Train (or resume) one model; returns the final metrics. Only rank 0 writes files. Torch's thread count is
    ``plan.threads`` (Ray sets OMP_NUM_THREADS=1 per worker), else the process's less its loader workers, and is
    restored on return."""
    threads = training_threads(plan.threads, plan.cfg.loader_workers, torch.get_num_threads())
    with torch_threads(threads):
        log.info("training on %d torch thread(s) beside %d loader worker(s)", threads, plan.cfg.loader_workers)
        return _train_model(plan, hooks)


def _train_model(plan: TrainPlan, hooks: TrainHooks) -> dict:
    torch.manual_seed(plan.cfg.seed)
    cfg, device = plan.cfg, hooks.device
    if plan.init_from:
        model = create_from_weights(plan.spec, plan.num_classes, plan.channels, plan.init_from, noised=True)
    else:
        model = create_model(plan.spec, plan.num_classes, plan.channels, noised=True)
    if plan.init_encoder:
        load_encoder(model, plan.init_encoder)
    if plan.init_weights:
        model.load_state_dict(load_weights(plan.init_weights), strict=True)
    teacher, aux = None, None
    if cfg.distill:  # the student becomes a DistillStudent: student + objective (+ DML peer), one DDP unit
        model, teacher = prepare_distill(plan, model, device)
        aux = model.aux
    model = place_model(model, device)
    optimizer = build_optimizer(model, cfg)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(unwrap(model), decay=cfg.ema_decay)
    start_epoch, step, restored = 0, 0, hooks.restore()
    if restored is not None:
        state = load_checkpoint(restored, model, optimizer, ema.module if ema else None, aux)
        start_epoch, step = state["epoch"], state["step"]
        log.info("resumed from %s at epoch %d, step %d", restored, start_epoch, step)
    model = hooks.prepare(model)
    per_epoch, epochs = plan.steps_per_epoch(hooks.world_size), plan.epochs(hooks.world_size)
    schedule = build_schedule(optimizer, cfg, per_epoch * epochs, round(cfg.warmup_epochs * per_epoch))
    metrics: dict = {"epoch": start_epoch, "step": step}
    # One endless stream for the whole run (seeded by the start epoch, so a resume does not replay old batches).
    batches = iter(build_stream(plan, start_epoch, hooks.rank, hooks.world_size))
    for epoch in range(start_epoch, epochs):
        metrics = _train_one_epoch(
            model, teacher, optimizer, schedule, ema, batches, plan, hooks, epoch, step, per_epoch
        )
        step = metrics["step"]
        metrics["epochs"] = epochs
        if hooks.rank == 0:
            _append_metrics(plan.metrics_path, metrics, keep_until_epoch=epoch if epoch == start_epoch else None)
            log.info(
                "epoch %d/%d loss %.4f %s %.0f img/s lr %.2e eta %.0f s",
                epoch + 1,
                epochs,
                metrics["loss"],
                " ".join(f"{k[5:]} {metrics[k]:.4f}" for k in LOGGED_PARTS if k in metrics),
                metrics["images_per_s"],
                metrics["lr"],
                metrics["seconds"] * (epochs - epoch - 1),
            )
        last = epoch + 1 == epochs
        # Only checkpoints are reported: under Ray Train each report waits for the controller's next poll, and
        # the per-epoch metrics are already in the log and metrics_path.
        if (epoch + 1) % cfg.checkpoint_every == 0 or last:
            report_checkpoint(hooks, metrics, model, optimizer, ema, epoch + 1, step, aux)
    return metrics


LOGGED_PARTS = ("loss_labeled", "loss_pseudo", "loss_distill", "loss_peer")


def _step_loss(model, teacher: OnlineTeacher | None, batch: dict, x, cfg: TrainConfig, device):
    """The supervised loss, plus the distillation objective and the DML peer's own supervised loss when on."""
    y, p = batch["y"].to(device), batch["p"].to(device)
    with autocast(device):
        if not cfg.distill:
            logits = model(x)
        else:
            seen = teacher(batch["x_clean"].to(device, non_blocking=True)) if teacher is not None else None
            logits, peer_logits, distill_loss, distill_parts = model(x, seen)
    loss, parts = noisy_student_loss(logits, y, p, cfg)
    if not cfg.distill:
        return loss, parts
    loss = loss + distill_loss
    parts = {**parts, "loss_distill": distill_loss.item(), **distill_parts}
    if peer_logits is not None:
        peer_loss, _ = noisy_student_loss(peer_logits, y, p, cfg)
        loss = loss + peer_loss
        parts["loss_peer"] = peer_loss.item()
    return loss, parts


def _train_one_epoch(
    model,
    teacher: OnlineTeacher | None,
    optimizer,
    schedule,
    ema,
    batches,
    plan: TrainPlan,
    hooks: TrainHooks,
    epoch: int,
    step: int,
    per_epoch: int,
) -> dict:
    cfg, device = plan.cfg, hooks.device
    model.train()
    sums: dict[str, float] = {}
    images, start = 0, time.perf_counter()
    shard_bytes = torch.zeros(len(BYTE_COUNTS), dtype=torch.int64)  # summed from the batches (stages/data/loader.py)
    for _ in range(per_epoch):
        batch = next(batches)
        shard_bytes += batch["bytes"]
        schedule.step_update(step)
        lr = optimizer.param_groups[0]["lr"]
        x = place_batch(batch["x"], device)
        loss, parts = _step_loss(model, teacher, batch, x, cfg, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(unwrap(model), step=step)
        step += 1
        images += x.shape[0]
        for k, v in {"loss": loss.item(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "images": images * hooks.world_size,
        "images_per_s": images * hooks.world_size / seconds,
        "seconds": seconds,
        "device": device.type,  # "cuda" or "cpu": where this epoch's steps ran
        **{k: v / per_epoch for k, v in sums.items()},
        **dict(zip(BYTE_COUNTS, _all_ranks(shard_bytes, hooks), strict=True)),
    }


def _all_ranks(counts: torch.Tensor, hooks: TrainHooks) -> list[int]:
    """``counts`` summed over the training workers (each rank reads its own shards): one all-reduce per epoch,
    which every rank reaches, as each runs the same number of epochs."""
    if hooks.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.to(hooks.device)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(counts)
    return [int(c) for c in counts.tolist()]


def report_checkpoint(hooks: TrainHooks, metrics: dict, model, optimizer, ema, epoch: int, step: int, aux=None) -> None:
    """Rank 0 saves a checkpoint (verified before it is handed over) and reports it with ``metrics``; the other
    ranks report the metrics alone."""
    if hooks.rank != 0:
        hooks.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        ckpt = save_checkpoint(
            Path(tmp),
            model,
            optimizer,
            ema.module if ema else None,
            {"epoch": epoch, "step": step, "metrics": metrics},
            aux,
        )
        read_state(ckpt)  # never hand Ray a checkpoint that does not verify
        hooks.report(metrics, ckpt)


@dataclasses.dataclass(frozen=True)
class Train:
    """The stage that makes a round's model: the teacher from the labeled shards in round 0, a student from them and
    this round's selection after. ``plan`` (``pipeline.plan.plan_for``) holds everything but the pseudo-labeled
    sources, which come from the round's select stage; ``card`` is the model card written beside the weights."""

    plan: TrainPlan
    card: dict
    resources: TrainResources
    name: ClassVar[str] = "train"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        inputs = {"config": ctx.config_digest}
        if self.plan.init_from:
            inputs |= source_digest(self.plan.init_from, "")
        if self.plan.init_encoder:  # round 0's pretrain stage made it: a new encoder retrains this model
            pretrained = ctx.manifest if ctx.round == 0 else RoundManifest(ctx.run.round(0).dir)
            inputs["pretrain"] = pretrained.digest("pretrain")
        if ctx.previous is not None:
            inputs |= {"teacher": model_sha(ctx.previous.model), "select": ctx.manifest.digest("select")}
        return inputs

    def run(self, ctx: StageContext) -> StageOutput:
        plan = self.plan
        if ctx.previous is not None:
            pseudo = tuple(pseudo_sources(ctx.layout.selection, ctx.data.unlabeled_shards))
            plan = dataclasses.replace(
                plan, pseudo=pseudo, pseudo_count=int(ctx.manifest.result("select")["copies_out"])
            )
        name = f"{round_name(ctx.round)}-{inputs_digest(**self.inputs(ctx))[:10]}"
        with tempfile.TemporaryDirectory(prefix="ns-final-") as tmp:  # node-local scratch, whatever the storage
            train = functools.partial(train_model, plan)
            final = ctx.executor.fit(train, name, ctx.run.checkpoints, self.resources, Path(tmp))
            weights = Path(tmp) / f"final-{CKPT_EMA if plan.cfg.ema_decay else MODEL_WEIGHTS}"
            atomic_save_safetensors(load_weights(weights), ctx.layout.model.weights)
        atomic_write_json(ctx.layout.model.card, self.card | {"round": ctx.round})
        result = {
            "final_epoch": final.get("epoch"),
            "steps": final.get("step"),
            "images_per_s": final.get("images_per_s"),
            "loss": final.get("loss"),
        }
        return StageOutput([ctx.layout.model.weights, ctx.layout.model.card], result)


@dataclasses.dataclass(frozen=True)
class Adopt:
    """Round 0 as a given trained model (``teacher.from_model``): copied with its card, not trained."""

    source: str
    name: ClassVar[str] = "train"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {"config": ctx.config_digest} | source_digest("", self.source)

    def run(self, ctx: StageContext) -> StageOutput:
        data = ctx.data
        files, result = adopt_model(self.source, ctx.layout.dir, data.num_classes, data.channels, data.names)
        return StageOutput(files, result)
