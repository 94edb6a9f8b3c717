"""Decode throughput per core: JPEG bytes to a model-sized uint8 array, for each backend of ``stages/data/decoders.py``.

    python bench/decode.py                                   # 500x375 q90, 64 images: the acceptance run (~1.5 min)
    python bench/decode.py --sizes 500x375,1024x768,4000x3000
    python bench/decode.py --simd-python /path/to/venv-with-pillow-simd/bin/python   # adds pillow-simd's figures
    python bench/decode.py --images 16 --repeats 2 --no-save                         # a smoke run

Generates photo-like JPEGs itself (no downloads; ``numpy.random.default_rng((seed, i))``, so the same bytes every
run): a two-colour gradient and a low-frequency colour field, a dozen or more overlapping shapes with slightly soft
edges, multi-octave (1/f-like) luminance texture and sensor grain, saved by Pillow at quality 90 (4:2:0). At
500x375 that is about 2.3 bits per pixel (~54 KiB), in the range of real photos at that quality; pure noise would
cost libjpeg far more, flat colour far less. Larger sizes (``--sizes``) get fewer images (the same pixel count,
at least 4); above 2 MP they are drawn at 2 MP and upsampled, with full-size grain (``large_photo``).

Each backend turns the bytes into a ``(224, 224, 3)`` uint8 array (HWC, before ``ToTensor``/``Normalize``) three
ways: ``crop`` (resize the short side to 256, centre-crop 224: timm's evaluation transform at ``crop_pct`` 0.875,
which the pipeline uses for ``natural`` models, bilinear), ``crop-bicubic`` (the same with bicubic, which
resnet10t's pretrained config asks for) and ``squash`` (resize the whole image to 224x224: the ``digits``
transform). ``pipeline-float`` is what the pseudo-label stage's ``Decoder`` runs today, ``decode_image`` then
``card_transform`` to a normalised float tensor, for reference. ``opencv-linear`` is OpenCV shrinking without
antialiasing, to show what the shortcut costs in pixels.

Timing: the process is pinned to one core (``--core``, default the last one); every backend runs ``--repeats``
passes over the images, in an order that rotates from pass to pass, after one untimed pass (whose outputs are
compared with ``pil``'s: mean absolute difference in grey levels, maximum, PSNR, the share of identical values).
``img_s`` is images over the sum of each image's fastest *process CPU time* (``time.process_time``) over the
passes, which other jobs on a shared machine disturb far less than the wall clock (they still evict caches, in
bursts: the per-image minimum drops most of that); ``img_s_median`` takes each image's median instead, and
``img_s_wall`` is the fastest pass by the wall clock. On a quiet machine the three agree within a few per cent. Then the
default backend and ``pil`` run on ``--threads`` threads (a ``ThreadPoolExecutor``, as the pseudo-label ``Decoder``
does, with OpenCV's and torch's own threads set to 1), pinned to as many cores: total images per wall second.

``default`` is the fastest backend (``crop``, first size) that is a maintained library installable from PyPI as a
plain dependency (Pillow, OpenCV headless, simplejpeg, TorchCodec; not torchvision.io's deprecated decoders, not
pillow-simd, which replaces Pillow and builds from source) and whose output stays close to ``pil``'s in every
measured setting (PSNR >= 40 dB and mean difference <= 1 grey level). ``default_speedup_vs_pil`` is its ``img_s``
over ``pil``'s. The last line is the JSON, also saved with the machine's facts to ``bench/results/decode-<stamp>.json``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import colorsys
import functools
import io
import math
import os
import pickle
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import add_result_args, save_result  # noqa: E402

from stages.data.decoders import DECODERS, decode_opencv, short_side_for  # noqa: E402

SIZE, CROP_PCT, QUALITY = 224, 0.875, 90
BASE_PIXELS = 500 * 375
LARGE_DRAW_PIXELS = 2_000_000  # larger images are drawn at this size and upsampled (large_photo)
# (name, short side before the centre crop or None for a squash, interpolation)
SETTINGS = (
    ("crop", short_side_for(SIZE, CROP_PCT), "bilinear"),
    ("crop-bicubic", short_side_for(SIZE, CROP_PCT), "bicubic"),
    ("squash", None, "bilinear"),
)
# The line each backend would add to pyproject.toml's dependencies (the others need nothing new)
NEW_DEPENDENCY = {
    "opencv": "opencv-python-headless>=5.1",
    "opencv-linear": "opencv-python-headless>=5.1",
    "simplejpeg": "simplejpeg>=1.9",
    "torchcodec": "torchcodec==0.17.0",
}
DEPENDENCY = {
    **dict.fromkeys(("pil", "pil-box", "pil-draft", "pil-reduce"), "pillow (already a dependency)"),
    "pil-torch": "pillow and torch (already dependencies)",
    "torchvision": "torchvision (already a dependency; its image decoders are deprecated since 0.29)",
    **NEW_DEPENDENCY,
}
# Who may be the default: maintained, a plain PyPI dependency (not torchvision.io's deprecated decoders, not
# pillow-simd), antialiased (not opencv-linear)
ELIGIBLE = ("pil", "pil-box", "pil-draft", "pil-reduce", "pil-torch", "opencv", "simplejpeg", "torchcodec")
CLOSE_PSNR_DB, CLOSE_MAD, TIE = 40.0, 1.0, 0.05
PIL_BACKENDS = ("pil", "pil-box", "pil-draft", "pil-reduce")  # what the pillow-simd run measures


# -- photo-like JPEGs ---------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    h, s, v = rng.random(), rng.uniform(0.25, 0.85), rng.uniform(0.3, 0.95)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (255 * r, 255 * g, 255 * b)


def _field(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise: a ``cells`` grid of normal values, bicubic-upsampled to ``width`` x ``height``."""
    small = rng.standard_normal((cells[1], cells[0])).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photo-like RGB image: gradient, colour field, soft-edged shapes, 1/f-like texture, grain."""
    s = min(width, height)
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + np.cos(angle) * x + np.sin(angle) * y, 0, 1)
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    base = c0 + t[..., None] * (c1 - c0)
    for c in range(3):
        base[..., c] += 18 * _field(rng, width, height, (4, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(int(rng.integers(12, 30))):
        fill = (*(int(c) for c in _colour(rng)), int(rng.integers(160, 256)))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05 * s, 0.3 * s, 2)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(max(0.5, s / 750)))  # edges as soft as a lens leaves them
    texture = np.zeros((height, width), np.float32)
    for k, cells in enumerate((8, 16, 32, 64, 128, 256)):  # detail at every scale, weaker as it gets finer
        grid = (max(2, round(cells * width / s)), max(2, round(cells * height / s)))
        texture += np.float32(0.8**k) * _field(rng, width, height, grid)
    texture *= 14
    texture += rng.standard_normal((height, width), dtype=np.float32) * 3  # luminance grain
    pixels = np.asarray(image, dtype=np.float32) + texture[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def large_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A camera-size photo: drawn at about 2 MP and upsampled (bicubic), fresh grain at full size. Drawing 12 MP
    directly takes ~25 s an image here; a camera's pixels are smoother than an ImageNet thumbnail's anyway."""
    scale = math.sqrt(LARGE_DRAW_PIXELS / (width * height))
    image = photo(rng, round(width * scale), round(height * scale)).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.standard_normal((height, width, 1), dtype=np.float32) * 2
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def make_jpegs(width: int, height: int, count: int, seed: int = 0) -> list[bytes]:
    draw = photo if width * height <= LARGE_DRAW_PIXELS else large_photo
    out = []
    for i in range(count):
        buf = io.BytesIO()
        draw(np.random.default_rng((seed, width, height, i)), width, height).save(buf, "JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return out


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


# -- candidates, quality, timing ----------------------------------------------------------------------------------

Fn = Callable[[bytes], object]


def _pipeline_float(short_side: int | None, interpolation: str) -> Fn:
    """The stage's CPU path today: ``decode_image`` then ``card_transform`` (a normalised float CHW tensor)."""
    from stages.data.shards import decode_image
    from stages.models.transforms import card_transform

    card = {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": interpolation}
    if short_side is not None:
        card |= {"augment": "natural", "crop_pct": CROP_PCT}
    transform = card_transform(card)
    return lambda data: transform(decode_image(data, 3))


def _float_to_uint8(x) -> np.ndarray:
    return np.clip(np.rint((x.numpy() * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def candidates(short_side: int | None, interpolation: str, only: set[str] | None) -> dict[str, Fn]:
    fns: dict[str, Fn] = {}
    for name, backend in DECODERS.items():
        if backend.available:
            fns[name] = functools.partial(backend.decode, size=SIZE, channels=3, short_side=short_side,
                                          interpolation=interpolation)  # fmt: skip
    if "opencv" in fns:
        fns["opencv-linear"] = functools.partial(
            decode_opencv, size=SIZE, channels=3, short_side=short_side, interpolation=interpolation, area=False
        )
    if (only is None or "pipeline-float" in only) and _importable("torch"):
        fns["pipeline-float"] = _pipeline_float(short_side, interpolation)
    return {k: v for k, v in fns.items() if only is None or k in only}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def quality(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    a = np.stack(outputs).astype(np.float64)
    b = np.stack(reference).astype(np.float64)
    diff = np.abs(a - b)
    mse = float(np.mean(diff**2))
    return {
        "mad": round(float(diff.mean()), 3),
        "max_abs": int(diff.max()),
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 1),  # None: identical
        "identical": round(float(np.mean(diff == 0)), 4),
    }


def time_backends(fns: dict[str, Fn], images: list[bytes], repeats: int) -> tuple[dict, dict]:
    """Outputs of one untimed pass, and per backend each image's CPU seconds in each timed pass (``repeats`` x
    images) and each pass's wall seconds. Passes rotate the backends' order, so none always follows the same one."""
    outputs = {name: [fn(d) for d in images] for name, fn in fns.items()}
    times = {name: {"cpu": np.zeros((repeats, len(images))), "wall": []} for name in fns}
    names = list(fns)
    clock = time.process_time
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, cpu = fns[name], times[name]["cpu"][r]
            wall = time.perf_counter()
            for i, data in enumerate(images):
                start = clock()
                fn(data)
                cpu[i] = clock() - start
            times[name]["wall"].append(time.perf_counter() - wall)
    return outputs, times


def rates(times: dict, count: int) -> dict:
    """``img_s``: images over the sum of each image's fastest CPU time (other jobs on a shared machine slow a decode
    by evicting its caches, in bursts: the per-image minimum drops most of that); ``img_s_median``: the same with
    each image's median; ``img_s_wall``: images over the fastest pass's wall time."""
    cpu = times["cpu"]
    return {
        "img_s": round(count / float(cpu.min(axis=0).sum())),
        "img_s_median": round(count / float(np.median(cpu, axis=0).sum())),
        "img_s_wall": round(count / min(times["wall"])),
    }


def threaded(fn: Fn, images: list[bytes], threads: int, repeats: int) -> dict:
    """Total images per wall second with ``threads`` decodes at once (and with one, for the scaling)."""
    out = {}
    for n in (1, threads):
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(fn, images))
            walls = []
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(fn, images))
                walls.append(time.perf_counter() - start)
        out[f"img_s_{n}_thread{'s' if n > 1 else ''}"] = round(len(images) / min(walls))
    out["scaling"] = round(out[f"img_s_{threads}_threads"] / out["img_s_1_thread"], 2)
    return out


def set_library_threads() -> None:
    """One thread inside each library: the parallelism is the bench's (or the Decoder's) own threads."""
    if _importable("cv2"):
        import cv2

        cv2.setNumThreads(1)
    if _importable("torch"):
        import torch

        torch.set_num_threads(1)


# -- the pillow-simd run, in another interpreter -----------------------------------------------------------------


def worker(path: Path) -> None:
    """``--worker FILE``: time the Pillow backends on the pickled images and settings, pickle the results back."""
    job = pickle.loads(path.read_bytes())
    os.sched_setaffinity(0, {job["core"]})
    results = {}
    for key, images in job["images"].items():
        for setting, short_side, interpolation in SETTINGS:
            fns = candidates(short_side, interpolation, set(PIL_BACKENDS))
            outputs, times = time_backends(fns, images, job["repeats"])
            results[key, setting] = {n: {"outputs": outputs[n], **rates(times[n], len(images))} for n in fns}
    path.write_bytes(pickle.dumps({"results": results, "pillow": _version("pillow-simd") or _version("pillow")}))


def run_simd(python: str, jpegs: dict, core: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps({"images": jpegs, "core": core, "repeats": repeats}))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([python, __file__, "--worker", str(job)], check=True, env=env)
        return pickle.loads(job.read_bytes())


# -- main --------------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def libraries() -> dict:
    from PIL import features

    out = {p: _version(p) for p in ("pillow", "pillow-simd", "opencv-python-headless", "simplejpeg", "torchcodec")}
    out["pillow_libjpeg_turbo"] = features.version("libjpeg_turbo")
    return out


def choose_default(decoders: dict, primary: str) -> str:
    """The fastest eligible backend that is close to ``pil`` everywhere; within ``TIE`` of it, one that needs no new
    dependency wins (a few per cent is below what this bench can resolve on a shared machine)."""

    def close(name: str) -> bool:
        qualities = [per[name]["quality"] for per in decoders.values() if name in per]
        return all(q["mad"] <= CLOSE_MAD and (q["psnr_db"] is None or q["psnr_db"] >= CLOSE_PSNR_DB) for q in qualities)

    def rate(name: str) -> int:
        return decoders[primary][name]["img_s"]

    ok = [n for n in ELIGIBLE if n in decoders[primary] and close(n)]
    fastest = max(ok, key=rate)
    near = [n for n in ok if rate(n) >= (1 - TIE) * rate(fastest)]
    return min(near, key=lambda n: (n in NEW_DEPENDENCY, -rate(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500x375", help="comma-separated WxH; the first is the acceptance size")
    ap.add_argument("--images", type=int, default=64, help="images at 500x375 (larger sizes: same pixels, >= 4)")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes per backend and setting")
    ap.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the core single-thread runs use")
    ap.add_argument("--threads", type=int, default=2, help="the threaded run: decodes at once, on as many cores")
    ap.add_argument("--only", default="", help="comma-separated backends (default: every importable one)")
    ap.add_argument("--simd-python", default="", help="an interpreter with pillow-simd: adds its Pillow figures")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    add_result_args(ap)
    args = ap.parse_args()
    if args.worker:
        set_library_threads()
        return worker(args.worker)
    only = set(args.only.split(",")) | {"pil"} if args.only else None
    set_library_threads()
    all_cores = sorted(os.sched_getaffinity(0))
    load_before = round(os.getloadavg()[0], 2)

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    jpegs, facts = {}, {}
    for w, h in sizes:
        count = max(4, round(args.images * BASE_PIXELS / (w * h)))
        start = time.perf_counter()
        jpegs[f"{w}x{h}"] = data = make_jpegs(w, h, count)
        kib = statistics.mean(len(d) for d in data) / 1024
        facts[f"{w}x{h}"] = {
            "images": count,
            "mean_kib": round(kib, 1),
            "bits_per_pixel": round(kib * 8192 / (w * h), 2),
        }
        print(
            f"{w}x{h}: {count} JPEGs q{QUALITY}, {kib:.1f} KiB each, {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )

    os.sched_setaffinity(0, {args.core})
    decoders: dict[str, dict[str, dict]] = {}  # "<size> <setting>" -> backend -> figures
    references: dict[str, list[np.ndarray]] = {}  # "<size> <setting>" -> pil's outputs
    for key, images in jpegs.items():
        for setting, short_side, interpolation in SETTINGS:
            fns = candidates(short_side, interpolation, only)
            outputs, times = time_backends(fns, images, args.repeats)
            outputs["pipeline-float"] = [_float_to_uint8(x) for x in outputs.get("pipeline-float", [])]
            per = decoders[f"{key} {setting}"] = {}
            for name in fns:
                q = quality(outputs[name], outputs["pil"]) if outputs[name] else None
                per[name] = {**rates(times[name], len(images)), "quality": q, "dependency": DEPENDENCY.get(name)}
            print(f"{key} {setting}: " + ", ".join(f"{n} {v['img_s']}" for n, v in per.items()), file=sys.stderr)
            references[f"{key} {setting}"] = outputs["pil"]

    if args.simd_python:
        simd = run_simd(args.simd_python, jpegs, args.core, args.repeats)
        for (key, setting), per in simd["results"].items():
            for name, figures in per.items():  # quality against this interpreter's Pillow
                q = quality(figures.pop("outputs"), references[f"{key} {setting}"])
                dep = f"pillow-simd=={simd['pillow']} (replaces pillow; source build)"
                decoders[f"{key} {setting}"][f"{name}-simd"] = {**figures, "quality": q, "dependency": dep}

    primary = f"{next(iter(jpegs))} crop"
    default = choose_default(decoders, primary)
    os.sched_setaffinity(0, set(all_cores[: args.threads]))
    threads = {}
    for name in dict.fromkeys(["pil", default]):
        fn = candidates(*_setting("crop"), {name})[name]
        threads[name] = threaded(fn, jpegs[next(iter(jpegs))], args.threads, args.repeats)
    os.sched_setaffinity(0, set(all_cores))

    pil_rate = decoders[primary]["pil"]["img_s"]
    table(decoders)
    for name, t in threads.items():
        print(f"{name} on {args.threads} threads ({primary}): {t}")
    result = {
        "bench": "decode",
        "setting": f"{args.sizes}, {SIZE}px, q{QUALITY}",
        "output": "uint8 HWC (224, 224, 3), before ToTensor/Normalize; pipeline-float: the float CHW tensor",
        "pipeline_uses": "natural models: short side to floor(224 / crop_pct) = 256, centre crop 224, the model's "
        "interpolation (resnet10t: bicubic); digits: squash to 224x224 bilinear",
        "timing": "img_s: images / sum of each image's fastest process CPU time over the passes, on one core; "
        "img_s_median: each image's median; img_s_wall: fastest pass, wall clock",
        "core": args.core,
        "repeats": args.repeats,
        "images": facts,
        "decoders": decoders,
        "default": default,
        "default_dependency": DEPENDENCY[default],
        "default_speedup_vs_pil": round(decoders[primary][default]["img_s"] / pil_rate, 2),
        "threads": {"count": args.threads, **threads},
        "libraries": libraries(),
        "load_avg_1m_before": load_before,
    }
    save_result(result, "decode", args)


def _setting(name: str) -> tuple[int | None, str]:
    _, short_side, interpolation = next(s for s in SETTINGS if s[0] == name)
    return short_side, interpolation


def table(decoders: dict) -> None:
    names = list(dict.fromkeys(n for per in decoders.values() for n in per))
    keys = list(decoders)
    print(f"{'backend':16s}" + "".join(f"{k:>22s}" for k in keys) + "   quality vs pil (first column): MAD / PSNR dB")
    for name in names:
        cells = "".join(f"{decoders[k][name]['img_s']:>22,}" if name in decoders[k] else f"{'-':>22s}" for k in keys)
        q = decoders[keys[0]].get(name, {}).get("quality")
        qual = "identical" if q and q["psnr_db"] is None else (f"{q['mad']:.2f} / {q['psnr_db']}" if q else "-")
        print(f"{name:16s}{cells}   {qual}")


if __name__ == "__main__":
    main()
