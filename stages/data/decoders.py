"""Image bytes to a model-sized ``uint8`` array, by one of several decoding backends (issue 27).

    from stages.data.decoders import decode_to
    pixels = decode_to(data, 224, 3, short_side=256)                      # (224, 224, 3) uint8, backend "pil"
    pixels = decode_to(data, 224, 3, short_side=256, backend="opencv")    # falls back when OpenCV is missing

Every backend does what ``stages.models.transforms.card_transform`` does to an image before ``ToTensor``: with
``short_side``, resize so that the shorter side is ``short_side`` (timm's ``natural`` evaluation transform asks for
``floor(size / crop_pct)``, 256 for 224) and take the centre ``size`` x ``size`` crop, as torchvision's ``Resize``
and ``CenterCrop`` compute them; with ``short_side=None``, squash the whole image to ``size`` x ``size`` (the
``digits`` transform). The result is a writable, C-contiguous HWC ``uint8`` array (``channels`` 1: ``(size, size,
1)``), before ``ToTensor`` and ``Normalize``.

- ``pil``: the reference, what the pipeline does today: ``stages.data.decode_image``, a full resize, then the crop.
- ``pil-box``: the same pixels, but only the crop's source region is resampled (``Image.resize(box=...)``).
- ``pil-draft``: ``Image.draft`` first, so that libjpeg's DCT scaling decodes a large JPEG at 1/2, 1/4 or 1/8 of its
  size when that is still at least the resize's size; then as ``pil-box``. No effect on ImageNet-size inputs.
- ``pil-reduce``: ``pil-box`` with ``reducing_gap=2``: Pillow first shrinks by the integer factor
  ``floor(scale / 2)`` (``Image.reduce``, a box filter) when that is at least 2, i.e. from 4x the output up.
- ``pil-torch``: Pillow's decoder (with ``draft`` as ``pil-draft``), torch's antialiased ``uint8`` resize (bilinear
  or bicubic; the whole image, then the crop).
- ``opencv``: ``cv2.imdecode`` (EXIF orientation ignored, as PIL does; ``IMREAD_REDUCED_*`` when the JPEG is at least
  twice the resize's size), ``cv2.resize`` with ``INTER_AREA`` when shrinking (area averaging, antialiased).
- ``simplejpeg``: libjpeg-turbo through simplejpeg (DCT scaling by ``min_width``/``min_height``), PIL's box resize.
- ``torchvision``: ``torchvision.io.decode_jpeg`` (deprecated since torchvision 0.29) and torch's uint8 resize.
- ``torchcodec``: ``torchcodec.decoders.decode_jpeg`` (CPU; needs no FFmpeg for images) and torch's uint8 resize;
  a JPEG at least twice the resize's size goes the ``pil-torch`` way (TorchCodec cannot decode at a smaller scale).

The non-Pillow decoders take JPEGs in YCbCr/RGB or grayscale only: PNG, WebP, CMYK JPEGs, a JPEG that lacks its
end marker (a truncated file, which libjpeg would pad with grey where Pillow refuses it), a JPEG with an EXIF
rotation (TorchCodec applies it, with no way to say no, where ``decode_image`` does not) and anything such a decoder
cannot read take the ``pil-box`` way, which decodes them as ``decode_image`` does or raises
``stages.data.BadSample``. A backend whose library is not installed is replaced by its ``fallback`` (``resolve``),
with one warning.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.errors import BadSample
from stages.data.shards import decode_image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Decode = Callable[..., np.ndarray]
INTERPOLATIONS = ("bilinear", "bicubic")
_PIL_FILTER = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
_JPEG_END = b"\xff\xd9"
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Geometry:
    """Where the output comes from: the image is resized to ``resized`` (width, height), then ``size`` x ``size``
    is cut at ``left``, ``top``; ``box`` is that crop in the source image's pixels (Pillow's ``box``)."""

    width: int
    height: int
    resized: tuple[int, int]
    left: int
    top: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        sx, sy = self.width / self.resized[0], self.height / self.resized[1]
        return (self.left * sx, self.top * sy, (self.left + self.size) * sx, (self.top + self.size) * sy)


def plan(width: int, height: int, size: int, short_side: int | None) -> Geometry:
    """The resize and crop torchvision's ``Resize(short_side)`` then ``CenterCrop(size)`` make of a ``width`` x
    ``height`` image (``short_side=None``: ``Resize((size, size))``, no crop)."""
    if short_side is None:
        return Geometry(width, height, (size, size), 0, 0, size)
    if short_side < size:
        raise ValueError(f"short_side {short_side} is smaller than the crop size {size}")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)  # torchvision's _compute_resized_output_size
    rw, rh = (short_side, new_long) if width <= height else (new_long, short_side)
    # torchvision's center_crop: int(round(...)), Python's round (half to even)
    return Geometry(width, height, (rw, rh), int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0)), size)


def short_side_for(size: int, crop_pct: float) -> int:
    """timm's evaluation resize: ``floor(size / crop_pct)`` (256 for 224 at 0.875)."""
    return math.floor(size / crop_pct)


