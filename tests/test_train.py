"""stages/train.py, stages/data/loader.py, stages/models/checkpoint.py, stages/models/transforms.py: losses, schedule,
checkpoints, the in-process training loop with resume, and the mixed labeled/pseudo-labeled input stream."""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from timm.data.auto_augment import RandAugment

from stages.core.errors import DataError
from stages.core.hooks import LocalHooks
from stages.data.compact import pseudo_sources, write_selection
from stages.data.loader import MixedStream, PseudoSource, shuffled, soft_targets
from stages.data.shards import decode_image, image_field, iter_raw_samples, parse_label, write_shards
from stages.models.checkpoint import CheckpointError, load_checkpoint, read_state, save_checkpoint
from stages.models.device import training_threads
from stages.models.factory import ModelSpec
from stages.models.transforms import clean_transform, noised_transform
from stages.storage.layout import compact as compact_path
from stages.storage.layout import shard_id
from stages.train import (
    TrainConfig,
    TrainPlan,
    build_optimizer,
    build_schedule,
    build_stream,
    noisy_student_loss,
    read_metrics_lines,
    soft_cross_entropy,
    steps_per_epoch,
    train_model,
)

LN = math.log

# ---------------------------------------------------------------- losses (golden values)


def test_soft_cross_entropy_golden():
    # Row 1: logits (ln1, ln2, ln5) -> softmax (1/8, 2/8, 5/8); target (0, .5, .5)
    #        CE = -(.5 ln(2/8) + .5 ln(5/8)) = .5 ln 4 + .5 ln(8/5) = .693147 + .235002 = .928149
    # Row 2: logits (0, 0, 0) -> softmax 1/3 each; any target summing to 1 -> CE = ln 3 = 1.098612
    # Mean over the batch: (.928149 + 1.098612) / 2 = 1.013381
    logits = torch.tensor([[LN(1), LN(2), LN(5)], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    expected = (0.5 * LN(4) + 0.5 * LN(8 / 5) + LN(3)) / 2
    assert expected == pytest.approx(1.013381, abs=1e-6)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    soft = soft_cross_entropy(logits, F.one_hot(labels, 5).float())
    torch.testing.assert_close(soft, F.cross_entropy(logits, labels))


def test_soft_cross_entropy_is_computed_in_float32_for_half_logits():
    logits = torch.tensor([[LN(1), LN(2), LN(5)]], dtype=torch.bfloat16)
    out = soft_cross_entropy(logits, torch.tensor([[0.0, 0.0, 1.0]]))
    assert out.dtype == torch.float32


def test_noisy_student_loss_golden():
    # Two labeled rows with label smoothing eps = .1 (C = 3): CE_ls = (1 - eps)(-ln p_y) + eps * mean_c(-ln p_c)
    #   row 1: p = (1/8, 2/8, 5/8), y = 2: .9 ln(8/5) + .1 (ln 8 + ln 4 + ln(8/5)) / 3 = .423003 + .131191 = .554195
    #   row 2: p = 1/3 each, y = 0: ln 3 = 1.098612
    #   labeled = (.554195 + 1.098612) / 2 = .826403
    # One pseudo row: logits (ln1, ln1, ln2) -> p = (1/4, 1/4, 1/2), target (0, 0, 1): soft CE = ln 2 = .693147
    # Total with pseudo_weight .5: .826403 + .5 * .693147 = 1.172977
    logits = torch.tensor([[LN(1), LN(2), LN(5)], [0.0, 0.0, 0.0], [LN(1), LN(1), LN(2)]])
    labels = torch.tensor([2, 0])
    pseudo = torch.tensor([[0.0, 0.0, 1.0]])
    cfg = TrainConfig(label_smoothing=0.1, pseudo_weight=0.5)
    row1 = 0.9 * LN(8 / 5) + 0.1 * (LN(8) + LN(4) + LN(8 / 5)) / 3
    labeled = (row1 + LN(3)) / 2
    assert labeled == pytest.approx(0.826403, abs=1e-6)
    loss, parts = noisy_student_loss(logits, labels, pseudo, cfg)
    assert loss.item() == pytest.approx(labeled + 0.5 * LN(2), abs=1e-5)
    assert loss.item() == pytest.approx(1.172977, abs=1e-5)
    assert parts["loss_labeled"] == pytest.approx(labeled, abs=1e-5)
    assert parts["loss_pseudo"] == pytest.approx(LN(2), abs=1e-5)


def test_noisy_student_loss_without_pseudo_rows_is_the_labeled_loss():
    logits = torch.tensor([[LN(1), LN(2), LN(5)], [0.0, 0.0, 0.0]])
    loss, parts = noisy_student_loss(
        logits, torch.tensor([2, 0]), torch.zeros(0, 3), TrainConfig(label_smoothing=0.0, pseudo_weight=5.0)
    )
    assert loss.item() == pytest.approx((LN(8 / 5) + LN(3)) / 2, abs=1e-6)
    assert set(parts) == {"loss_labeled"}


def test_noisy_student_loss_weights_the_pseudo_rows():
    pseudo = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    grads = {}
    for weight in (0.0, 1.0):
        logits = torch.zeros(3, 4, requires_grad=True)
        loss, _ = noisy_student_loss(logits, torch.tensor([1]), pseudo, TrainConfig(pseudo_weight=weight))
        loss.backward()
        grads[weight] = logits.grad
    assert grads[0.0][0].abs().sum() > 0 and grads[1.0][0].abs().sum() > 0  # the labeled row always learns
    assert grads[0.0][1:].abs().sum() == 0  # weight 0 switches the pseudo part off
    # d/dz of the mean soft CE over 2 rows: (softmax(z) - target) / 2 = (.25 - 1) / 2 for the target class
    assert grads[1.0][1, 0].item() == pytest.approx(-0.375)


# ---------------------------------------------------------------- schedule, optimizer, steps


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr_ratio: float) -> float:
    """The learning rate the stage's schedule (timm's ``CosineLRScheduler``) sets at ``step``."""
    cfg = TrainConfig(lr=lr, min_lr_ratio=min_lr_ratio)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    build_schedule(optimizer, cfg, total, warmup).step_update(step)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.25),  # warmup from lr / warmup = 1/4, linearly: + t * (1 - 1/4) / 4
        (1, 0.4375),
        (3, 0.8125),
        (4, 1.00),  # cosine starts at progress 0
        (9, 0.55),  # progress (9-4)/(14-4) = .5: .1 + .9 * .5 * (1 + cos(pi/2)) = .55
        (14, 0.10),  # progress 1: base * min_lr_ratio
        (30, 0.10),  # past the end it stays at the floor
    ],
)
def test_the_schedule_warms_up_then_decays_on_a_cosine(step, expected):
    assert lr_at(step, 14, 4, 1.0, 0.1) == pytest.approx(expected)


