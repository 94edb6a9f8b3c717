"""Self-supervised pretraining (issue 31): the maths (NT-Xent golden values, the views, the length rule), the config
(the auto rule, bad values), the stage in this process (it writes the encoder, the teacher starts from it) and a
pretraining killed mid-run that resumes from its checkpoint. No Ray needed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.plan import round_stages, select_config
from pipeline.rounds import preflight, run_stage
from stages.core.errors import ConfigError, DataError
from stages.core.hooks import LocalHooks
from stages.core.stage import InProcess, StageContext
from stages.maths.contrastive import ViewConfig, natural_views, nt_xent_loss, pretrain_steps, two_views
from stages.models.factory import ModelSpec, create_model
from stages.models.pretrained import load_encoder
from stages.pretrain import PretrainConfig
from stages.storage.artifacts import RoundManifest
from stages.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
# A pretraining of a few steps, in this process (seconds)
TINY = (
    "pretrain.enabled=on",
    "pretrain.min_steps=4",
    "pretrain.max_steps=4",
    "pretrain.batch_size=16",
    "pretrain.checkpoint_every=2",
    "pretrain.log_every=2",
    "pretrain.loader_workers=0",
    "resources.executor=local",
    "resources.torch_threads=1",  # 2 threads on the shared 2-core machine ran a step ~9x slower than 1
)


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_nt_xent_by_hand(temperature):
    """Pairs (e1, e1) and (e2, e2): each row's partner has similarity 1/T, the two others 0, so every row's loss is
    -log(e^(1/T) / (2 + e^(1/T)))."""
    z = torch.eye(2)
    expected = math.log(2 + math.exp(1 / temperature)) - 1 / temperature
    assert nt_xent_loss(z, z.clone(), temperature).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_is_scale_free_and_its_pairs_orderless():
    z1, z2 = torch.tensor([[3.0, 4.0], [1.0, -2.0]]), torch.tensor([[0.5, 1.0], [-1.0, 0.0]])
    base = nt_xent_loss(z1, z2, 0.3)
    assert nt_xent_loss(10 * z1, 0.1 * z2, 0.3).item() == pytest.approx(base.item(), abs=1e-6)
    assert nt_xent_loss(z1.flip(0), z2.flip(0), 0.3).item() == pytest.approx(base.item(), abs=1e-6)
    assert nt_xent_loss(z2, z1, 0.3).item() == pytest.approx(base.item(), abs=1e-6)


@pytest.mark.parametrize("temperature, golden", [(0.2, 4.565592464207467), (0.5, 2.3532456137947415)])
def test_nt_xent_equals_lightlys_ntxentloss(temperature, golden):
    """Golden values from lightly 1.6.0's ``NTXentLoss(temperature)`` on these inputs (float64)."""
    z = torch.arange(24, dtype=torch.float64).reshape(6, 4)
    z1, z2 = torch.sin(z[:3] * 0.7 + 0.3), torch.cos(z[3:] * 1.3 - 0.2)
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(golden, abs=1e-5)


# ---------------------------------------------------------------- views


