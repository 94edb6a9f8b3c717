"""Bringing your own teacher (stages/models/pretrained.py): teacher.init weights reach the model before its first step,
the head re-initialised only when the class count differs; teacher.from_model is round 0 as it is. No Ray needed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.rounds import preflight, run_round
from stages.core.errors import DataError
from stages.core.hooks import LocalHooks
from stages.data.shards import load_labeled
from stages.evaluate import evaluate
from stages.models.factory import ModelSpec, create_model, load_model, model_card, save_model
from stages.models.pretrained import check_init
from stages.storage.artifacts import RoundManifest
from stages.storage.files import read_json, sha256_file
from stages.storage.layout import RunLayout
from stages.train import TrainConfig, TrainPlan, train_model

SPEC = ModelSpec("test_resnet", drop_rate=0.1, randaug_n=0)


class _Stop(Exception):
    pass


class _CaptureHooks(LocalHooks):
    """Records the weights the trainer hands to ``prepare`` (after any restore, before the first step), then stops."""

    def prepare(self, model):
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        raise _Stop


def _weights_at_first_step(tmp_path, init: str, num_classes: int) -> dict[str, torch.Tensor]:
    plan = TrainPlan(
        spec=SPEC,
        cfg=TrainConfig(epochs=1, batch_size=4, loader_workers=0),
        num_classes=num_classes,
        channels=3,
        image_size=16,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        labeled=("unused.tar",),
        pseudo=(),
        labeled_count=4,
        pseudo_count=0,
        metrics_path=str(tmp_path / "m.jsonl"),
        init_from=init,
    )
    hooks = _CaptureHooks(tmp_path / "ckpt")
    with pytest.raises(_Stop):
        train_model(plan, hooks)
    return hooks.weights


def _saved(tmp_path, num_classes: int, seed: int = 7) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(seed)
    state = create_model(SPEC, num_classes, 3, noised=False).state_dict()
    path = tmp_path / f"init-{num_classes}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state, str(path)


@pytest.mark.parametrize("file_classes, head", [(7, "re-initialised"), (10, "kept")])
def test_teacher_init_weights_are_the_models_before_its_first_step(tmp_path, file_classes, head):
    state, path = _saved(tmp_path, file_classes)
    assert check_init(SPEC, 10, 3, path)["head"] == head
    got = _weights_at_first_step(tmp_path, path, num_classes=10)
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(torch.equal(got[k], state[k]) for k in body)
    assert got["fc.weight"].shape == (10, state["fc.weight"].shape[1])
    if head == "kept":
        assert torch.equal(got["fc.weight"], state["fc.weight"]) and torch.equal(got["fc.bias"], state["fc.bias"])
    else:  # a fresh head, not zeros and not a slice of the file's
        assert got["fc.weight"].abs().sum() > 0 and not torch.equal(got["fc.weight"][:7], state["fc.weight"])
    fresh = _weights_at_first_step(tmp_path, "", num_classes=10)  # without init: timm's random start
    assert not torch.equal(fresh[body[0]], state[body[0]])


def test_a_headless_teacher_init_loads_with_a_fresh_head(tmp_path):
    """Weights without a classifier (a run's pretrained encoder, timm weights saved with ``num_classes=0``)."""
    torch.manual_seed(5)
    state = create_model(SPEC, 0, 3, noised=False).state_dict()
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert check_init(SPEC, 10, 3, str(path))["head"] == "re-initialised"
    got = _weights_at_first_step(tmp_path, str(path), num_classes=10)
    assert all(torch.equal(got[k], state[k]) for k in state) and got["fc.weight"].shape[0] == 10


def test_teacher_init_reads_timm_checkpoints_and_model_folders(tmp_path):
    state, _ = _saved(tmp_path, 10)
    ckpt = tmp_path / "ckpt.pth.tar"  # a timm train.py checkpoint: a dict with state_dict, DDP-prefixed keys
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    folder = tmp_path / "round-000"
    model = create_model(SPEC, 10, 3, noised=False)
    model.load_state_dict(state)
    save_model(model, folder, model_card(SPEC, 10, 3, 16, [0.5] * 3, [0.5] * 3))
    for source in (ckpt, folder):
        got = _weights_at_first_step(tmp_path, str(source), num_classes=10)
        assert all(torch.equal(got[k], state[k]) for k in state), source


def test_weights_of_another_model_or_no_weights_are_one_line(tmp_path):
    other = create_model(ModelSpec("resnet10t"), 10, 3, noised=False).state_dict()
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(DataError) as info:
        check_init(SPEC, 10, 3, str(path))
    assert "does not fit test_resnet" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a state dict"):
        check_init(SPEC, 10, 3, str(tmp_path / "junk.pth"))
    with pytest.raises(DataError, match="no file or folder"):
        check_init(SPEC, 10, 3, str(tmp_path / "missing.safetensors"))


def test_from_model_is_round_zero_evaluated_and_recorded_untrained(tiny_config, tmp_path):
    torch.manual_seed(3)
    source = tmp_path / "mine"
    model = create_model(ModelSpec("resnet10t"), 10, 1, noised=False)
    card = model_card(ModelSpec("resnet10t"), 10, 1, 16, [0.5], [0.5])
    save_model(model, source, card)
    cfg = tiny_config(f"teacher.from_model={source}")
    run = preflight(cfg, progress=False)
    run.layout = RunLayout(tmp_path / "runs" / "adopt")
    status: dict = {"rounds": {}}
    metrics = run_round(run, 0, status)  # no Ray: the digits are small, adopting and evaluating run in this process
    rdir = run.layout.round(0).dir
    assert (rdir / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert json.loads((rdir / "model.json").read_text())["adopted_from"] == str(source)
    fresh, fresh_card = load_model(source)
    test = load_labeled(run.data.test_shards, 10, 1)  # decoded here to check the stage's sidecars against memory
    assert metrics["test_top1"] == pytest.approx(evaluate(fresh, fresh_card, test)["test_top1"])
    assert metrics["evaluation"]["ran_as"] == "in-process" and set(metrics["evaluation"]["devices"]) == {"cpu"}
    assert read_json(rdir / "metrics.json")["classes"] == [str(c) for c in range(10)]
    train = RoundManifest(rdir).stage("train")
    assert train["inputs"]["teacher_from_model"] == sha256_file(source / "model.safetensors")
    assert "train_metrics.jsonl" not in {p.name for p in rdir.iterdir()}  # nothing was trained

    wrong = tmp_path / "wrong"
    save_model(create_model(ModelSpec("resnet10t"), 5, 1, noised=False), wrong, {**card, "num_classes": 5})
    with pytest.raises(DataError, match="classifies 5 classes"):
        preflight(tiny_config(f"teacher.from_model={wrong}"), progress=False)