def test_the_schedule_without_warmup_starts_at_the_base_rate():
    assert lr_at(0, 10, 0, 0.5, 0.0) == pytest.approx(0.5)
    # progress 5/10: .5 * .5 * (1 + cos(pi/2)) = .25
    assert lr_at(5, 10, 0, 0.5, 0.0) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "samples, per_step, workers, expected",
    [
        (100, 16, 1, 7),  # ceil(100 / 16)
        (100, 16, 2, 4),  # ceil(100 / (16 * 2)): every worker takes 4 steps
        (96, 16, 2, 3),  # exact
        (97, 16, 2, 4),  # one sample over: one more step
        (5, 16, 2, 1),  # never zero
        (0, 16, 1, 1),
    ],
)
def test_steps_per_epoch_is_ceil_of_samples_over_batch_times_workers(samples, per_step, workers, expected):
    # Documented as ceil(N / (B * W)) so that all W workers run the same number of steps.
    assert steps_per_epoch(samples, per_step, workers) == expected


def _plan(**kw) -> TrainPlan:
    base = dict(
        spec=ModelSpec("test_resnet", randaug_n=0),
        cfg=TrainConfig(batch_size=16, unlabeled_ratio=3.0),
        num_classes=10,
        channels=1,
        image_size=16,
        mean=(0.5,),
        std=(0.5,),
        labeled=("l.tar",),
        pseudo=(),
        labeled_count=100,
        pseudo_count=1000,
        metrics_path="m.jsonl",
    )
    return TrainPlan(**{**base, **kw})


def test_plan_steps_are_driven_by_the_labeled_set_for_a_teacher_and_the_pseudo_set_for_a_student():
    assert _plan().steps_per_epoch(1) == 7  # ceil(100 / 16)
    assert _plan().steps_per_epoch(2) == 4  # ceil(100 / 32)
    student = _plan(pseudo=(PseudoSource("u.tar", "u.parquet"),))
    assert student.cfg.pseudo_batch == 48  # round(3.0 * 16)
    assert student.steps_per_epoch(1) == 21  # ceil(1000 / 48)
    assert student.steps_per_epoch(2) == 11  # ceil(1000 / 96)


def test_build_optimizer_exempts_biases_and_norms_from_weight_decay():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    from timm.optim import RMSpropTF

    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("rmsprop", RMSpropTF)):
        opt = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.05, lr=0.1))
        assert type(opt) is cls  # the paper's RMSprop is TensorFlow's: timm's rmsproptf, epsilon 1e-3
        no_decay, decay = opt.param_groups
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        assert {p.ndim for p in decay["params"]} == {4, 2}  # conv and linear weights
        assert {p.ndim for p in no_decay["params"]} == {1}  # biases, BN weight and bias
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
        assert decay["lr"] == 0.1
    assert build_optimizer(model, TrainConfig(optimizer="sgd")).param_groups[0]["nesterov"] is True
    assert build_optimizer(model, TrainConfig(optimizer="adamw")).param_groups[0]["fused"] is True  # one kernel
    assert build_optimizer(model, TrainConfig(optimizer="rmsprop")).param_groups[0]["eps"] == pytest.approx(1e-3)


# ---------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("checkpoint_every", 0),
        ("unlabeled_ratio", -1.0),
        ("unlabeled_ratio", 0.0),  # would have trained on one pseudo-labeled sample per step
        ("unlabeled_ratio", 0.01),  # 0.01 x 32 rounds to none
        ("weight_decay", -1e-4),
        ("warmup_epochs", -1.0),
        ("pseudo_weight", -0.5),
        ("grad_clip", -1.0),
        ("loader_workers", -1),
        ("optimizer", "adam"),
        ("momentum", 1.0),
        ("min_lr_ratio", -0.1),
        ("label_smoothing", 1.0),
        ("ema_decay", 1.0),
        ("randaug_ops", ("Rotate", "Mirror")),
    ],
)
def test_train_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: ") as info:
        TrainConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_train_config_accepts_the_documented_values():
    cfg = TrainConfig(optimizer="rmsprop", momentum=0.0, warmup_epochs=0, randaug_ops=("Rotate", "ShearX"))
    assert cfg.pseudo_batch == round(3.0 * 32)
    assert TrainConfig(batch_size=16, unlabeled_ratio=0.5).pseudo_batch == 8


