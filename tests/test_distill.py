"""stages/models/distill.py, stages/models/online_distill.py: every loss against hand-computed values, every loss
trains, stage
pairing, learned weights, the online teacher (clean view, eval, no grad), the loader's two views, config checks."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import check_models, load_config
from stages.core.errors import ConfigError
from stages.core.hooks import LocalHooks
from stages.data.loader import MixedStream
from stages.data.shards import decode_image, image_field, iter_raw_samples, parse_label
from stages.models.distill import (
    DISTILL_LOSSES,
    AttentionTransferLoss,
    DistillLoss,
    DistillTermConfig,
    FitNetsLoss,
    FSPLoss,
    KDLoss,
    MutualLoss,
    SimilarityPreservingLoss,
    Tap,
    fsp_matrix,
    pair_stages,
    term_pairs,
)
from stages.models.factory import ModelSpec, create_model, model_card, save_model
from stages.models.online_distill import OnlineTeacher, build_distill, stage_shapes
from stages.models.transforms import clean_transform
from stages.train import TrainConfig, TrainPlan, train_model
from tests.conftest import tiny_tree

LN = math.log
ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 16, 10
MEAN, STD = (0.5,), (0.5,)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- golden values, one per loss


def test_kd_golden():
    # Student logits 0 -> q = (1/2, 1/2). Teacher logits (T ln 3, 0) at T = 2 -> p = softmax(ln 3, 0) = (3/4, 1/4).
    # KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = .304099 - .173287 = .130812; times T^2 = 4: .523248
    t = 2.0
    expected = (0.75 * LN(1.5) + 0.25 * LN(0.5)) * t**2
    assert expected == pytest.approx(0.523248, abs=1e-6)
    loss = KDLoss(temperature=t)(_t([[0.0, 0.0]]), _t([[t * LN(3), 0.0]]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kd_golden_random_against_numpy():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=gen) * 3, torch.randn(4, 5, generator=gen) * 3
    temp = 3.0
    ps = np.exp(s.numpy() / temp) / np.exp(s.numpy() / temp).sum(1, keepdims=True)
    pt = np.exp(t.numpy() / temp) / np.exp(t.numpy() / temp).sum(1, keepdims=True)
    expected = (pt * np.log(pt / ps)).sum(1).mean() * temp**2
    assert KDLoss(temp)(s, t).item() == pytest.approx(float(expected), rel=1e-5)


def test_dml_golden_and_each_side_learns_from_the_other_only():
    # q_student = (1/2, 1/2), p_peer = (3/4, 1/4) (T = 1).
    # KL(peer || student) = .130812 (as in the kd test); KL(student || peer) = 1/2 ln(2/3) + 1/2 ln 2 = .143841
    student = torch.zeros(1, 2, requires_grad=True)
    peer = _t([[LN(3), 0.0]]).requires_grad_(True)
    loss = MutualLoss()(student, peer)
    expected = (0.75 * LN(1.5) + 0.25 * LN(0.5)) + (0.5 * LN(2 / 3) + 0.5 * LN(2))
    assert expected == pytest.approx(0.274653, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dz KL(target || softmax(z)) = softmax(z) - target: the student is pulled to the peer, the peer to the student
    torch.testing.assert_close(student.grad, _t([[0.5 - 0.75, 0.5 - 0.25]]))
    torch.testing.assert_close(peer.grad, _t([[0.75 - 0.5, 0.25 - 0.5]]))


def test_fitnet_golden():
    # Student map C=2, 1x2: channel 0 = (1, 2), channel 1 = (3, 4); regressor weights (.5, -1) -> (-2.5, -3).
    # Teacher map C=1 = (-2, -1): differences (-.5, -2), squares (.25, 4), mean 2.125, times 1/2 = 1.0625
    loss = FitNetsLoss([(2, 1)])
    with torch.no_grad():
        loss.regressors[0].weight.copy_(_t([0.5, -1.0]).reshape(1, 2, 1, 1))
    student = _t([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    teacher = _t([[-2.0, -1.0]]).reshape(1, 1, 1, 2)
    assert loss([student], [teacher]).item() == pytest.approx(1.0625, abs=1e-6)


def test_attention_transfer_golden():
    # Student C=2, 1x2: channel 0 = (1, 0), channel 1 = (1, 2): mean_c A^2 = (1, 2) -> (1, 2)/sqrt 5.
    # Teacher C=1 = (3, 0): A^2 = (9, 0) -> (1, 0). Squared differences sum to (1 - 1/sqrt5)^2 + 4/5 = 2 - 2/sqrt5;
    # mean over the 2 positions .552786; times 1/2 = .276393
    student = _t([[1.0, 0.0], [1.0, 2.0]]).reshape(1, 2, 1, 2)
    teacher = _t([[3.0, 0.0]]).reshape(1, 1, 1, 2)
    expected = 0.5 * (2 - 2 / math.sqrt(5)) / 2
    assert expected == pytest.approx(0.276393, abs=1e-6)
    assert AttentionTransferLoss()([student], [teacher]).item() == pytest.approx(expected, abs=1e-6)
    # two pairs: summed
    assert AttentionTransferLoss()([student, student], [teacher, teacher]).item() == pytest.approx(2 * expected)


def test_similarity_preserving_golden():
    # Batch of 2. Student rows (1, 0), (0, 1): G = I, rows already unit. Teacher rows (1, 0), (1, 1) (another shape,
    # C=1 x 1x2): G = [[1, 1], [1, 2]] -> rows (1, 1)/sqrt2, (1, 2)/sqrt5.
    # ||G_T - G_S||_F^2 = (1/sqrt2 - 1)^2 + 1/2 + 1/5 + (2/sqrt5 - 1)^2 = .796932; / b^2 = .199233
    student = _t([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    teacher = _t([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    frob = (1 / math.sqrt(2) - 1) ** 2 + 0.5 + 0.2 + (2 / math.sqrt(5) - 1) ** 2
    assert frob / 4 == pytest.approx(0.199233, abs=1e-6)
    assert SimilarityPreservingLoss()([student], [teacher]).item() == pytest.approx(frob / 4, abs=1e-6)


def test_fsp_golden():
    # Equal sizes (1x2). Student F1: channel 0 = (1, 2), channel 1 = (0, 1); F2 = (3, 1).
    #   G_S = [(1*3 + 2*1)/2, (0*3 + 1*1)/2] = [2.5, .5]
    # Teacher F1: (1, 1), (1, 0); F2 = (2, 2): G_T = [(2 + 2)/2, (2 + 0)/2] = [2, 1]
    # mean of squared differences over the 2x1 entries: (.25 + .25) / 2 = .25
    s1, s2 = _t([[1.0, 2.0], [0.0, 1.0]]).reshape(1, 2, 1, 2), _t([[3.0, 1.0]]).reshape(1, 1, 1, 2)
    t1, t2 = _t([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 2), _t([[2.0, 2.0]]).reshape(1, 1, 1, 2)
    torch.testing.assert_close(fsp_matrix(s1, s2), _t([[[2.5], [0.5]]]))
    assert FSPLoss()([s1, s2], [t1, t2]).item() == pytest.approx(0.25, abs=1e-6)


def test_fsp_pools_the_larger_map_to_the_smaller():
    # F1 2x2 = [[1, 2], [3, 4]] average-pools to 2.5 at 1x1; F2 = 2: G = 2.5 * 2 / 1 = 5
    f1, f2 = _t([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2), _t([[2.0]]).reshape(1, 1, 1, 1)
    assert fsp_matrix(f1, f2).item() == pytest.approx(5.0)


# ---------------------------------------------------------------- the objective: fixed and learned weights


def _fake_taps():
    gen = torch.Generator().manual_seed(1)
    s = Tap(torch.randn(4, 3, generator=gen), [torch.randn(4, 2, 2, 2, generator=gen)])
    t = Tap(torch.randn(4, 3, generator=gen), [torch.randn(4, 5, 2, 2, generator=gen)])
    return s, t


def test_fixed_weighting_is_the_weighted_sum_of_the_terms():
    s, t = _fake_taps()
    terms = (DistillTermConfig("kd", 0.5, 2.0), DistillTermConfig("at", 100.0))
    loss, parts = DistillLoss(terms, "fixed", [(2, 2, 2)], [(5, 2, 2)])(s, t)
    kd, at = KDLoss(2.0)(s.logits, t.logits), AttentionTransferLoss()(s.features, t.features)
    assert loss.item() == pytest.approx(0.5 * kd.item() + 100 * at.item(), rel=1e-6)
    assert parts == pytest.approx({"loss_kd": kd.item(), "loss_at": at.item()})


def test_uncertainty_weighting_starts_at_the_weights_and_learns_them():
    # Kendall et al.: sum exp(-s_i) L_i + s_i with s_i = -ln w_i at the start.
    s, t = _fake_taps()
    terms = (DistillTermConfig("kd", 2.0, 2.0), DistillTermConfig("sp", 10.0))
    objective = DistillLoss(terms, "uncertainty", [(2, 2, 2)], [(5, 2, 2)])
    loss, parts = objective(s, t)
    kd, sp = KDLoss(2.0)(s.logits, t.logits).item(), SimilarityPreservingLoss()(s.features, t.features).item()
    assert loss.item() == pytest.approx(2 * kd + 10 * sp - LN(2) - LN(10), rel=1e-5)
    assert parts["weight_kd"] == pytest.approx(2.0) and parts["weight_sp"] == pytest.approx(10.0)
    loss.backward()
    # d/ds_i = -exp(-s_i) L_i + 1
    expected = torch.tensor([1 - 2 * kd, 1 - 10 * sp])
    torch.testing.assert_close(objective.log_vars.grad, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- stage pairing


RESNET_16 = [(64, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1), (512, 1, 1)]


def test_pairing_takes_the_deepest_stage_of_each_shared_size():
    teacher = [(32, 16, 16), (32, 8, 8), (48, 8, 8), (96, 2, 2), (192, 1, 1)]
    # shared sizes 8x8, 2x2, 1x1; 4x4 (student) and 16x16 (teacher) are left out; 8x8 -> teacher stage 2, 1x1 -> 4
    assert pair_stages(RESNET_16, teacher) == [(0, 2), (2, 3), (4, 4)]


def test_pairing_without_a_shared_size_names_both_models_shapes():
    vit = [(192, 14, 14)] * 3
    with pytest.raises(ValueError, match="cannot pair") as info:
        pair_stages(RESNET_16, vit, "resnet10t", "vit_tiny")
    message = str(info.value)
    assert "resnet10t has [64x8x8, 64x4x4, 128x2x2, 256x1x1, 512x1x1]" in message
    assert "vit_tiny has [192x14x14, 192x14x14, 192x14x14]" in message and "\n" not in message


def test_real_timm_stages_pair_by_size():
    student = create_model(ModelSpec("test_resnet"), CLASSES, 1, noised=True)
    teacher = create_model(ModelSpec("resnet10t"), CLASSES, 1, noised=False)
    s, t = stage_shapes(student, 1, SIZE), stage_shapes(teacher, 1, SIZE)
    assert s == [(32, 8, 8), (32, 4, 4), (48, 2, 2), (192, 1, 1), (96, 1, 1)]
    assert t == RESNET_16
    pairs = pair_stages(s, t)
    assert pairs == [(0, 0), (1, 1), (2, 2), (4, 4)]
    assert term_pairs("fitnet", pairs, s, t) == [(2, 2)]  # the middle pair: one hint, as in the paper
    assert term_pairs("at", pairs, s, t) == pairs
    with pytest.raises(ValueError, match="fsp: FSP matrices need equal channels"):
        term_pairs("fsp", pairs, s, t)
    assert student.training  # probing shapes leaves the mode as it was


# ---------------------------------------------------------------- every loss trains


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A frozen test_resnet teacher saved as a round's model folder (random weights are enough to imitate)."""
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(123)
    model = create_model(ModelSpec("test_resnet"), CLASSES, 1, noised=False)
    save_model(model, out, model_card(ModelSpec("test_resnet"), CLASSES, 1, SIZE, MEAN, STD))
    return out


