"""stages/models/factory.py: contracts over every model in the default ladder, noise on/off, artifacts, early
refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.layers import DropPath

from stages.models.factory import ModelSpec, check_classifier, create_model, load_model, model_card, save_model

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _section(text: str, name: str):
    """One top-level section of a YAML file, parsed on its own.

    Only the ``ladder`` section is read here, so that these model contracts do not depend on the rest of the
    file parsing (tests/test_config.py loads the whole file).
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split("#")[0].rstrip() == f"{name}:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines))
    return yaml.safe_load("\n".join(lines[start:end]))[name]


# One entry per distinct model name, with the noise the config gives it (the first rung that names it).
LADDER = list({e["model"]: ModelSpec(**e) for e in reversed(_section(DEFAULT_CONFIG.read_text(), "ladder"))}.values())
NUM_CLASSES, CHANNELS, SIZE = 10, 1, 32  # the digits data: 10 classes, grayscale; 32 px as in the config


def _drop_path_probs(model: torch.nn.Module) -> list[float]:
    return [float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]


def _dropout_probs(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


@pytest.fixture(params=LADDER, ids=lambda s: s.model)
def spec(request) -> ModelSpec:
    return request.param


def test_the_default_ladder_has_noise_to_test():
    assert LADDER, "configs/digits.yaml has no ladder"
    assert all(s.drop_rate > 0 and s.drop_path_rate > 0 for s in LADDER)


def test_check_classifier_counts_parameters_and_outputs_logits(spec):
    count = check_classifier(spec, NUM_CLASSES, CHANNELS, SIZE)
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=False).eval()
    assert count == sum(p.numel() for p in model.parameters()) > 0
    with torch.inference_mode():
        assert model(torch.zeros(3, CHANNELS, SIZE, SIZE)).shape == (3, NUM_CLASSES)


def test_noised_model_has_the_configured_dropout_and_stochastic_depth(spec):
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=True)
    assert model.drop_rate == pytest.approx(spec.drop_rate)
    probs = _drop_path_probs(model)
    assert probs, "no DropPath module: stochastic depth is off"
    # timm decays the rate linearly with depth; the deepest block gets drop_path_rate itself
    assert max(probs) == pytest.approx(spec.drop_path_rate)


def test_un_noised_model_has_neither(spec):
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=False)
    assert getattr(model, "drop_rate", 0.0) == 0.0
    assert _drop_path_probs(model) == []
    assert all(p == 0.0 for p in _dropout_probs(model))


def test_noise_changes_train_mode_outputs_only_when_noised(spec):
    x = torch.randn(4, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for noised, should_differ in ((False, False), (True, True)):
        model = create_model(spec, NUM_CLASSES, CHANNELS, noised=noised).train()
        with torch.no_grad():
            a, b = model(x), model(x)
        assert (not torch.allclose(a, b)) == should_differ, f"noised={noised}"
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x)), "eval mode must be deterministic"


def test_save_load_round_trip_gives_identical_eval_outputs(spec, tmp_path):
    # A student is trained noised; the saved artifact must load un-noised with the same weights.
    torch.manual_seed(0)
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=True)
    with torch.no_grad():  # move BN statistics off their defaults so they are part of what is checked
        model.train()(torch.randn(8, CHANNELS, SIZE, SIZE))
    card = model_card(spec, NUM_CLASSES, CHANNELS, SIZE, (0.5,), (0.5,))
    save_model(model, tmp_path, card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded, loaded_card = load_model(tmp_path)
    assert loaded_card == json.loads(json.dumps(card))
    assert not loaded.training
    assert _drop_path_probs(loaded) == []
    x = torch.randn(2, CHANNELS, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_refuses_a_missing_weight(spec, tmp_path):
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=False)
    save_model(model, tmp_path, model_card(spec, NUM_CLASSES, CHANNELS, SIZE, (0.5,), (0.5,)))
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(tmp_path)


def test_load_refuses_weights_of_another_shape(spec, tmp_path):
    model = create_model(spec, NUM_CLASSES, CHANNELS, noised=False)
    card = model_card(spec, NUM_CLASSES, CHANNELS, SIZE, (0.5,), (0.5,))
    save_model(model, tmp_path, card)
    card["create"]["num_classes"] = NUM_CLASSES + 1
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(tmp_path)


def test_a_model_that_cannot_take_the_input_is_refused_by_name():
    # A ViT built for 224 px asserts on a 32 px input; the ladder check must turn that into one clear error.
    with pytest.raises(ValueError, match=r"ladder: vit_tiny_patch16_224 cannot classify 1x32x32") as info:
        check_classifier(ModelSpec("vit_tiny_patch16_224"), 10, 1, 32)
    assert "\n" not in str(info.value)


def test_an_unknown_model_name_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^model: unknown timm model 'resnet10x'"):
        ModelSpec("resnet10x")


def test_an_unknown_model_name_suggests_the_closest_names():
    with pytest.raises(ValueError, match=r"similar: .*\bresnet10t\b"):
        ModelSpec("resnet10x")


@pytest.mark.parametrize(
    "field, value",
    [("drop_rate", -0.1), ("drop_rate", 1.0), ("drop_path_rate", 1.5), ("randaug_n", -1), ("randaug_m", 11)],
)
def test_model_spec_refuses_out_of_range_noise(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        ModelSpec(**{field: value})


def test_model_spec_accepts_the_boundaries():
    ModelSpec(drop_rate=0.0, drop_path_rate=0.0, randaug_n=0, randaug_m=0)
    ModelSpec(randaug_m=10)