# ---------------------------------------------------------------- checkpoints


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _stepped(optimizer_name: str, steps: int = 3):
    torch.manual_seed(0)
    model = _tiny_net()
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer_name, lr=0.05))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw", "rmsprop"])
def test_checkpoint_round_trip_restores_identical_state(tmp_path, optimizer_name):
    model, opt = _stepped(optimizer_name)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    save_checkpoint(tmp_path, model, opt, ema, {"epoch": 4, "step": 12})

    torch.manual_seed(1)
    model2, ema2 = _tiny_net(), _tiny_net()
    opt2 = build_optimizer(model2, TrainConfig(optimizer=optimizer_name, lr=0.05))
    state = load_checkpoint(tmp_path, model2, opt2, ema2)
    assert (state["epoch"], state["step"]) == (4, 12)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    before, after = opt.state_dict(), opt2.state_dict()
    assert before["state"].keys() == after["state"].keys() and before["state"]
    for pid, values in before["state"].items():
        assert values.keys() == after["state"][pid].keys()
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == after["state"][pid][name].dtype, name
                assert torch.equal(value, after["state"][pid][name]), name
            else:
                assert value == after["state"][pid][name], name
    for g1, g2 in zip(before["param_groups"], after["param_groups"], strict=True):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in g1.items()} == g2
    # and training continues identically
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_read_state_refuses_a_truncated_model_file(tmp_path):
    model, opt = _stepped("adamw")
    ckpt = save_checkpoint(tmp_path, model, opt, None, {"epoch": 1, "step": 3})
    assert read_state(ckpt)["epoch"] == 1
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        read_state(ckpt)
    fresh = _tiny_net()
    untouched = copy.deepcopy(fresh.state_dict())
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt, fresh, build_optimizer(fresh, TrainConfig()), None)
    for a, b in zip(untouched.values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_read_state_refuses_a_missing_file_or_state(tmp_path):
    model, opt = _stepped("sgd")
    ckpt = save_checkpoint(tmp_path, model, opt, None, {"epoch": 1, "step": 3})
    (ckpt / "optim.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optim\.safetensors"):
        read_state(ckpt)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json"):
        read_state(ckpt)


# ---------------------------------------------------------------- train_model with LocalHooks


class RecordingHooks(LocalHooks):
    """LocalHooks that keep the model handed to ``prepare`` (after any restore, before training)."""

    def prepare(self, model):
        self.prepared = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.threads = torch.get_num_threads()  # what training runs on
        self.model = model
        return model


def _digits_plan(digits_root: Path, tmp: Path, epochs: int) -> TrainPlan:
    shards = tuple(str(p) for p in sorted((digits_root / "labeled").glob("*.tar")))
    cfg = TrainConfig(
        epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0, loader_workers=0, checkpoint_every=1, seed=0
    )
    spec = ModelSpec("test_resnet", drop_rate=0.1, drop_path_rate=0.05, randaug_n=0)
    return _plan(spec=spec, cfg=cfg, labeled=shards, labeled_count=100, metrics_path=str(tmp / "metrics.jsonl"))


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory):
    """Two epochs, then the same checkpoint folder resumed with a plan of three epochs."""
    tmp = tmp_path_factory.mktemp("train")
    ckpt = tmp / "ckpt"
    first = RecordingHooks(ckpt)
    first_result = train_model(_digits_plan(digits_root, tmp, epochs=2), first)
    first_lines = (tmp / "metrics.jsonl").read_text().splitlines()
    first_ckpts = sorted(p.name for p in ckpt.iterdir())
    second = RecordingHooks(ckpt)
    second_result = train_model(_digits_plan(digits_root, tmp, epochs=3), second)
    return {
        "tmp": tmp,
        "ckpt": ckpt,
        "first": first,
        "first_result": first_result,
        "first_lines": [json.loads(ln) for ln in first_lines],
        "first_ckpts": first_ckpts,
        "second": second,
        "second_result": second_result,
    }


def test_training_lowers_the_loss_and_writes_metrics(trained):
    rows = trained["first_lines"]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 7), (2, 14)]  # 7 = ceil(100 labeled / 16)
    assert rows[1]["loss"] < rows[0]["loss"] < LN(10) + 0.5
    assert {"lr", "images", "images_per_s", "seconds", "loss_labeled"} <= set(rows[0])
    assert "loss_pseudo" not in rows[0]  # a teacher has no pseudo-labeled rows
    assert rows[0]["images"] == 7 * 16
    assert trained["first_result"] == rows[-1]
    assert trained["first_ckpts"] == ["epoch-0001", "epoch-0002"]
    assert [r["epoch"] for r in trained["first"].reports] == [1, 2]


def test_the_trained_model_is_noised(trained):
    model = trained["first"].model
    assert model.drop_rate == pytest.approx(0.1)
    assert model.training


