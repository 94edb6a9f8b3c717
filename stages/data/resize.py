"""Images stored at the size a model reads them (``prepare-folder --max-side N``, issue 27 item 2).

    from stages.data.resize import fit_short_side
    data, ext = fit_short_side(data, "jpg", 256)   # the same bytes and extension when the short side is <= 256

A model reads 224-pixel crops of an image resized to a short side of about 256, so a 12-megapixel photo stored whole
costs its decode (and its disk and network bytes) in every round for pixels training throws away; FFCV's ImageNet files
keep no side above 400-500 pixels, at JPEG quality 90, for the same reason. ``fit_short_side`` decodes an image whose
short side is above ``max_side`` (a JPEG at 1/2, 1/4 or 1/8 scale through ``Image.draft`` when that still leaves at
least ``max_side``), resizes it with Lanczos so that its short side is ``max_side`` (the long side as torchvision's
``Resize`` computes it) and re-encodes it: JPEG at quality 90 for an opaque ``L``/``RGB``/``CMYK`` image that was not a
PNG, PNG for one with alpha, a palette or a PNG source. An image that already fits keeps its bytes. Metadata (EXIF, ICC
profile) is not carried over: ``decode_image`` reads pixels only, and rotates by no EXIF tag.
"""

from __future__ import annotations

import io

from PIL import Image

from stages.core.errors import BadSample, ConfigError
from stages.data.decoders import plan
from stages.data.shards import UNDECODABLE

JPEG_QUALITY = 90
JPEG_MODES = ("L", "RGB", "CMYK")
REDUCING_GAP = 3.0  # Image.reduce's box filter first only while 3x the output remains: Lanczos-quality all the same


def check_max_side(max_side: int, name: str = "max_side") -> int:
    """``max_side`` when it is 0 (off) or a positive number of pixels; else one ``ConfigError`` line."""
    if max_side < 0:
        raise ConfigError(f"{name} {max_side}: must be 0 (keep every image's bytes) or a short side in pixels")
    return max_side


def fit_short_side(data: bytes, ext: str, max_side: int) -> tuple[bytes, str]:
    """``data`` and ``ext`` when ``max_side`` is 0 or the image's short side is at most ``max_side`` (the same
    bytes object: nothing is re-encoded), else the image shrunk to that short side, re-encoded, and its extension.
    An image Pillow cannot open or decode raises ``BadSample``, as ``decode_image`` does."""
    if not max_side:
        return data, ext
    try:
        image = Image.open(io.BytesIO(data))
        if min(image.size) <= max_side:
            return data, ext
        size = plan(*image.size, max_side, max_side).resized
        source_format = image.format
        image.draft(image.mode, size)  # JPEG only: the smallest DCT scale whose sides are still >= size's
        image = _resizable(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    except UNDECODABLE as exc:
        raise BadSample(f"undecodable image ({exc.__class__.__name__}: {exc})") from exc
    out = io.BytesIO()
    if source_format != "PNG" and image.mode in JPEG_MODES:
        image.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), ext if ext in ("jpg", "jpeg") else "jpg"
    image.save(out, "PNG")
    return out.getvalue(), "png"


def _resizable(image: Image.Image) -> Image.Image:
    """Palette and 1-bit images as ``RGB``/``L`` (Pillow resizes those nearest-neighbour only), and a transparent
    colour (``tRNS``) as an alpha band, which a resampled image can keep; other modes as they are."""
    transparent = "transparency" in image.info or image.mode == "PA"
    if image.mode not in ("1", "P", "PA") and not (transparent and image.mode in ("L", "RGB")):
        return image
    gray = image.mode in ("1", "L")
    return image.convert(("LA" if transparent else "L") if gray else ("RGBA" if transparent else "RGB"))
