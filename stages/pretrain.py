"""Self-supervised pretraining (SimCLR) of round 0's encoder on the labeled and unlabeled images, before the teacher
trains (issue 31): with few labels the teacher is weak and Noisy Student copies its mistakes; a teacher started from
an encoder that has seen every image does better (digits-hard, 2 labels per class, the prototype's 3 seeds: 81.3 ±
3.8 -> 87.8 ± 2.4% test top-1).

The stage (``Pretrain``, first of round 0) trains ``SimCLR`` (``stages/models/contrastive.py``: the round-0 model
without its classifier, plus a projection head) on two views of each image (``stages/maths/contrastive.py``, made on
tensor batches on the training device) with the NT-Xent loss, AdamW (no weight decay on biases and norms) and a
linear warmup then cosine schedule, for ``pretrain_steps`` steps: ``passes`` over the images, between ``min_steps``
and ``max_steps``. Its input is every image of ``data.labeled`` (a carved validation split left out) and
``data.unlabeled``, labels ignored; validation and test images are never read. It writes the encoder as
``round-000/encoder.safetensors``; the teacher's ``Train`` stage loads it (``TrainPlan.init_encoder``) with a fresh
classifier and names this stage's digest among its inputs, so a new encoder retrains the teacher. Students start from
it too under ``pretrain.init_students`` (``auto``: whenever this stage ran; the paper's students start from scratch,
which ``off`` keeps).

Training goes through the run's executor (``fit``): in this process for a small local run, Ray Train otherwise;
checkpointed every ``checkpoint_every`` steps, so a killed run resumes from its last checkpoint (the input stream and
the views re-seeded at that step, so no batch is replayed). A log line every ``log_every`` steps gives the loss,
steps/s and the time left.

``enabled: auto`` turns it on when the smallest class of the labeled training split has at most ``auto_per_class``
images (decided before round 0 from the scanned labels, recorded in ``run.json`` as ``pretrain``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field, StrictFloat, StrictInt, model_validator
from torch.utils.data import DataLoader

from stages.core.config import Many, config
from stages.core.hooks import TrainHooks
from stages.core.stage import StageContext, StageOutput, TrainResources
from stages.data.loader import ImageStream, batch_loader
from stages.maths.contrastive import ViewConfig, natural_views, nt_xent_loss, pretrain_steps, two_views
from stages.models.checkpoint import load_checkpoint
from stages.models.contrastive import SimCLR, encoder_state
from stages.models.device import autocast, place_batch, place_model, torch_threads, training_threads
from stages.models.factory import ModelSpec, atomic_save_safetensors, load_weights
from stages.models.transforms import unit_transform
from stages.storage.artifacts import inputs_digest
from stages.storage.files import stamp
from stages.storage.layout import MODEL_WEIGHTS, round_name
from stages.train import TIMM_OPTIMIZERS, cosine_schedule, report_checkpoint

log = logging.getLogger(__name__)

Fraction = Annotated[StrictFloat, Field(ge=0, lt=1)]


def _switch(value: object) -> object:
    """YAML 1.1 reads a bare ``on``/``off`` as true/false: take them as the words they were written as."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]