def test_resume_continues_at_the_recorded_epoch_and_step(trained):
    second = trained["second"]
    assert [(r["epoch"], r["step"]) for r in second.reports] == [(3, 21)], "only one more epoch must run"
    # it started from the epoch-2 weights, not from a fresh model
    saved = load_file(trained["ckpt"] / "epoch-0002" / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(second.prepared[name], tensor), name
    rows = [json.loads(ln) for ln in (trained["tmp"] / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 7), (2, 14), (3, 21)]
    assert rows[:2] == trained["first_lines"]
    # the schedule continued from step 14 of 21: the last step is 20
    assert rows[2]["lr"] == pytest.approx(lr_at(20, 21, 0, 3e-3, 0.01))
    assert sorted(p.name for p in trained["ckpt"].iterdir()) == ["epoch-0002", "epoch-0003"]  # the newest two
    assert read_state(trained["ckpt"] / "epoch-0003")["step"] == 21


def test_local_restore_skips_half_written_checkpoints(tmp_path):
    hooks = LocalHooks(tmp_path / "ckpt")
    assert hooks.restore() is None
    for name in ("epoch-0001", "epoch-0002", "epoch-0003.tmp"):  # a crash mid-copy leaves epoch-0003.tmp
        (tmp_path / "ckpt" / name).mkdir(parents=True)
    (tmp_path / "ckpt" / "epoch-0004.tmp").write_text("")
    assert hooks.restore() == tmp_path / "ckpt" / "epoch-0002"


def test_local_checkpoints_keep_the_newest_two_and_never_the_half_written(tmp_path):
    """As Ray Train's ``num_to_keep=2``: a 4-round digits-hard run kept 2.3 GB of checkpoints before."""
    hooks = LocalHooks(tmp_path / "ckpt")
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_text("weights")
    for epoch in (9, 10, 11):
        hooks.report({"epoch": epoch}, source)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-0010", "epoch-0011"]
    assert hooks.restore() == tmp_path / "ckpt" / "epoch-0011"
    hooks.report({"epoch": 12}, None)  # a report without a checkpoint prunes nothing
    assert len(list((tmp_path / "ckpt").iterdir())) == 2


def test_a_checkpoint_the_disk_cannot_take_is_one_line(tmp_path, monkeypatch):
    import errno
    import shutil

    from stages.storage.files import StorageError

    def full(src, dst, **kwargs):  # what shutil.copytree raises on a full disk: a list of (src, dst, why)
        raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device: 'model.safetensors'")])

    monkeypatch.setattr(shutil, "copytree", full)
    with pytest.raises(StorageError) as info:
        LocalHooks(tmp_path / "ckpt").report({"epoch": 3}, tmp_path)
    assert str(info.value) == f"cannot write {tmp_path / 'ckpt' / 'epoch-0003'}: No space left on device"
    assert info.value.errno == errno.ENOSPC


def test_resume_of_a_finished_run_trains_nothing(trained, digits_root):
    hooks = RecordingHooks(trained["ckpt"])
    result = train_model(_digits_plan(digits_root, trained["tmp"], epochs=3), hooks)
    assert hooks.reports == []
    assert (result["epoch"], result["step"]) == (3, 21)


def test_the_student_stream_is_noised_and_the_clean_transform_is_not(digits_root):
    spec = ModelSpec("test_resnet", randaug_n=2, randaug_m=7)
    ops = ("Rotate", "ShearX", "Contrast")
    plan = _plan(spec=spec, cfg=TrainConfig(loader_workers=0, randaug_ops=ops))
    transform = build_stream(plan, epoch=0, rank=0, world_size=1).dataset.transform
    (randaug,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    assert randaug.num_layers == 2
    assert [op.name for op in randaug.ops] == list(ops)
    assert {op.magnitude for op in randaug.ops} == {7}

    image = Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * 4), "L")
    random.seed(0)
    noisy = [transform(image) for _ in range(8)]
    assert any(not torch.equal(noisy[0], n) for n in noisy[1:]), "RandAugment never changed the image"

    clean = clean_transform(16, (0.5,), (0.5,))
    assert not any(isinstance(t, RandAugment) for t in clean.transforms)
    out = clean(image)
    assert out.shape == (1, 16, 16)
    assert all(torch.equal(out, clean(image)) for _ in range(3))
    # Normalise((.5,), (.5,)) maps pixel 0 to -1 and 252 to 252/255*2-1
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() <= 1.0
    # randaug_n = 0 is the clean transform
    no_noise = noised_transform(16, (0.5,), (0.5,), 0, 9)
    assert torch.equal(no_noise(image), out)


# ---------------------------------------------------------------- MixedStream, soft_targets, shuffled


def test_soft_targets_densifies_topk_renormalised_and_hard_labels():
    topk = pa.table(
        {
            "topk_idx": pa.array([[3, 1], [0, 9]], pa.list_(pa.int32())),
            "topk_prob": pa.array(np.array([[0.6, 0.2], [0.3, 0.3]], np.float16).tolist(), pa.list_(pa.float16())),
        }
    )
    dense = soft_targets(topk, 10)
    expected = np.zeros((2, 10), np.float32)
    expected[0, 3], expected[0, 1] = 0.75, 0.25  # .6 / .8, .2 / .8
    expected[1, 0], expected[1, 9] = 0.5, 0.5
    np.testing.assert_allclose(dense, expected, atol=1e-3)
    assert dense.dtype == np.float32

    hard = soft_targets(pa.table({"label": pa.array([2, 0, 9], pa.int32())}), 10)
    np.testing.assert_array_equal(hard, np.eye(10, dtype=np.float32)[[2, 0, 9]])

    probs = np.array([[0.1] * 10, [0.0] * 9 + [0.5]], np.float16)  # row 2 sums to .5
    full = soft_targets(pa.table({"probs": pa.array(probs.tolist(), pa.list_(pa.float16()))}), 10)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(full[1], np.eye(10)[9], atol=1e-6)