def _images(n: int = 8, channels: int = 1, size: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.zeros(n, channels, size, size)
    x[:, :, 4:12, 3:7] = torch.rand(n, channels, 1, 1) * 0.5 + 0.5  # a bright bar on black, off centre
    return x


def test_two_views_differ_from_each_other_and_keep_shape_dtype_and_range():
    x = _images()
    v1, v2 = two_views(x, ViewConfig(), torch.Generator().manual_seed(1))
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == x.dtype and 0 <= v.min() and v.max() <= 1
        assert not torch.equal(v, x)
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every image's two views differ
    again = two_views(x, ViewConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)  # the generator decides them
    half = two_views(x.half(), ViewConfig(), torch.Generator().manual_seed(1))[0]
    assert half.dtype == torch.float16


def test_without_crop_rotation_shear_or_jitter_a_view_is_the_image_and_natural_flips():
    x = _images(16, channels=3)
    still = ViewConfig(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate=0, shear=0, brightness=0, contrast=0)
    assert torch.allclose(two_views(x, still)[0], x, atol=1e-5)  # digits: never mirrored
    flipped = natural_views(still, saturation=0.0)
    v = two_views(x, flipped, torch.Generator().manual_seed(0))[0]
    same = [torch.allclose(v[i], x[i], atol=1e-5) for i in range(16)]
    mirrored = [torch.allclose(v[i], x[i].flip(-1), atol=1e-5) for i in range(16)]
    assert all(a or b for a, b in zip(same, mirrored, strict=True)) and any(mirrored) and not all(mirrored)


# ---------------------------------------------------------------- the length rule


@pytest.mark.parametrize(
    "images, batch, passes, low, high, steps",
    [
        (1337, 128, 60, 300, 5000, 627),  # digits(-hard): ceil(60 x 1337 / 128)
        (100, 128, 60, 300, 5000, 300),  # a tiny set: raised to min_steps
        (1_000_000, 128, 60, 300, 5000, 5000),  # a large one: cut to max_steps
        (1_000_000, 128, 60, 300, 0, 468_750),  # no cap
        (1337, 256, 60, 300, 5000, 314),  # two workers of 128: half the steps
    ],
)
def test_length_rule(images, batch, passes, low, high, steps):
    assert pretrain_steps(images, batch, passes, low, high) == steps


# ---------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "enabled, counts, source, on",
    [
        ("auto", [2] * 10, "", True),
        ("auto", [5] + [10] * 9, "", True),  # the smallest class decides: 5 <= 5
        ("auto", [6] * 10, "", False),
        ("auto", [2] * 10, "teacher.init x.safetensors", False),  # a given start is never pretrained over
        ("on", [10] * 10, "", True),
        ("off", [1] * 10, "", False),
    ],
)
def test_the_auto_rule(enabled, counts, source, on):
    decision = PretrainConfig(enabled=enabled).decide(counts, source)
    assert decision["on"] is on and decision["smallest_class"] == min(counts) and decision["reason"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.enabled=maybe", "config.pretrain.enabled: must be one of auto, on, off, got 'maybe'"),
        ("pretrain.temperature=0", "config.pretrain.temperature: must be > 0, got 0.0"),
        ("pretrain.batch_size=1", "config.pretrain.batch_size: must be >= 2, got 1"),
        ("pretrain.crop_area=[0.8, 0.5]", "config.pretrain.crop_area: two fractions of the image"),
        ("pretrain.min_steps=600|pretrain.max_steps=500", "config.pretrain.min_steps: 600 is above max_steps 500"),
        ("pretrain.method=byol", "config.pretrain.method: must be one of simclr, got 'byol'"),
        ("pretrain.enabled=on|teacher.init=w.safetensors", "config.pretrain.enabled: on, but round 0 starts from"),
        (
            "pretrain.init_students=true|student.init_from_teacher=true",
            "config.pretrain.init_students: students cannot start from both",
        ),
        ("pretrain.passes=0", "config.pretrain.passes: must be > 0, got 0.0"),
    ],
)
def test_bad_pretrain_settings_are_one_line(tiny_config, override, message):
    with pytest.raises(ConfigError) as info:
        tiny_config(*override.split("|"))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_yaml_on_and_off_are_the_words():
    """YAML 1.1 reads a bare on/off as a boolean; the config takes it as written."""
    assert PretrainConfig(enabled=True).enabled == "on" and PretrainConfig(enabled=False).enabled == "off"


# ---------------------------------------------------------------- the stage, in this process


class _Stop(Exception):
    pass


