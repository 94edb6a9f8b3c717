"""stages/data/decoders.py: every decoding backend against the ``pil`` reference (which is ``card_transform`` before
``ToTensor``), on tiny generated images: JPEG (colour, grayscale, CMYK, with an EXIF rotation), PNG (RGB, RGBA),
corrupt and truncated bytes, unknown names and missing libraries. A backend whose library is not installed is
skipped (``pytest.importorskip``); ``bench/decode.py`` measures their speed."""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from stages.core.errors import BadSample
from stages.data.decoders import (
    DECODERS,
    Backend,
    decode_pil,
    decode_to,
    get_decoder,
    plan,
    resolve,
    short_side_for,
)
from stages.data.shards import decode_image

SIZE = 32
SHORT = short_side_for(SIZE, 0.875)  # 36
SETTINGS = {"crop": (SHORT, "bilinear"), "crop-bicubic": (SHORT, "bicubic"), "squash": (None, "bilinear")}
# torchvision.io's decoders warn that they are deprecated (since torchvision 0.29) on every call
BACKENDS = [
    pytest.param(n, marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")) if n == "torchvision" else n
    for n in DECODERS
]


def _need(name: str) -> None:
    for module in DECODERS[name].modules:
        pytest.importorskip(module)


@functools.cache
def _photo(seed: int, width: int, height: int) -> np.ndarray:
    """Gradient, a few flat rectangles (edges) and grain: enough structure that a wrong crop or kernel shows."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = 40 + 150 * (0.6 * x + 0.4 * y) * rng.uniform(0.5, 1, 3).astype(np.float32)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 4), rng.integers(0, height - 4)
        pixels[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 4, (height, width, 1))
    out = np.clip(pixels, 0, 255).astype(np.uint8)
    out.setflags(write=False)  # cached: shared by the tests
    return out


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba(pixels: np.ndarray) -> np.ndarray:
    alpha = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
    alpha[: pixels.shape[0] // 2] = 0  # the top half transparent: decode_image puts it on black
    return np.concatenate([pixels, alpha], axis=2)


KEY = (10, 200, 30)  # a PNG's transparent colour (tRNS): decode_image puts black there


def _keyed(pixels: np.ndarray) -> np.ndarray:
    out = pixels.copy()
    out[: pixels.shape[0] // 2] = KEY
    return out


def _exif_rotated(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": decode_image ignores it, so must every backend
    return _encode(pixels, "JPEG", quality=90, exif=exif)


SOURCES = {
    "jpeg": lambda p: _encode(p, "JPEG", quality=90),
    "jpeg-gray": lambda p: _encode(p, "JPEG", "L", quality=90),
    "jpeg-cmyk": lambda p: _encode(p, "JPEG", "CMYK", quality=90),
    "jpeg-exif-rotated": _exif_rotated,
    "jpeg-progressive": lambda p: _encode(p, "JPEG", quality=90, progressive=True),
    "png": lambda p: _encode(p, "PNG"),
    "png-rgba": lambda p: _encode(_rgba(p), "PNG"),
    "png-transparent-colour": lambda p: _encode(_keyed(p), "PNG", transparency=KEY),
}


# Backends that decode a large enough JPEG at a fraction of its size (libjpeg's scaled IDCT, from this ratio of the
# image to the resize on): a coarser filter than the reference's, and on images this small a coarser result, so their
# bound is looser there (bench/decode.py measures the loss on photo-size images: about half a grey level)
# OpenCV shrinks with INTER_AREA (a box average), not the reference's triangle filter: looser everywhere.
MIN_SCALE = {"pil-draft": 2, "pil-torch": 2, "torchcodec": 2, "opencv": 0, "simplejpeg": 8 / 7}
STRICT, LOOSE = (1.0, 40.0), (2.5, 30.0)  # mean absolute difference at most, PSNR (dB) at least


def _bound(name: str, width: int, height: int, short_side: int | None) -> tuple[float, float]:
    geo = plan(width, height, SIZE, short_side)
    ratio = min(width / geo.resized[0], height / geo.resized[1])
    return LOOSE if ratio >= MIN_SCALE.get(name, float("inf")) else STRICT


def _close(got: np.ndarray, want: np.ndarray, bound: tuple[float, float] = STRICT) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8 and got.flags.c_contiguous and got.flags.writeable
    diff = got.astype(np.float64) - want.astype(np.float64)
    assert np.abs(diff).mean() <= bound[0]
    mse = float(np.mean(diff**2))
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= bound[1]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("width, height", [(120, 90), (90, 120), (400, 300)])  # 400x300: draft/reduced decodes
def test_every_backend_matches_pil_on_a_colour_jpeg(name, setting, width, height):
    _need(name)
    short_side, interpolation = SETTINGS[setting]
    data = SOURCES["jpeg"](_photo(width, width, height))
    bound = _bound(name, width, height, short_side)
    for channels in (3, 1):
        want = decode_pil(data, SIZE, channels, short_side, interpolation)
        assert want.shape == (SIZE, SIZE, channels)
        _close(decode_to(data, SIZE, channels, short_side, interpolation, backend=name), want, bound)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("source", [s for s in SOURCES if s != "jpeg"])
def test_every_backend_matches_pil_on_other_formats_and_modes(name, source):
    _need(name)
    data = SOURCES[source](_photo(7, 80, 60))
    for channels in (3, 1):
        want = decode_pil(data, SIZE, channels, SHORT)
        _close(decode_to(data, SIZE, channels, SHORT, backend=name), want, _bound(name, 80, 60, SHORT))


def test_the_bounds_catch_a_wrong_crop_and_swapped_channels():
    data = SOURCES["jpeg"](_photo(400, 400, 300))
    want = decode_pil(data, SIZE, 3, SHORT)
    with pytest.raises(AssertionError):
        _close(decode_pil(data, SIZE, 3, None), want, LOOSE)  # squashed, not cropped
    with pytest.raises(AssertionError):
        _close(np.ascontiguousarray(want[..., ::-1]), want, LOOSE)  # BGR


def test_png_and_exif_cases_really_differ_from_a_naive_decode():
    """The checks above can fail: transparency is composited on black, an EXIF rotation is not applied."""
    pixels = _photo(7, 80, 60)
    rgba = decode_pil(SOURCES["png-rgba"](pixels), SIZE, 3, SHORT)
    assert rgba[: SIZE // 4].max() == 0  # the transparent top is black, not the colour under it
    keyed = decode_pil(SOURCES["png-transparent-colour"](pixels), SIZE, 3, SHORT)
    assert keyed[: SIZE // 4].max() == 0  # so is the transparent colour's
    rotated = decode_pil(SOURCES["jpeg-exif-rotated"](pixels), SIZE, 3, None)
    plain = decode_pil(SOURCES["jpeg"](pixels), SIZE, 3, None)
    assert np.abs(rotated.astype(int) - plain).mean() < 1  # the same pixels: the EXIF tag was ignored


@pytest.mark.parametrize(
    "card",
    [
        {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"},
        {"input_size": [1, SIZE, SIZE], "mean": [0.5], "std": [0.5], "interpolation": "bilinear"},
        {
            "input_size": [3, SIZE, SIZE],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic",
            "augment": "natural",
            "crop_pct": 0.875,
        },
    ],
    ids=["digits-rgb", "digits-gray", "natural-bicubic"],
)
def test_pil_is_the_pipelines_transform_before_to_tensor(card):
    from stages.models.transforms import card_transform  # timm: imported here, the other tests start faster

    channels = card["input_size"][0]
    data = SOURCES["jpeg"](_photo(3, 120, 90))
    natural = card.get("augment") == "natural"
    short_side = short_side_for(SIZE, card["crop_pct"]) if natural else None
    got = decode_pil(data, SIZE, channels, short_side, card["interpolation"])
    mean, std = torch.tensor(card["mean"]).view(-1, 1, 1), torch.tensor(card["std"]).view(-1, 1, 1)
    as_tensor = (torch.from_numpy(got).permute(2, 0, 1).float() / 255 - mean) / std
    want = card_transform(card)(decode_image(data, channels))
    assert torch.allclose(as_tensor, want, atol=1e-5)


def test_plan_is_torchvisions_resize_and_centre_crop():
    geo = plan(500, 375, 224, 256)
    assert geo.resized == (341, 256) and (geo.left, geo.top) == (58, 16)  # round(58.5) is 58: half to even
    assert plan(375, 500, 224, 256).resized == (256, 341)
    assert plan(500, 375, 224, None).resized == (224, 224) and plan(500, 375, 224, None).box == (0, 0, 500, 375)
    left, top, right, bottom = geo.box
    assert right - left == pytest.approx(224 * 500 / 341) and bottom - top == pytest.approx(224 * 375 / 256)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 64, "truncated"],
    ids=["empty", "text", "jpeg-header-only", "truncated-jpeg"],
)
def test_undecodable_bytes_raise_bad_sample(name, data):
    _need(name)
    if data == "truncated":
        whole = SOURCES["jpeg"](_photo(1, 120, 90))
        data = whole[: len(whole) // 2]
    with pytest.raises(BadSample, match="undecodable"):
        decode_to(data, SIZE, 3, SHORT, backend=name)


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown decoder 'pil-fast'.*pil, pil-box"):
        get_decoder("pil-fast")
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_to(b"", SIZE, backend="opencv2")


def test_a_missing_library_falls_back_along_the_chain(monkeypatch, caplog):
    missing = Backend("fake", decode_pil, ("no_such_module_for_the_test",), fallback="fake2")
    also_missing = Backend("fake2", decode_pil, ("no_such_module_either",), fallback="pil-box")
    monkeypatch.setitem(DECODERS, "fake", missing)
    monkeypatch.setitem(DECODERS, "fake2", also_missing)
    with caplog.at_level(logging.WARNING, logger="stages.data.decoders"):
        assert resolve("fake") == "pil-box"
    assert "no_such_module_for_the_test" in caplog.text and "'pil-box'" in caplog.text
    assert resolve("pil") == "pil"


def test_bad_arguments_are_refused():
    data = SOURCES["jpeg"](_photo(1, 60, 40))
    with pytest.raises(ValueError, match="channels"):
        decode_to(data, SIZE, 2)
    with pytest.raises(ValueError, match="interpolation"):
        decode_to(data, SIZE, 3, SHORT, "nearest")
    with pytest.raises(ValueError, match="smaller than the crop"):
        decode_to(data, SIZE, 3, SIZE - 1)