def test_soft_targets_reads_chunked_and_fixed_size_list_columns():
    """Selections read back from Parquet come in chunks, and a writer may use fixed-size lists: the dense targets
    are the same as from plain lists (built here value by value, the reference)."""
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(10)[:3] for _ in range(7)]).astype(np.int32)
    val = rng.random((7, 3)).astype(np.float16)
    expected = np.zeros((7, 10), np.float32)
    for r in range(7):
        for i, v in zip(idx[r], val[r], strict=True):
            expected[r, i] = float(v)
    expected /= expected.sum(axis=1, keepdims=True)
    fixed = pa.table(
        {
            "topk_idx": pa.FixedSizeListArray.from_arrays(pa.array(idx.reshape(-1)), 3),
            "topk_prob": pa.FixedSizeListArray.from_arrays(pa.array(val.reshape(-1)), 3),
        }
    )
    chunked = pa.concat_tables([fixed.slice(0, 2), fixed.slice(2, 4), fixed.slice(6)])
    assert chunked.column("topk_idx").num_chunks == 3
    for table in (
        fixed,
        chunked,
        chunked.cast(pa.schema({"topk_idx": pa.list_(pa.int32()), "topk_prob": pa.list_(pa.float16())})),
    ):
        np.testing.assert_allclose(soft_targets(table, 10), expected, atol=1e-6)
    labels = pa.chunked_array([pa.array([3, 1], pa.int32()), pa.array([0], pa.int32())])
    hard = soft_targets(pa.table({"label": labels}), 10)
    np.testing.assert_array_equal(hard, np.eye(10, dtype=np.float32)[[3, 1, 0]])
    probs = pa.chunked_array(
        [pa.array([[0.5] * 10], pa.list_(pa.float16())), pa.array([[0.0] * 9 + [2.0]] * 2, pa.list_(pa.float16()))]
    )
    expected = np.stack([np.full(10, 0.1), np.eye(10)[9], np.eye(10)[9]])
    np.testing.assert_allclose(soft_targets(pa.table({"probs": probs}), 10), expected, atol=1e-6)
    assert soft_targets(fixed.slice(0, 0), 10).shape == (0, 10)


def test_shuffled_is_a_seeded_bounded_permutation():
    items = list(range(200))
    out = list(shuffled(iter(items), 16, random.Random(3)))
    assert sorted(out) == items and out != items
    assert out == list(shuffled(iter(items), 16, random.Random(3)))
    assert out != list(shuffled(iter(items), 16, random.Random(4)))
    # a bounded buffer can delay an item but never move it earlier than buffer places
    assert all(pos >= item - 16 for pos, item in enumerate(out))
    assert list(shuffled(iter([1, 2]), 16, random.Random(0))) in ([1, 2], [2, 1])


def _labeled_lookup(shards, transform) -> dict[bytes, set[int]]:
    lookup: dict[bytes, set[int]] = collections.defaultdict(set)
    for shard in shards:
        for sample in iter_raw_samples(shard):
            x = transform(decode_image(image_field(sample), 1))
            lookup[x.numpy().tobytes()].add(parse_label(sample, 10))
    return lookup


def test_mixed_stream_without_pseudo_data_yields_labeled_batches(digits_root):
    shards = [str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))]
    transform = clean_transform(16, (0.5,), (0.5,))
    stream = iter(MixedStream(shards, [], 5, 7, 10, 1, transform, seed=0, shuffle_buffer=16))
    lookup = _labeled_lookup(shards, transform)
    for _ in range(3):
        batch = next(stream)
        assert batch["x"].shape == (5, 1, 16, 16) and batch["x"].dtype == torch.float32
        assert batch["y"].shape == (5,) and batch["y"].dtype == torch.int64
        assert batch["p"].shape == (0, 10)
        for x, y in zip(batch["x"], batch["y"].tolist(), strict=True):
            assert y in lookup[x.numpy().tobytes()], "an image arrived with another sample's label"


def test_mixed_stream_honours_copies_and_soft_targets(digits_root, tmp_path):
    labeled = [str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))]
    unlabeled = str(digits_root / "unlabeled" / "unlabeled-000001.tar")
    samples = list(iter_raw_samples(unlabeled))
    a, b = samples[5], samples[6]
    probs = np.zeros((2, 10), np.float16)
    probs[0, 2], probs[1, 7] = 1.0, 1.0
    source = _compact_source(tmp_path, unlabeled, {a["__key__"]: 3, b["__key__"]: 1}, probs)
    transform = clean_transform(16, (0.5,), (0.5,))
    images = {2: transform(decode_image(a["png"], 1)), 7: transform(decode_image(b["png"], 1))}
    batches, pseudo_batch = 40, 4
    stream = iter(MixedStream(labeled, [source], 2, pseudo_batch, 10, 1, transform, seed=0, shuffle_buffer=16))
    counts: collections.Counter = collections.Counter()
    for _ in range(batches):
        batch = next(stream)
        assert batch["x"].shape == (2 + pseudo_batch, 1, 16, 16)
        assert batch["y"].shape == (2,) and batch["p"].shape == (pseudo_batch, 10)
        assert batch["p"].dtype == torch.float32
        for x, p in zip(batch["x"][2:], batch["p"], strict=True):
            cls = int(p.argmax())
            assert p[cls] == 1.0 and p.sum() == 1.0
            assert torch.equal(x, images[cls]), "a pseudo-labeled image arrived with another sample's target"
            counts[cls] += 1
    total = batches * pseudo_batch
    assert set(counts) == {2, 7}, "only selected samples may be yielded"
    # copies 3 : 1, up to what the shuffle buffer (one pseudo batch) still holds
    assert abs(counts[2] - 0.75 * total) <= pseudo_batch, counts