def _check(size: int, channels: int, interpolation: str) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")


def _hwc(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open: the header only (~20 us); raises ``BadSample``."""
    try:
        return Image.open(io.BytesIO(data))
    except _PIL_ERRORS as exc:
        raise BadSample(f"undecodable image ({exc.__class__.__name__}: {exc})") from exc


def _plain_jpeg(image: Image.Image, data: bytes) -> bool:
    """A JPEG the other libraries may take: 3-component (YCbCr/RGB) or grayscale, not cut short, and without an EXIF
    rotation (``decode_image`` ignores it; TorchCodec always applies it)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or data.rstrip(b"\0")[-2:] != _JPEG_END:
        return False
    return "exif" not in image.info or image.getexif().get(_ORIENTATION, 1) == 1


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    return image.convert("L" if channels == 1 else "RGB") if image.mode != ("L" if channels == 1 else "RGB") else image


def _load(image: Image.Image, data: bytes, channels: int) -> Image.Image:
    """``image`` (opened, maybe drafted) loaded, in ``L`` or ``RGB``; other modes and a transparent colour go through
    ``decode_image`` (16-bit grayscale, alpha, ``tRNS``), which is the reference for them."""
    if image.mode not in ("RGB", "L") or "transparency" in image.info:
        return decode_image(data, channels)
    try:
        image.load()
    except _PIL_ERRORS as exc:
        raise BadSample(f"undecodable image ({exc.__class__.__name__}: {exc})") from exc
    return image


def _resize_box(
    image: Image.Image, geo: Geometry, channels: int, interpolation: str, scale: float = 1.0, **kw: float
) -> np.ndarray:
    """Resample only the crop's source region of ``image`` (``scale``: its size over the source's, after DCT
    scaling) straight to ``size`` x ``size``: the same pixels as a full resize and a crop, a fraction of the work."""
    if channels == 3 and image.mode == "L":
        image = _resize_box(image, geo, 1, interpolation, scale, **kw)
        return np.repeat(image, 3, axis=2)  # resizing one band then copying it is what convert("RGB") first gives
    image = _to_channels(image, channels)
    box = tuple(v * scale for v in geo.box)
    out = image.resize((geo.size, geo.size), _PIL_FILTER[interpolation], box=box, **kw)
    return _hwc(np.array(out))  # writable (np.asarray's view of Pillow's bytes is not): torch.from_numpy takes it


def decode_pil(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """The reference: ``decode_image``, the full resize, the crop (``card_transform`` before ``ToTensor``)."""
    _check(size, channels, interpolation)
    image = decode_image(data, channels)
    geo = plan(*image.size, size, short_side)
    image = image.resize(geo.resized, _PIL_FILTER[interpolation])
    return _hwc(np.array(image.crop((geo.left, geo.top, geo.left + size, geo.top + size))))


def decode_pil_box(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """Pillow, resampling only the crop's region: pixel for pixel ``decode_pil``."""
    _check(size, channels, interpolation)
    image = _open(data)
    geo = plan(*image.size, size, short_side)
    return _resize_box(_load(image, data, channels), geo, channels, interpolation)


def decode_pil_draft(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """Pillow with ``Image.draft``: a JPEG at least twice the resize's size is decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's scaled IDCT, never below the resize's size), then resampled as ``pil-box``."""
    _check(size, channels, interpolation)
    image = _open(data)
    geo = plan(*image.size, size, short_side)
    scale = 1.0
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        _, box = image.draft(image.mode, geo.resized)  # keep the mode: RGB->L here would round differently
        if box is not None:  # (0, 0, w / s, h / s): the source image's extent in the drafted one
            scale = box[2] / geo.width
    return _resize_box(_load(image, data, channels), geo, channels, interpolation, scale)


def decode_pil_reduce(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """Pillow's ``resize(reducing_gap=2.0)``: an integer box reduction (``Image.reduce``) before the resample when
    the source region is at least 4x the output."""
    _check(size, channels, interpolation)
    image = _open(data)
    geo = plan(*image.size, size, short_side)
    return _resize_box(_load(image, data, channels), geo, channels, interpolation, reducing_gap=2.0)


def _dct_factor(geo: Geometry, choices: tuple[int, ...] = (8, 4, 2)) -> int:
    """The largest libjpeg downscale (1/r) that leaves the image at least the resize's size, as ``draft`` picks."""
    fit = min(geo.width // geo.resized[0], geo.height // geo.resized[1])
    return next((r for r in choices if r <= fit), 1)


def decode_opencv(
    data: bytes,
    size: int,
    channels: int = 3,
    short_side: int | None = None,
    interpolation: str = "bilinear",
    *,
    area: bool = True,
) -> np.ndarray:
    """OpenCV: ``imdecode`` (reduced when the JPEG is large enough), ``resize`` (``INTER_AREA`` when shrinking,
    else linear or cubic), the crop. ``area=False`` shrinks with the plain linear/cubic kernel too: faster, but not
    antialiased (``bench/decode.py`` shows what that costs in pixels)."""
    import cv2

    _check(size, channels, interpolation)
    image = _open(data)
    if not _plain_jpeg(image, data):
        return decode_pil_box(data, size, channels, short_side, interpolation)
    geo = plan(*image.size, size, short_side)
    r = _dct_factor(geo)
    flags = {
        (1, 1): cv2.IMREAD_GRAYSCALE,
        (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
        (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
        (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        (3, 1): cv2.IMREAD_COLOR,
        (3, 2): cv2.IMREAD_REDUCED_COLOR_2,
        (3, 4): cv2.IMREAD_REDUCED_COLOR_4,
        (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
    }[channels, r]
    # EXIF orientation is not applied by decode_image; OpenCV applies it unless told not to
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        return decode_pil_box(data, size, channels, short_side, interpolation)
    h, w = pixels.shape[:2]
    rw, rh = geo.resized
    shrink = rw <= w and rh <= h
    kernel = cv2.INTER_LINEAR if interpolation == "bilinear" else cv2.INTER_CUBIC
    mode = cv2.INTER_AREA if shrink and area else kernel
    resized = cv2.resize(pixels, (rw, rh), interpolation=mode)
    crop = resized[geo.top : geo.top + size, geo.left : geo.left + size]
    # BGR to RGB on the small crop: the reduced reads cannot ask libjpeg for RGB (OpenCV refuses the flag pair)
    return np.ascontiguousarray(_hwc(crop) if channels == 1 else crop[..., ::-1])


def _libjpeg_scale(full: int, scaled: int) -> float:
    """libjpeg-turbo scales by M/8 and rounds the size up: the exact M/8 behind ``scaled`` (a box in the source
    maps to one in the scaled image by it, without the rounding's drift)."""
    for m in range(1, 9):
        if -(-full * m // 8) == scaled:
            return m / 8
    return scaled / full


def decode_simplejpeg(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """simplejpeg (libjpeg-turbo, DCT scaling down to at least the resize's size), then PIL's box resample."""
    import simplejpeg

    _check(size, channels, interpolation)
    image = _open(data)
    if not _plain_jpeg(image, data):
        return decode_pil_box(data, size, channels, short_side, interpolation)
    geo = plan(*image.size, size, short_side)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if channels == 1 else "RGB", min_width=geo.resized[0], min_height=geo.resized[1]
        )
    except ValueError:  # simplejpeg's strict mode refuses what libjpeg only warns about: PIL decides
        return decode_pil_box(data, size, channels, short_side, interpolation)
    scaled = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    return _resize_box(scaled, geo, channels, interpolation, _libjpeg_scale(geo.width, pixels.shape[1]))


def _tensor_resize_crop(chw: torch.Tensor, geo: Geometry, interpolation: str) -> np.ndarray:
    """Torch's antialiased resize on a ``uint8`` CHW tensor, then the crop, as HWC. torchvision's ``resize`` reaches
    torch's uint8 kernels (bilinear and bicubic, rounding as Pillow does) on channels-last memory, which is what the
    decoders give: 2-3x faster here than ``torch.nn.functional.interpolate`` on the same tensor, same pixels."""
    from torchvision.transforms.v2 import functional as F

    mode = F.InterpolationMode(interpolation)
    resized = F.resize(chw, [geo.resized[1], geo.resized[0]], interpolation=mode, antialias=True)
    crop = resized[:, geo.top : geo.top + geo.size, geo.left : geo.left + geo.size]
    return np.ascontiguousarray(crop.permute(1, 2, 0).numpy())


def decode_pil_torch(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """Pillow's decoder, with ``draft`` as ``pil-draft`` (so a JPEG at least twice the resize's size is decoded at
    1/2, 1/4 or 1/8 scale; ImageNet-size ones are not), and torch's uint8 resize, which is several times faster than
    Pillow's on one core and within a grey level of it. Other formats and modes decode as ``decode_image`` does."""
    import torch

    _check(size, channels, interpolation)
    image = _open(data)
    geo = plan(*image.size, size, short_side)
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        image.draft(image.mode, geo.resized)
    image = _to_channels(_load(image, data, channels), channels)
    hwc = torch.from_numpy(_hwc(np.array(image)))  # a writable copy: np.asarray's view of Pillow's bytes is not
    return _tensor_resize_crop(hwc.permute(2, 0, 1), geo, interpolation)


def decode_torchvision(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """``torchvision.io.decode_jpeg`` on the CPU and torchvision's antialiased tensor resize."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    _check(size, channels, interpolation)
    image = _open(data)
    if not _plain_jpeg(image, data):
        return decode_pil_box(data, size, channels, short_side, interpolation)
    geo = plan(*image.size, size, short_side)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)  # HWC memory, as CHW
    except RuntimeError:
        return decode_pil_box(data, size, channels, short_side, interpolation)
    return _tensor_resize_crop(chw, geo, interpolation)


def decode_torchcodec(
    data: bytes, size: int, channels: int = 3, short_side: int | None = None, interpolation: str = "bilinear"
) -> np.ndarray:
    """``torchcodec.decoders.decode_jpeg`` on the CPU and torchvision's antialiased tensor resize. TorchCodec has no
    scaled (DCT) decode: a JPEG at least twice the resize's size goes the ``pil-torch`` way (Pillow's ``draft``, the
    same resize), 3x faster than TorchCodec's full decode at 4000x3000."""
    from torchcodec.decoders import decode_jpeg

    _check(size, channels, interpolation)
    image = _open(data)
    if not _plain_jpeg(image, data):
        return decode_pil_box(data, size, channels, short_side, interpolation)
    geo = plan(*image.size, size, short_side)
    if _dct_factor(geo) > 1:
        return decode_pil_torch(data, size, channels, short_side, interpolation)
    try:
        chw = decode_jpeg(data, mode="GRAY" if channels == 1 else "RGB")
    except RuntimeError:
        return decode_pil_box(data, size, channels, short_side, interpolation)
    return _tensor_resize_crop(chw, geo, interpolation)


@dataclass(frozen=True)
class Backend:
    """One way to decode: its function, the modules it imports, and the backend to use when they are missing."""

    name: str
    decode: Decode
    modules: tuple[str, ...] = ()
    fallback: str | None = None

    @property
    def available(self) -> bool:
        return all(installed(m) for m in self.modules)


def plain_jpeg(data: bytes) -> bool:
    """Whether the bytes are a JPEG that every decoder reads as ``decode_image`` does (``_plain_jpeg``): the GPU
    path's test, from the header alone."""
    try:
        return _plain_jpeg(_open(data), data)
    except BadSample:
        return False


@functools.cache
def installed(module: str) -> bool:
    """Importable, not merely present: a wheel can install and still fail to load its native libraries."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as exc:
        log.debug("%s does not import: %s", module, exc)
        return False
    return True


DECODERS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("pil", decode_pil),
        Backend("pil-box", decode_pil_box, fallback="pil"),
        Backend("pil-draft", decode_pil_draft, fallback="pil-box"),
        Backend("pil-reduce", decode_pil_reduce, fallback="pil-box"),
        Backend("pil-torch", decode_pil_torch, ("torch", "torchvision"), fallback="pil-box"),
        Backend("opencv", decode_opencv, ("cv2",), fallback="pil-torch"),
        Backend("simplejpeg", decode_simplejpeg, ("simplejpeg",), fallback="pil-torch"),
        Backend("torchvision", decode_torchvision, ("torch", "torchvision"), fallback="pil-torch"),
        Backend("torchcodec", decode_torchcodec, ("torch", "torchvision", "torchcodec"), fallback="pil-torch"),
    )
}
# The labeling and evaluation default: the fastest maintained backend within a grey level or two of ``pil`` in
# bench/decode.py (results in bench/results/decode-*.json); a missing library falls back along the chain.
DEFAULT = "torchcodec"
REFERENCE = "pil"  # what bench/decode.py measures the others against


def resolve(name: str) -> str:
    """The backend that will run for ``name`` (``auto``: ``DEFAULT``): itself when its library is installed, else the
    first installed one along its ``fallback`` chain (logged once). An unknown name raises ``ValueError`` listing
    the known ones."""
    name = DEFAULT if name == "auto" else name
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    chosen = name
    while not DECODERS[chosen].available:
        chosen = DECODERS[chosen].fallback or "pil"
    if chosen != name:
        _warn_fallback(name, chosen)
    return chosen


@functools.cache
def _warn_fallback(name: str, chosen: str) -> None:
    missing = [m for m in DECODERS[name].modules if not installed(m)]
    log.warning("decoder %r needs %s, which is not installed: using %r", name, ", ".join(missing), chosen)


def get_decoder(name: str = DEFAULT) -> Decode:
    """The decode function for ``name`` (after ``resolve``)."""
    return DECODERS[resolve(name)].decode


def decode_to(
    data: bytes,
    size: int,
    channels: int = 3,
    short_side: int | None = None,
    interpolation: str = "bilinear",
    backend: str = DEFAULT,
) -> np.ndarray:
    """``data`` (JPEG, PNG, WebP, ...) as a ``(size, size, channels)`` uint8 array; see the module docstring."""
    return get_decoder(backend)(data, size, channels, short_side, interpolation)