@pytest.mark.parametrize("name", list(DISTILL_LOSSES))
def test_each_registered_loss_trains_a_tiny_student(name, teacher_dir):
    torch.manual_seed(0)
    teacher = OnlineTeacher(teacher_dir, torch.device("cpu"), features=True) if name != "dml" else None
    student = create_model(ModelSpec("test_resnet"), CLASSES, 1, noised=True)
    term = DistillTermConfig(name, temperature=4.0 if name == "kd" else 1.0)
    model = build_distill(student, ModelSpec("test_resnet"), (term,), "fixed", CLASSES, 1, SIZE, teacher).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    values = []
    for _ in range(12):
        _, _, loss, parts = model(x, teacher(x) if teacher else None)
        values.append(parts[f"loss_{name}"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < 0.9 * values[0], values
    if teacher is not None:
        assert all(p.grad is None for p in teacher.model.parameters())


def test_uncertainty_log_variances_receive_gradients_and_move(teacher_dir):
    torch.manual_seed(0)
    teacher = OnlineTeacher(teacher_dir, torch.device("cpu"), features=True)
    student = create_model(ModelSpec("test_resnet"), CLASSES, 1, noised=True)
    terms = (DistillTermConfig("kd", 1.0, 4.0), DistillTermConfig("at", 1000.0), DistillTermConfig("dml"))
    model = build_distill(student, ModelSpec("test_resnet"), terms, "uncertainty", CLASSES, 1, SIZE, teacher)
    log_vars = model.objective.log_vars
    start = log_vars.detach().clone()
    assert any(p is log_vars for p in model.parameters()), "the optimizer must see the log-variances"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 1, SIZE, SIZE)
    _, _, loss, _ = model(x, teacher(x))
    loss.backward()
    assert log_vars.grad is not None and torch.isfinite(log_vars.grad).all() and (log_vars.grad != 0).all()
    optimizer.step()
    assert (log_vars.detach() != start).all()


# ---------------------------------------------------------------- the loader's two views


def _labeled_shards(digits_root: Path) -> list[str]:
    return [str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))]