def test_copies_of_a_sample_are_never_adjacent_in_the_pseudo_stream(digits_root, tmp_path):
    """Compact shards hold each copy as a member, spread over the shard: among several shards, one whose samples
    have 3 or 4 copies yields no two copies of a sample in a row, pass after pass (a buffer of one keeps the
    order the shards are read in)."""
    labeled = [str(digits_root / "labeled" / "labeled-000000.tar")]
    shards = [str(p) for p in sorted((digits_root / "unlabeled").glob("*.tar"))][:3]
    sources = []
    for n, shard in enumerate(shards):
        keys = [x["__key__"] for x in iter_raw_samples(shard)][:12]
        copies = {k: (3 + i % 2 if n == 0 else 1) for i, k in enumerate(keys)}
        probs = np.zeros((len(keys), 10), np.float16)
        probs[:, 0] = np.arange(1, len(keys) + 1) + 100 * n  # a target of its own per sample, to tell them apart
        probs[:, 1] = 1000
        sources.append(_compact_source(tmp_path / str(n), shard, copies, probs))
    transform = clean_transform(16, (0.5,), (0.5,))
    stream = iter(MixedStream(labeled, sources, 1, 6, 10, 1, transform, seed=0, shuffle_buffer=1))
    members = 6 * 3 + 6 * 4 + 12 + 12  # a pass over the three compact shards
    seen = [tuple(p.tolist()) for _ in range(4 * members // 6) for p in next(stream)["p"]]  # four passes
    counts = collections.Counter(seen)
    assert len(counts) == 36 and sorted(set(counts.values())) == [4, 12, 16]
    assert all(x != y for x, y in itertools.pairwise(seen)), "two copies of a sample back to back"


def test_more_slots_than_selected_samples_still_train(digits_root, tmp_path, caplog):
    """4 slots, 2 selected samples: the slots whose share of the one compact shard is empty read all of it."""
    labeled = [str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))]
    unlabeled = str(digits_root / "unlabeled" / "unlabeled-000001.tar")
    keys = [x["__key__"] for x in iter_raw_samples(unlabeled)][:2]
    source = _compact_source(tmp_path, unlabeled, dict.fromkeys(keys, 1))
    transform = clean_transform(16, (0.5,), (0.5,))
    for rank in range(4):
        stream = MixedStream(labeled, [source], 2, 3, 10, 1, transform, seed=0, rank=rank, world_size=4)
        batch = next(iter(stream))
        assert batch["p"].shape == (3, 10)
    assert sum("reading them all" in r.getMessage() for r in caplog.records) == 2  # slots 2 and 3
    empty = _compact_source(tmp_path / "empty", unlabeled, {})
    with pytest.raises(DataError, match="nothing was selected"):
        next(iter(MixedStream(labeled, [empty], 2, 3, 10, 1, transform, seed=0)))


def test_a_compact_shard_that_does_not_match_its_selection_is_refused(digits_root, tmp_path):
    labeled = [str(digits_root / "labeled" / "labeled-000000.tar")]
    unlabeled = str(digits_root / "unlabeled" / "unlabeled-000001.tar")
    keys = [x["__key__"] for x in iter_raw_samples(unlabeled)]
    source = _compact_source(tmp_path / "a", unlabeled, dict.fromkeys(keys[:6], 1))
    other = _compact_source(tmp_path / "b", unlabeled, dict.fromkeys(keys[6:12], 1))
    transform = clean_transform(16, (0.5,), (0.5,))
    wrong = PseudoSource(other.shard, source.selection)
    with pytest.raises(DataError, match="does not match its selection"):
        next(iter(MixedStream(labeled, [wrong], 2, 3, 10, 1, transform, seed=0)))
    shorter = tmp_path / "short.tar"  # the right members, the last one missing
    write_shards(list(iter_raw_samples(source.shard))[:5], tmp_path, "short", 1)
    (tmp_path / "short-000000.tar").rename(shorter)
    with pytest.raises(DataError, match=r"5 member\(s\), expected 6"):
        next(iter(MixedStream(labeled, [PseudoSource(str(shorter), source.selection)], 2, 3, 10, 1, transform, 0)))


@pytest.mark.parametrize("op, magnitude", [("Posterize", 0), ("PosterizeIncreasing", 10), ("PosterizeOriginal", 0)])
def test_posterize_at_any_magnitude_is_a_valid_image(op, magnitude):
    # timm maps these magnitudes to 0 bits, which Pillow refuses; the run crashed mid-epoch on it.
    from PIL import Image

    from stages.models.transforms import noised_transform

    transform = noised_transform(16, (0.5,), (0.5,), randaug_n=3, randaug_m=magnitude, ops=[op])
    for seed in range(10):
        random.seed(seed)  # timm's RandAugment draws from the random module
        out = transform(Image.new("L", (8, 8), 200))
        assert out.shape == (1, 16, 16)