@config
class PretrainConfig:
    """Self-supervised pretraining of round 0's encoder (``configs/digits.yaml`` documents every key).

    ``lr`` is AdamW's for 256 images a step, scaled by the images a step takes (``batch_size`` x workers) / 256.
    ``crop_area``, ``rotate``, ``shear``, ``brightness``, ``contrast``: the views (``stages/maths/contrastive.py``);
    under ``data.augment: natural`` rotation and shear are off, a flip and ``saturation`` jitter on.
    """

    enabled: Switch = "auto"
    auto_per_class: Annotated[StrictInt, Field(ge=0)] = 5
    method: Literal["simclr"] = "simclr"
    passes: Annotated[StrictFloat, Field(gt=0)] = 60.0
    min_steps: Annotated[StrictInt, Field(ge=1)] = 300
    max_steps: Annotated[StrictInt, Field(ge=0, description="0 = no cap")] = 5000
    batch_size: Annotated[StrictInt, Field(ge=2)] = 128
    lr: Annotated[StrictFloat, Field(gt=0)] = 0.002
    weight_decay: Annotated[StrictFloat, Field(ge=0)] = 1e-4
    warmup_steps: Annotated[StrictInt, Field(ge=0)] = 50
    temperature: Annotated[StrictFloat, Field(gt=0)] = 0.2
    proj_hidden: Annotated[StrictInt, Field(ge=1)] = 512
    proj_dim: Annotated[StrictInt, Field(ge=1)] = 128
    crop_area: Many[StrictFloat] = (0.5, 1.0)
    rotate: Annotated[StrictFloat, Field(ge=0, le=180)] = 15.0
    shear: Annotated[StrictFloat, Field(ge=0, lt=90)] = 10.0
    brightness: Fraction = 0.4
    contrast: Fraction = 0.4
    saturation: Fraction = 0.4
    init_students: Switch = "auto"
    checkpoint_every: Annotated[StrictInt, Field(ge=1)] = 100
    log_every: Annotated[StrictInt, Field(ge=1)] = 50
    loader_workers: Annotated[StrictInt, Field(ge=0)] = 1
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        area = self.crop_area
        if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
            raise ValueError(f"crop_area: two fractions of the image, 0 < min <= max <= 1, got {list(self.crop_area)}")
        if self.max_steps and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps: {self.min_steps} is above max_steps {self.max_steps}")
        return self

    def students_from_encoder(self, pretrained: bool, init_from_teacher: bool = False) -> bool:
        """Whether student rounds start from round 0's starting weights (the pretrained encoder, or with ``on``
        ``teacher.init``): ``on``; ``auto`` when round 0 pretrained here and the students do not start from their
        teacher (``student.init_from_teacher``); never with ``off``."""
        return self.init_students == "on" or (self.init_students == "auto" and pretrained and not init_from_teacher)

    def view(self, natural: bool) -> ViewConfig:
        digits = ViewConfig(
            crop_area=(self.crop_area[0], self.crop_area[1]),
            rotate=self.rotate,
            shear=self.shear,
            brightness=self.brightness,
            contrast=self.contrast,
        )
        return natural_views(digits, self.saturation) if natural else digits

    def decide(self, class_counts: Sequence[int], teacher_source: str = "") -> dict:
        """Whether this run pretrains: ``on``, ``off``, or under ``auto`` when the labeled training split's smallest
        class has at most ``auto_per_class`` images; never when round 0 starts from given weights or a given model
        (``teacher_source`` names it). The record ``run.json`` keeps."""
        smallest = min(class_counts) if class_counts else 0
        if self.enabled == "off":
            on, reason = False, "pretrain.enabled: off"
        elif teacher_source:
            on, reason = False, f"round 0 starts from {teacher_source}"
        elif self.enabled == "on":
            on, reason = True, "pretrain.enabled: on"
        else:
            on = smallest <= self.auto_per_class
            reason = (
                f"auto: the smallest labeled class has {smallest} image(s), "
                f"{'at most' if on else 'more than'} pretrain.auto_per_class {self.auto_per_class}"
            )
        return {"enabled": self.enabled, "on": on, "smallest_class": smallest, "reason": reason}


@dataclasses.dataclass(frozen=True)
class PretrainPlan:
    """Everything one pretraining run needs; plain data, so it can travel to Ray Train workers. ``images``: how many
    images the shards hold (labeled without ``exclude_keys``, plus unlabeled), which sets the run's length."""

    spec: ModelSpec
    cfg: PretrainConfig
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    natural: bool
    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]
    images: int
    seed: int
    exclude_keys: frozenset[str] = frozenset()
    threads: int = 0

    def steps(self, world_size: int) -> int:
        c = self.cfg
        return pretrain_steps(self.images, c.batch_size * world_size, c.passes, c.min_steps, c.max_steps)

    def identity(self) -> dict:
        """What decides the encoder, for the stage's inputs: the recipe (not when or how often it logs or
        checkpoints, nor whether students use it), the model, its input, the seed, the images held out."""
        recipe = dataclasses.asdict(self.cfg)
        for key in ("enabled", "auto_per_class", "init_students", "checkpoint_every", "log_every"):
            recipe.pop(key)
        return {
            "recipe": recipe,
            "model": [self.spec.model, self.spec.pretrained],
            "input": [self.channels, self.image_size, list(self.mean), list(self.std), self.natural],
            "images": self.images,
            "seed": self.seed,
            "held_out": inputs_digest(keys=sorted(self.exclude_keys)),
        }

    def stream(self, step: int, rank: int, world_size: int) -> DataLoader:
        """Batches of [0, 1] images from ``step`` on (the order re-seeded there, so a resume replays none)."""
        card = {"input_size": [self.channels, self.image_size, self.image_size]}
        card |= {"augment": "natural"} if self.natural else {}
        stream = ImageStream(
            self.labeled,
            self.unlabeled,
            self.cfg.batch_size,
            self.channels,
            unit_transform(card),
            seed=self.seed * 100_003 + step,
            rank=rank,
            world_size=world_size,
            exclude_keys=self.exclude_keys,
        )
        return batch_loader(stream, self.cfg.loader_workers)


def pretrain_model(plan: PretrainPlan, hooks: TrainHooks) -> dict:
    """Pretrain (or resume) the encoder; returns the final metrics. Only rank 0 writes checkpoints. Threads as for
    training (``stages.models.device.training_threads``), restored on return."""
    with torch_threads(training_threads(plan.threads, plan.cfg.loader_workers, torch.get_num_threads())):
        return _pretrain_model(plan, hooks)


