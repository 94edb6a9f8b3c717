"""Corrupted copies of the test set: every corruption is deterministic, keeps size and mode, grows with severity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.data.corruptions import CORRUPTIONS, RobustnessConfig, corrupt, corruption_metrics, variants
from stages.data.digits import split_digits


def corrupt_all(images, cfg):
    return {(n, s): [corrupt(im, n, s, cfg.seed, f"k{i}") for i, im in enumerate(images)] for n, s in variants(cfg)}


@pytest.fixture(scope="module")
def digits_images() -> list[Image.Image]:
    return [Image.fromarray(x, mode="L") for x in split_digits().test_x[:40]]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_deterministic_keeps_shape_and_grows_with_severity(name, digits_images):
    cfg = RobustnessConfig(corruptions=(name,), severities=(1, 3, 5))
    first, again = corrupt_all(digits_images, cfg), corrupt_all(digits_images, cfg)
    change = []
    for severity in (1, 3, 5):
        out = first[(name, severity)]
        assert [im.tobytes() for im in out] == [im.tobytes() for im in again[(name, severity)]]
        assert all(o.size == i.size and o.mode == i.mode for o, i in zip(out, digits_images, strict=True))
        pairs = zip(out, digits_images, strict=True)
        diff = [np.abs(np.asarray(o, float) - np.asarray(i, float)).mean() for o, i in pairs]
        change.append(float(np.mean(diff)))
    assert 0 < change[0] <= change[1] <= change[2], change


def test_noise_follows_the_key_not_the_position(digits_images):
    image = digits_images[0]
    a, b = corrupt(image, "gaussian_noise", 3, 0, "a"), corrupt(image, "gaussian_noise", 3, 0, "b")
    assert a.tobytes() == corrupt(image, "gaussian_noise", 3, 0, "a").tobytes()
    assert a.tobytes() != b.tobytes()
    assert a.tobytes() != corrupt(image, "gaussian_noise", 3, 1, "a").tobytes()  # the config's seed counts too


def test_rgb_images_are_corrupted_too():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), mode="RGB")
    for (name, _), out in corrupt_all([image], RobustnessConfig(severities=(2,))).items():
        assert out[0].mode == "RGB" and out[0].size == (32, 32), name


def test_corruption_metrics_means():
    got = corruption_metrics({("jpeg", 1): 0.9, ("jpeg", 3): 0.7, ("contrast", 1): 0.5, ("contrast", 3): 0.3})
    assert got["per_corruption"] == pytest.approx({"jpeg": 0.8, "contrast": 0.4})
    assert got["per_severity"] == {"jpeg": {"1": 0.9, "3": 0.7}, "contrast": {"1": 0.5, "3": 0.3}}
    assert got["mean"] == pytest.approx(0.6)