def test_the_stream_yields_the_clean_view_of_the_same_images_row_for_row(digits_root):
    clean = clean_transform(SIZE, MEAN, STD)
    shards = _labeled_shards(digits_root)
    lookup = collections.defaultdict(set)
    for shard in shards:
        for sample in iter_raw_samples(shard):
            lookup[clean(decode_image(image_field(sample), 1)).numpy().tobytes()].add(parse_label(sample, CLASSES))

    def shifted(image):  # a deterministic stand-in for RandAugment, so the views can be matched exactly
        return clean(image) + 1.0

    stream = iter(MixedStream(shards, [], 6, 0, CLASSES, 1, shifted, seed=0, clean_transform=clean))
    for _ in range(3):
        batch = next(stream)
        assert batch["x"].shape == batch["x_clean"].shape == (6, 1, SIZE, SIZE)
        torch.testing.assert_close(batch["x"], batch["x_clean"] + 1.0)
        for xc, y in zip(batch["x_clean"], batch["y"].tolist(), strict=True):
            assert y in lookup[xc.numpy().tobytes()], "the clean view is not a clean image of the row's label"
    assert "x_clean" not in next(iter(MixedStream(shards, [], 2, 0, CLASSES, 1, clean, seed=0)))


# ---------------------------------------------------------------- online mode through train_model