def test_the_stage_writes_the_encoder_and_the_teacher_starts_from_it(tiny_config, tmp_path):
    cfg = tiny_config(*TINY)
    run = preflight(cfg, progress=False)
    assert run.pretrain["on"] and run.pretrain["reason"] == "pretrain.enabled: on" and run.data.pretrain
    then = {"select_mode": "share", "select_align": "uniform", "students_from_encoder": True}
    assert run.pretrain["then"] == then  # what auto makes of a weak teacher, as run.json records it
    stage = [s for s in round_stages(cfg, 1, run.data, RunLayout(tmp_path / "x"), run.params[1]) if s.name == "select"]
    assert stage[0].cfg == select_config(cfg, 1, True) and (stage[0].cfg.mode, stage[0].cfg.align) == (
        "share",
        "uniform",
    )
    run.layout = RunLayout(tmp_path / "runs" / "pt")
    stages = round_stages(cfg, 0, run.data, run.layout, run.params[0])
    assert [s.name for s in stages] == ["pretrain", "train", "evaluate"]
    layout = run.layout.round(0)
    manifest = RoundManifest(layout.dir)
    ctx = StageContext(run.layout, layout, run.data, run.executor, manifest, run.config_digest, False)
    timings: dict = {}
    result, ran = run_stage(stages[0], ctx, timings)
    assert ran and result["steps"] == 4 and result["started_at_step"] == 0 and timings["pretrain"] > 0
    assert manifest.stage("pretrain")["seconds"] > 0
    encoder = load_file(layout.encoder)
    assert encoder and not any(k.startswith("fc.") for k in encoder)
    assert {f["path"] for f in manifest.stage("pretrain")["files"]} == {"encoder.safetensors"}
    assert run_stage(stages[0], ctx, timings) == (result, False)  # done from the same inputs: skipped

    captured: list[LocalHooks] = []

    class Capture(LocalHooks):
        def prepare(self, model):  # after any restore, before the first step
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            raise _Stop

    def hooks(root, device):
        captured.append(Capture(root, device))
        return captured[0]

    train = stages[1]
    assert train.plan.init_encoder == str(layout.encoder) and not train.plan.init_from
    assert train.inputs(ctx)["pretrain"] == manifest.digest("pretrain")  # a new encoder retrains the teacher
    with pytest.raises(_Stop):
        train.run(StageContext(run.layout, layout, run.data, InProcess(False, hooks), manifest, run.config_digest))
    got = captured[0].weights
    assert all(torch.equal(got[k], encoder[k]) for k in encoder)  # the whole backbone, BatchNorm statistics too
    assert set(got) - set(encoder) == {"fc.weight", "fc.bias"} and got["fc.weight"].abs().sum() > 0  # a fresh head

    student = round_stages(cfg, 1, run.data, run.layout, run.params[1])[2]  # auto: the students start from it too
    assert student.name == "train" and student.plan.init_encoder == str(layout.encoder)
    for setting, encoder_path in (("off", ""), ("false", ""), ("on", str(layout.encoder))):
        cfg_students = tiny_config(*TINY, f"pretrain.init_students={setting}")
        student = round_stages(cfg_students, 1, run.data, run.layout, run.params[1])[2]
        assert student.plan.init_encoder == encoder_path  # off (false in YAML): from scratch, as in the paper
    from_teacher = tiny_config(*TINY, "student.init_from_teacher=true")  # auto yields to the teacher's weights
    student = round_stages(from_teacher, 1, run.data, run.layout, run.params[1])[2]
    assert not student.plan.init_encoder and student.plan.init_weights


def test_students_start_from_teacher_init_only_under_init_students(tiny_config, tmp_path):
    """An encoder given as ``teacher.init`` (bench/suggest.py's arms: the base run's) starts the students too when
    ``pretrain.init_students: on`` asks for it, and only then."""
    from pipeline.plan import plan_for

    weights = tmp_path / "encoder.safetensors"
    given = ("pretrain.enabled=off", f"teacher.init={weights}")
    assert plan_for(tiny_config(*given), 0, [], 0).init_from == str(weights)
    assert plan_for(tiny_config(*given), 1, [], 0).init_from == ""  # auto: nothing was pretrained here
    students = tiny_config(*given, "pretrain.init_students=true")
    assert plan_for(students, 1, [], 0).init_from == str(weights)
    assert plan_for(students, 1, [], 0, run=RunLayout(tmp_path / "run")).init_encoder == ""  # nothing pretrained