def _pretrain_model(plan: PretrainPlan, hooks: TrainHooks) -> dict:
    from timm.optim import create_optimizer_v2

    torch.manual_seed(plan.seed)
    cfg, device = plan.cfg, hooks.device
    model = place_model(SimCLR(plan.spec, plan.channels, cfg.proj_hidden, cfg.proj_dim), device)
    lr = cfg.lr * cfg.batch_size * hooks.world_size / 256
    name, extra = TIMM_OPTIMIZERS["adamw"]  # fused, as the training stage's
    optimizer = create_optimizer_v2(model, opt=name, lr=lr, weight_decay=cfg.weight_decay, **extra)  # no decay on 1-d
    step, restored = 0, hooks.restore()
    if restored is not None:
        step = load_checkpoint(restored, model, optimizer, None)["step"]
        log.info("pretrain: resumed from %s at step %d", restored, step)
    start, total = step, plan.steps(hooks.world_size)
    if hooks.rank == 0:
        log.info(
            "pretrain: %s on %d images, %d steps of %d x %d worker(s), %s views",
            cfg.method,
            plan.images,
            total,
            cfg.batch_size,
            hooks.world_size,
            "natural" if plan.natural else "digits",
        )
    model = hooks.prepare(model)
    schedule = cosine_schedule(optimizer, lr, 0.0, total, min(cfg.warmup_steps, total))
    batches = iter(plan.stream(step, hooks.rank, hooks.world_size))
    generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step * 101 + hooks.rank)
    view = cfg.view(plan.natural)
    mean = torch.tensor(plan.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(plan.std, device=device).view(1, -1, 1, 1)
    metrics: dict = {"epoch": 0, "step": step, "steps": total, "started_at_step": start}
    losses: list[float] = []
    began = since = time.perf_counter()
    model.train()
    while step < total:
        x = place_batch(next(batches), device)
        schedule.step_update(step)
        v1, v2 = two_views(x, view, generator)
        with autocast(device):
            z = model((torch.cat([v1, v2]) - mean) / std)  # one pass: BatchNorm sees both views together
        loss = nt_xent_loss(*z.float().chunk(2), cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        last = step == total
        if hooks.rank == 0 and (step % cfg.log_every == 0 or last):
            now = time.perf_counter()
            rate = min(len(losses), cfg.log_every) / (now - since)
            since = now
            log.info(
                "pretrain step %d/%d loss %.4f %.2f steps/s eta %.0f s",
                step,
                total,
                sum(losses[-cfg.log_every :]) / min(len(losses), cfg.log_every),
                rate,
                (total - step) / rate,
            )
        if step % cfg.checkpoint_every == 0 or last:
            seconds = time.perf_counter() - began
            metrics = {
                "epoch": math.ceil(step / cfg.checkpoint_every),  # the checkpoint's number (LocalHooks names it so)
                "step": step,
                "steps": total,
                "started_at_step": start,
                "loss": sum(losses[-cfg.log_every :]) / min(len(losses), cfg.log_every),
                "first_loss": losses[0] if start == 0 else None,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": (step - start) * x.shape[0] * hooks.world_size / seconds,
                "seconds": seconds,
                "device": device.type,
            }
            report_checkpoint(hooks, metrics, model, optimizer, None, metrics["epoch"], step)
    return metrics


def shards_identity(shards: Sequence[str]) -> str:
    """A digest of the shards' paths and stamps (size and modification time, or an object's version)."""
    return inputs_digest(shards=[[s, stamp(s)] for s in shards])


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """The stage that pretrains round 0's encoder and writes it (``ctx.layout.encoder``); see the module doc."""

    plan: PretrainPlan
    resources: TrainResources
    name: ClassVar[str] = "pretrain"

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {
            "config": inputs_digest(**self.plan.identity()),
            "shards": shards_identity([*self.plan.labeled, *self.plan.unlabeled]),
            "workers": str(self.resources.workers),
        }

    def run(self, ctx: StageContext) -> StageOutput:
        plan = self.plan
        name = f"{round_name(ctx.round)}-pretrain-{inputs_digest(**self.inputs(ctx))[:10]}"
        with tempfile.TemporaryDirectory(prefix="ns-pretrain-") as tmp:  # node-local scratch, whatever the storage
            train = functools.partial(pretrain_model, plan)
            final = ctx.executor.fit(train, name, ctx.run.checkpoints, self.resources, Path(tmp))
            state = load_weights(Path(tmp) / f"final-{MODEL_WEIGHTS}")
            atomic_save_safetensors(encoder_state(state), ctx.layout.encoder)
        keys = ("steps", "started_at_step", "loss", "first_loss", "images_per_s", "seconds", "device")
        result = {"method": plan.cfg.method, "images": plan.images, **{k: final.get(k) for k in keys}}
        return StageOutput([ctx.layout.encoder], result)