class RecordingTeacher(OnlineTeacher):
    """Records what the first layer of the teacher sees: its input, grad mode and train/eval mode."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTeacher.instance = self
        self.before = {k: v.clone() for k, v in self.model.state_dict().items()}

        def hook(module, inputs):
            RecordingTeacher.seen.append((inputs[0].detach().clone(), torch.is_grad_enabled(), module.training))

        self.model.conv1.register_forward_pre_hook(hook)


class StudentHooks(LocalHooks):
    def prepare(self, model):
        self.model, self.student_inputs = model, []
        model.module.conv1.register_forward_pre_hook(lambda m, i: self.student_inputs.append(i[0].detach().clone()))
        self.aux_at_start = {k: v.clone() for k, v in model.aux.state_dict().items()}
        return model


def _online_plan(digits_root: Path, tmp: Path, teacher_dir: Path, epochs: int) -> TrainPlan:
    terms = (DistillTermConfig("kd", 1.0, 4.0), DistillTermConfig("at", 1000.0), DistillTermConfig("dml"))
    cfg = TrainConfig(
        epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0, loader_workers=0, checkpoint_every=1,
        distill=terms, distill_weighting="uncertainty", online_teacher=True,
    )  # fmt: skip
    return TrainPlan(
        spec=ModelSpec("test_resnet", drop_rate=0.2, randaug_n=2, randaug_m=9),
        cfg=cfg,
        num_classes=CLASSES,
        channels=1,
        image_size=SIZE,
        mean=MEAN,
        std=STD,
        labeled=tuple(_labeled_shards(digits_root)),
        pseudo=(),
        labeled_count=100,
        pseudo_count=0,
        metrics_path=str(tmp / "metrics.jsonl"),
        teacher_dir=str(teacher_dir),
    )


def test_online_teacher_sees_the_clean_view_in_eval_mode_without_grad(digits_root, teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("stages.train.OnlineTeacher", RecordingTeacher)
    RecordingTeacher.seen = []
    hooks = StudentHooks(tmp_path / "ckpt")
    train_model(_online_plan(digits_root, tmp_path, teacher_dir, epochs=1), hooks)
    teacher = RecordingTeacher.instance
    probe, *steps = RecordingTeacher.seen  # first the stage-shape probe (2 zero images), then the training steps
    assert probe[0].shape[0] == 2 and not probe[0].any()
    RecordingTeacher.seen = steps
    assert len(steps) == 7  # one teacher pass per step: ceil(100 / 16)
    assert all(not grad and not training for _, grad, training in RecordingTeacher.seen)
    assert teacher.model.drop_rate == 0.0 and not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, teacher.before[name]), f"the teacher changed: {name}"
    # every teacher row is a clean labeled image; the student saw the same rows RandAugmented
    clean = clean_transform(SIZE, MEAN, STD)
    images = {
        clean(decode_image(image_field(s), 1)).numpy().tobytes()
        for shard in _labeled_shards(digits_root)
        for s in iter_raw_samples(shard)
    }
    for (x_teacher, _, _), x_student in zip(RecordingTeacher.seen, hooks.student_inputs, strict=True):
        assert all(row.numpy().tobytes() in images for row in x_teacher)
        assert x_student.shape == x_teacher.shape and not torch.equal(x_student, x_teacher)
    # the learnable parts moved and were checkpointed beside the model
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_kd", "loss_at", "loss_dml", "loss_distill", "loss_peer", "weight_kd"} <= set(row)
    saved = load_file(tmp_path / "ckpt" / "epoch-0001" / "aux.safetensors")
    assert {"objective.log_vars", "peer.fc.weight"} <= set(saved)
    assert not torch.equal(saved["objective.log_vars"], hooks.aux_at_start["objective.log_vars"])

    # a resume restores the learnable parts too
    resumed = StudentHooks(tmp_path / "ckpt")
    train_model(_online_plan(digits_root, tmp_path, teacher_dir, epochs=2), resumed)
    for name, value in saved.items():
        assert torch.equal(resumed.aux_at_start[name], value), name


def test_online_mode_without_a_teacher_folder_says_what_is_missing(digits_root, teacher_dir, tmp_path):
    plan = _online_plan(digits_root, tmp_path, teacher_dir, epochs=1)
    import dataclasses

    with pytest.raises(ValueError, match="TrainPlan.teacher_dir"):
        train_model(dataclasses.replace(plan, teacher_dir=""), LocalHooks(tmp_path / "ckpt"))


# ---------------------------------------------------------------- config


def _refused(*overrides: str, tree: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides), base=tree or tiny_tree(Path("/data/digits"), Path("/tmp/runs")))
    assert "\n" not in str(info.value)
    return str(info.value)


def _refused_before_work(*overrides: str, tree: dict) -> str:
    """The checks that build models: not at load (a config loads without torch), but before any work
    (``check_models``, from the run's preflight and from ``submit``)."""
    cfg = load_config(None, list(overrides), base=tree)
    with pytest.raises(ConfigError) as info:
        check_models(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_an_unknown_loss_name_lists_the_allowed_ones():
    message = _refused("student.distill=[{name: hinton}]")
    assert message == (
        "config.student.distill[0].name: unknown distillation loss 'hinton'; allowed: kd, dml, fitnet, at, sp, fsp"
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["student.distill=[{name: kd}]"], "kd read the teacher's outputs; set online_teacher: true"),
        (["student.online_teacher=true"], "no distill term reads the teacher"),
        (["student.distill=[{name: dml}, {name: dml}]"], "dml listed more than once"),
        (["student.distill=[{name: at, temperature: 4}]", "student.online_teacher=true"], "only kd and dml"),
        (["student.distill=[{name: kd, weight: -1}]", "student.online_teacher=true"], "weight: must be >= 0"),
        (["student.distill=[{name: dml, weight: 0}]", "student.distill_weighting=uncertainty"], "weights must be > 0"),
        (["student.distill_weighting=learned"], "distill_weighting: must be one of fixed, uncertainty"),
        (["teacher.distill=[{name: dml}]"], "config.teacher.distill: round 0 has no earlier model"),
        (["ladder_mode=shrink"], "ladder_mode: must be one of any, expand, compress"),
    ],
)
def test_distill_config_mistakes_are_one_line_errors(overrides, expected):
    assert expected in _refused(*overrides)