def test_the_digits_default_does_not_pretrain(tiny_config):
    run = preflight(tiny_config("resources.executor=local"), progress=False)
    assert not run.data.pretrain and run.pretrain["smallest_class"] == 10 and "more than" in run.pretrain["reason"]
    assert run.pretrain["then"] == {"select_mode": "balanced", "select_align": "none", "students_from_encoder": False}
    assert [s.name for s in round_stages(run.cfg, 0, run.data, RunLayout("/nowhere"), 0)] == ["train", "evaluate"]


def test_an_encoder_of_another_model_is_one_line(tmp_path):
    other = create_model(ModelSpec("resnet10t"), 0, 3, noised=False).state_dict()
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(DataError) as info:
        load_encoder(create_model(ModelSpec("resnet10t"), 10, 1, noised=True), str(path))  # 1 channel, not 3
    assert str(info.value).startswith(f"encoder {path} does not fit") and "\n" not in str(info.value)
    save_file({k: v.contiguous() for k, v in list(other.items())[2:]}, str(path))
    with pytest.raises(DataError, match="missing"):
        load_encoder(create_model(ModelSpec("resnet10t"), 10, 3, noised=True), str(path))


# ---------------------------------------------------------------- killed and resumed


def test_local_checkpoints_restore_by_number_not_by_name(tmp_path):
    """A run of more than 9,999 checkpoints: epoch-10000 is later than epoch-9999; a cut-off copy is never taken."""
    for name in ("epoch-0002", "epoch-9999", "epoch-10000", "epoch-10001.tmp"):
        (tmp_path / name).mkdir()
    assert LocalHooks(tmp_path).restore() == tmp_path / "epoch-10000"
    assert LocalHooks(tmp_path / "none").restore() is None


@pytest.mark.slow
def test_a_killed_pretraining_resumes_from_its_checkpoint(digits_root, tmp_path):
    """The driver is SIGKILLed after two pretraining checkpoints; the same command again resumes from the last one
    (not step 0), then trains the teacher from the encoder and finishes the run."""
    from tests.conftest import tiny_tree

    tree = tiny_tree(digits_root, tmp_path / "runs")
    tree["pretrain"] = {
        "enabled": "on",
        "min_steps": 12,
        "max_steps": 12,
        "batch_size": 16,
        "checkpoint_every": 3,
        "log_every": 3,
        "loader_workers": 0,
    }
    tree["teacher"]["epochs"] = 1
    tree["select"]["per_class"] = 3  # a student of one or two steps: the round after is not what this test is about
    tree["robustness"] = {"corruptions": []}
    tree["resources"] |= {"executor": "local", "torch_threads": 1}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "pipeline", "iterate", "--config", str(config), "--rounds", "1", "--run", "r"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    checkpoints = tmp_path / "runs" / "r" / "ray_train"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(checkpoints.glob("round-000-pretrain-*/epoch-*[0-9]"))) < 2:
        assert first.poll() is None, "the first driver ended early: " + (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.02)
    at_kill = sorted(p.name for p in checkpoints.glob("round-000-pretrain-*/epoch-*[0-9]"))
    first.send_signal(signal.SIGKILL)
    first.wait()
    print(f"\ninjected: SIGKILL of the driver after pretraining checkpoints {at_kill}")
    assert len(at_kill) >= 2
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    pretrain = RoundManifest(run / "round-000").stage("pretrain")
    started = pretrain["result"]["started_at_step"]
    print(f"observed: the second driver resumed the pretraining at step {started} of {pretrain['result']['steps']}")
    assert started >= 3 * len(at_kill) and pretrain["result"]["steps"] == 12, "pretraining restarted from step 0"
    assert "pretrain: resumed from" in second.stdout + second.stderr
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["pretrain"]["on"]
    assert status["rounds"]["0"]["pretrain"] > 0
    metrics = json.loads((run / "round-000" / "metrics.json").read_text())
    assert metrics["stage_seconds"]["pretrain"] == pretrain["seconds"]
    train = RoundManifest(run / "round-000").stage("train")
    assert train["inputs"]["pretrain"] == pretrain["digest"]
    assert "pretrain s" in (run / "report.html").read_text()