def test_metrics_log_survives_a_line_cut_short_by_a_kill(tmp_path):
    """A driver or worker killed mid-append leaves half a JSON line: the next append (or resume) drops it, and
    readers skip it, instead of crashing the resumed training or the report."""
    from stages.train import _append_metrics

    path = tmp_path / "train_metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "loss": 1.5}\n{"epoch": 3, "lo')
    assert [r["epoch"] for r in read_metrics_lines(path.read_text())] == [1, 2]
    _append_metrics(str(path), {"epoch": 3, "loss": 1.2}, keep_until_epoch=2)  # a resume from epoch 2
    assert [r["epoch"] for r in read_metrics_lines(path.read_text())] == [1, 2, 3]
    path.write_text(path.read_text() + '{"epoch": 4, "lo')
    _append_metrics(str(path), {"epoch": 4, "loss": 1.1})  # no resume, but the cut line still goes
    assert path.read_text().splitlines() == [
        '{"epoch": 1, "loss": 2.0}',
        '{"epoch": 2, "loss": 1.5}',
        '{"epoch": 3, "loss": 1.2}',
        '{"epoch": 4, "loss": 1.1}',
    ]


@pytest.mark.parametrize(
    ("epochs", "min_steps", "max_steps", "per_epoch", "expected"),
    [
        (20, 0, 0, 26, 20),  # no bounds: epochs as given
        (20, 0, 1500, 26, 20),  # digits: 520 steps, under the cap
        (20, 0, 1500, 146, 10),  # five times the data: capped at 1,460 steps, not 2,920
        (20, 0, 100, 146, 1),  # at least one epoch
        (60, 400, 0, 7, 60),  # digits teacher: 420 steps, over the floor
        (60, 400, 0, 4, 100),  # half the labeled images: raised to 400 steps
    ],
)
def test_training_length_follows_the_data_between_bounds(epochs, min_steps, max_steps, per_epoch, expected):
    cfg = TrainConfig(epochs=epochs, min_steps=min_steps, max_steps=max_steps)
    assert cfg.epochs_for(per_epoch) == expected


def test_min_steps_above_max_steps_is_refused():
    with pytest.raises(ValueError, match="min_steps: 500 is above max_steps 400"):
        TrainConfig(min_steps=500, max_steps=400)


# ---------------------------------------------------------------- byte counts of the training input


def _payload_sizes(shard: str) -> tuple[list[str], list[int]]:
    """Each sample's key and the summed size of its files, in file order, read with tarfile (not the loader)."""
    sizes: dict[str, int] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            if info.isreg():
                key = info.name.split(".", 1)[0]
                sizes[key] = sizes.get(key, 0) + info.size
    return list(sizes), list(sizes.values())


def _compact_source(folder: Path, shard: str, copies: dict[str, int], probs=None) -> PseudoSource:
    """A hand-made selection of ``shard`` written by the select stage's own write path (compact shard, then
    sidecar), as the round loop lists it."""
    keys = list(copies)
    table = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array([shard] * len(keys), pa.string()),
        "copies": pa.array(list(copies.values()), pa.int32()),
        "label": pa.array([i % 10 for i in range(len(keys))], pa.int32()),
    }
    if probs is not None:
        table["probs"] = pa.array(np.asarray(probs, np.float16).tolist(), pa.list_(pa.float16()))
    path = folder / f"{shard_id(shard)}.parquet"
    write_selection(pa.table(table), path, 0, "plan")
    source = PseudoSource(str(compact_path(path)), str(path))
    assert pseudo_sources(folder, [shard]) == ([source] if keys else [])  # an empty selection is not listed
    return source


def test_the_labeled_stream_reads_exactly_the_samples_it_yields(digits_root):
    """The teacher's input: no sample is skipped, so what is read is what is trained on, plus the one sample a
    shuffle buffer of one holds (which keeps the file order, so the expected bytes follow from the shard alone)."""
    shard = str(digits_root / "labeled" / "labeled-000000.tar")
    _, sizes = _payload_sizes(shard)
    transform = clean_transform(16, (0.5,), (0.5,))
    stream = iter(MixedStream([shard], [], 5, 7, 10, 1, transform, seed=0, shuffle_buffer=1))
    endless, totals = sizes * 3, torch.zeros(4, dtype=torch.int64)
    for n in range(1, 2 * len(sizes) // 5 + 1):  # two passes over the shard
        batch = next(stream)
        assert batch["bytes"].dtype == torch.int64
        totals += batch["bytes"]
        yielded = 5 * n
        assert totals.tolist() == [sum(endless[: yielded + 1]), sum(endless[:yielded]), 0, 0], n
    assert totals[1] == 2 * sum(sizes)  # two whole passes trained on; read: the same plus the buffered sample


def test_the_pseudo_stream_reads_exactly_the_compact_shard_it_trains_on(digits_root, tmp_path):
    """The student's input: a compact shard holds the selected samples only, each copy a member, so every member
    read is trained on, plus the one sample a shuffle buffer of one holds (which keeps the file order, so the
    expected counts follow from the compact shard alone)."""
    labeled = str(digits_root / "labeled" / "labeled-000000.tar")
    unlabeled = str(digits_root / "unlabeled" / "unlabeled-000001.tar")
    _, lsizes = _payload_sizes(labeled)
    keys, _ = _payload_sizes(unlabeled)
    copies = {keys[i]: 2 if i == 8 else 1 for i in range(0, 40, 4)}  # 10 of the first 40 samples, one twice
    source = _compact_source(tmp_path, unlabeled, copies)
    _, sizes = _payload_sizes(source.shard)
    assert len(sizes) == 11
    endless = sizes * 4
    transform = clean_transform(16, (0.5,), (0.5,))
    stream = iter(MixedStream([labeled], [source], 1, 3, 10, 1, transform, seed=0, shuffle_buffer=1))
    totals = torch.zeros(4, dtype=torch.int64)
    for n in range(1, 9):  # two passes and more
        totals += next(stream)["bytes"]
        yielded = 3 * n
        pseudo = [sum(endless[: yielded + 1]), sum(endless[:yielded])]  # read: up to the sample the buffer holds
        assert totals.tolist() == [sum(lsizes[: n + 1]), sum(lsizes[:n]), *pseudo], n
    assert totals[2] - totals[3] == endless[24]  # read == trained, but for the one sample in the buffer


def _byte_plan(digits_root: Path, tmp_path: Path, workers: int) -> TrainPlan:
    """A student plan on the digits: 4 labeled shards, one unlabeled shard with every third sample selected (two
    slots split a single shard by sample index: both get some)."""
    unlabeled = str(digits_root / "unlabeled" / "unlabeled-000001.tar")
    keys, _ = _payload_sizes(unlabeled)
    copies = {k: 1 for k in keys[::3]}
    cfg = TrainConfig(epochs=1, batch_size=4, unlabeled_ratio=2.0, loader_workers=workers, checkpoint_every=1)
    return _plan(
        cfg=cfg,
        labeled=tuple(str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))),
        pseudo=(_compact_source(tmp_path / "selection", unlabeled, copies),),
        pseudo_count=len(copies),
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )


def test_byte_counts_sum_over_dataloader_workers(digits_root, tmp_path):
    """Each DataLoader worker counts in its own process; the batches carry the counts, so the batches of two
    workers add up to the two slots' own streams run in this process (worker w is slot w of 2)."""
    plan = _byte_plan(digits_root, tmp_path, workers=2)
    loader = iter(build_stream(plan, epoch=0, rank=0, world_size=1))
    through_workers = sum(next(loader)["bytes"] for _ in range(6))
    slots = [iter(build_stream(plan, epoch=0, rank=w, world_size=2).dataset) for w in (0, 1)]
    in_process = sum(next(slot)["bytes"] for slot in slots for _ in range(3))
    assert through_workers.tolist() == in_process.tolist()
    labeled_read, labeled_trained, pseudo_read, pseudo_trained = through_workers.tolist()
    assert labeled_read > labeled_trained > 0 and pseudo_read > pseudo_trained > 0


def test_byte_counts_reach_the_metrics_rows(trained, digits_root, tmp_path):
    teacher = trained["first_lines"]
    labeled = [s for p in sorted((digits_root / "labeled").glob("*.tar")) for s in _payload_sizes(str(p))[1]]
    for row in teacher:  # 7 steps of 16 labeled samples an epoch; a teacher reads no pseudo-labeled data
        assert 112 * min(labeled) <= row["labeled_trained_bytes"] <= 112 * max(labeled)
        assert row["pseudo_read_bytes"] == row["pseudo_trained_bytes"] == 0
    # the first epoch also filled the shuffle buffer (2,048 samples); the second read one sample per sample trained
    assert teacher[0]["labeled_read_bytes"] > 10 * teacher[0]["labeled_trained_bytes"]
    assert 112 * min(labeled) <= teacher[1]["labeled_read_bytes"] <= 112 * max(labeled)

    plan = _byte_plan(digits_root, tmp_path, workers=0)
    train_model(plan, LocalHooks(tmp_path / "ckpt"))
    (row,) = read_metrics_lines((tmp_path / "metrics.jsonl").read_text())
    _, sizes = _payload_sizes(plan.pseudo[0].shard)  # the compact shard: the selected samples only
    yielded = plan.steps_per_epoch(1) * plan.cfg.pseudo_batch
    assert yielded * min(sizes) <= row["pseudo_trained_bytes"] <= yielded * max(sizes)
    # read = trained + the samples still in the pseudo shuffle buffer (one batch)
    extra = row["pseudo_read_bytes"] - row["pseudo_trained_bytes"]
    assert plan.cfg.pseudo_batch * min(sizes) <= extra <= plan.cfg.pseudo_batch * max(sizes)
    assert row["labeled_read_bytes"] > 0 and row["labeled_trained_bytes"] > 0


def test_training_threads_leave_the_loader_workers_their_cores():
    assert training_threads(0, loader_workers=1, available=2) == 1  # 2 threads beside a busy worker stall
    assert training_threads(0, loader_workers=0, available=2) == 2
    assert training_threads(0, loader_workers=4, available=2) == 1  # never none
    assert training_threads(0, loader_workers=2, available=16) == 14
    assert training_threads(3, loader_workers=1, available=2) == 3  # resources.torch_threads wins


def test_train_model_sets_its_threads_and_restores_the_count(digits_root, tmp_path):
    before = torch.get_num_threads()
    hooks = RecordingHooks(tmp_path / "ckpt")
    plan = dataclasses.replace(_digits_plan(digits_root, tmp_path, epochs=1), threads=before + 1)
    train_model(plan, hooks)
    assert hooks.threads == before + 1  # training ran on the plan's count
    assert torch.get_num_threads() == before  # and the process got its own back (in-process labeling follows)