def test_a_compress_ladder_that_grows_is_refused_and_vice_versa():
    tree = tiny_tree(Path("/data/digits"), Path("/tmp/runs"))
    tree["ladder"] = [{"model": "test_resnet"}, {"model": "resnet10t"}]
    message = _refused_before_work("ladder_mode=compress", tree=tree)
    assert message.startswith("config.ladder_mode: the compress ladder grows at ladder[1]: resnet10t has 4,927,186")
    check_models(load_config(None, ["ladder_mode=expand"], base=tree))
    tree["ladder"].reverse()
    assert "the expand ladder shrinks at ladder[1]: test_resnet" in _refused_before_work(
        "ladder_mode=expand", tree=tree
    )
    check_models(load_config(None, ["ladder_mode=compress"], base=tree))


def test_feature_losses_on_unpairable_rungs_are_refused_before_any_work():
    tree = tiny_tree(Path("/data/digits"), Path("/tmp/runs"))
    tree["ladder"] = [{"model": "resnet10t"}, {"model": "test_resnet"}]
    message = _refused_before_work("student.distill=[{name: fsp}]", "student.online_teacher=true", tree=tree)
    assert message.startswith("config.student.distill: round 1, resnet10t teaching test_resnet: fsp:")
    cfg = load_config(None, ["student.distill=[{name: at}, {name: sp}]", "student.online_teacher=true"], base=tree)
    check_models(cfg)
    assert [t.name for t in cfg.student.distill] == ["at", "sp"]


def test_the_compress_config_shrinks_and_distils_online():
    cfg = load_config(ROOT / "configs" / "digits-compress.yaml")
    assert cfg.ladder_mode == "compress" and [s.model for s in cfg.ladder] == ["resnet18", "resnet10t"]
    assert cfg.student.online_teacher and [(t.name, t.temperature) for t in cfg.student.distill] == [("kd", 4.0)]
    default = load_config(ROOT / "configs" / "digits.yaml")
    assert default.ladder_mode == "expand" and default.student.distill == () and not default.student.online_teacher
