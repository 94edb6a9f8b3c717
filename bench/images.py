"""Photo-like synthetic images and WebDataset shards of them, shared by the benches.

    python bench/images.py --out /tmp/shards --images 2000 --image-size 64 --encode jpeg [--labels]

Random noise decodes almost for free (a 32x32 noise PNG is mostly stored bytes); real inputs are photos, where
decoding and resizing cost as much as a small model's forward pass. Each image here is a smooth two-colour
gradient, a low-frequency colour field, three to six soft-edged shapes (ellipses, rectangles, polygons, one with a
stripe texture) and fine sensor-like grain, so JPEG and PNG spend their usual effort on it. A class label, when
given, sets the dominant hue, so a model can learn something from a labeled set of them.

Everything is drawn from ``numpy.random.default_rng((seed, index))``: image ``i`` is the same whichever process
draws it, and shards are written in parallel (one process per CPU) without changing a byte.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import colorsys
import functools
import io
import json
import multiprocessing
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ENCODINGS = ("jpeg", "png", "mixed")  # mixed: even indices PNG, odd JPEG (a data set of both, as users have)
JPEG_QUALITY = 90


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    return yy, xx


def _colour(hue: float, rng: np.random.Generator) -> np.ndarray:
    s, v = rng.uniform(0.35, 0.9), rng.uniform(0.35, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, s, v), dtype=np.float32) * 255


def photo_like(rng: np.random.Generator, size: int, label: int | None = None, classes: int = 10) -> Image.Image:
    """One RGB image of ``size`` x ``size``: gradient, low-frequency field, soft shapes, texture, grain."""
    hue = (label / classes + rng.normal(0, 0.04)) if label is not None else rng.random()
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    t = (np.clip(0.5 + ca * (xx - 0.5) + sa * (yy - 0.5), 0, 1) * 0.8)[..., None]
    c0, c1 = _colour(hue, rng), _colour(hue + rng.normal(0, 0.15), rng)
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(field).resize((size, size), Image.BICUBIC), dtype=np.float32)
    smooth *= 0.2
    smooth += 0.8 * c0
    smooth += t * (c1 - c0)  # 0.8 x (two-colour gradient) + 0.2 x (low-frequency field)
    image = Image.fromarray(smooth.astype(np.uint8))
    draw = ImageDraw.Draw(image, "RGBA")
    for k in range(int(rng.integers(3, 7))):
        shape_hue = hue if k == 0 else rng.random()  # the first shape carries the class colour too
        fill = (*(int(c) for c in _colour(shape_hue, rng)), int(rng.integers(140, 256)))
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size * 0.08, size * 0.35, 2)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=fill)
    image = image.filter(ImageFilter.BoxBlur(max(0.5, size / 160)))  # soft edges, as a lens gives
    pixels = np.asarray(image, dtype=np.float32)
    period = np.float32(rng.uniform(3, 9) / size)
    ox, oy = rng.uniform(0.25, 0.75, 2).astype(np.float32)
    patch = (xx - ox) ** 2 + (yy - oy) ** 2 < rng.uniform(0.01, 0.06)  # a striped (textured) patch
    pixels[patch] += (10 * np.sin((2 * np.pi / period) * (xx[patch] * ca + yy[patch] * sa)))[:, None]
    pixels += rng.standard_normal((size, size, 1), dtype=np.float32) * 4  # grain: luminance, then colour
    pixels += rng.standard_normal((size, size, 3), dtype=np.float32) * 1.5
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def _extension(encoding: str, index: int) -> str:
    if encoding == "mixed":
        return ("png", "jpg")[index % 2]
    return "jpg" if encoding == "jpeg" else "png"


def _write_shard(path: Path, first: int, count: int, spec: dict) -> str:
    """Images ``first .. first+count-1`` into one tar (written to a temporary name, then renamed)."""
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(first, first + count):
            rng = np.random.default_rng((spec["seed"], i))
            label = i % spec["classes"]
            ext = _extension(spec["encode"], i)
            fields = {ext: encode(photo_like(rng, spec["size"], label, spec["classes"]), ext)}
            if spec["labels"]:
                fields["cls"] = str(label).encode()
            for suffix, payload in fields.items():
                info = tarfile.TarInfo(f"s{i:08d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))  # mtime 0: identical inputs give identical shards
    os.replace(tmp, path)
    return str(path)


def make_shards(
    root: Path,
    images: int,
    size: int = 64,
    encoding: str = "jpeg",
    labels: bool = False,
    per_shard: int = 1000,
    classes: int = 10,
    seed: int = 0,
    prefix: str = "shard",
    workers: int = 0,
) -> list[str]:
    """Write ``images`` photo-like samples into ``ceil(images / per_shard)`` shards under ``root`` (one process per
    CPU unless ``workers``). ``labels``: each sample gets ``.cls`` (its index modulo ``classes``), as labeled and
    test shards have. Shards ``root`` already holds for the same arguments are reused (``spec.json``)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: one of {', '.join(ENCODINGS)}, got {encoding!r}")
    root = Path(root)
    spec = {"images": images, "size": size, "encode": encoding, "labels": labels, "per_shard": per_shard}
    spec |= {"classes": classes, "seed": seed, "prefix": prefix}
    stamp = root / f"{prefix}-spec.json"
    starts = list(range(0, images, per_shard))
    paths = [root / f"{prefix}-{k:06d}.tar" for k in range(len(starts))]
    if stamp.exists() and json.loads(stamp.read_text()) == spec and all(p.exists() for p in paths):
        return [str(p) for p in paths]
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{prefix}-*.tar"):
        stale.unlink()
    jobs = [(p, s, min(per_shard, images - s), spec) for p, s in zip(paths, starts, strict=True)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers > 1:  # fork: no re-import of the caller's modules, and nothing of the images stays in this process
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            out = pool.starmap(_write_shard, jobs, chunksize=1)
    else:
        out = [_write_shard(*job) for job in jobs]
    stamp.write_text(json.dumps(spec))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--encode", choices=ENCODINGS, default="jpeg")
    parser.add_argument("--labels", action="store_true", help="write .cls (labeled / test shards)")
    parser.add_argument("--preview", type=Path, help="also save the first 16 images as one PNG grid here")
    args = parser.parse_args()
    start = time.perf_counter()
    shards = make_shards(args.out, args.images, args.image_size, args.encode, args.labels)
    seconds = time.perf_counter() - start
    mb = sum(os.path.getsize(s) for s in shards) / 2**20
    print(f"{args.images} images in {len(shards)} shards, {mb:.1f} MB, {seconds:.1f} s")
    if args.preview:
        s = args.image_size
        grid = Image.new("RGB", (4 * s, 4 * s))
        for i in range(16):
            grid.paste(photo_like(np.random.default_rng((0, i)), s, i % 10), ((i % 4) * s, (i // 4) * s))
        grid.save(args.preview)


if __name__ == "__main__":
    main()
