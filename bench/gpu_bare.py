"""The ceilings a labeling node has, outside Ray: the bare forward pass, and each decoder that could feed it.

    python bench/gpu_bare.py --gpu [--model resnet50] [--size 224] [--batch 256] [--images 512] [--seconds 8]
    python bench/gpu_bare.py --model resnet10t --size 32 --batch 64 --images 64 --seconds 1 --no-save   # CPU dry run

The GPU issue's first question is which of these keeps pace with the model, before any Ray start-up is paid
(``bench/gpu_check.sh`` runs this first). On ``--images`` photo-like 500x375 q90 JPEGs (``bench/decode.py``'s,
the same bytes every run), each decoder goes from the bytes to a ``size`` x ``size`` batch:

- ``bare``: the model's forward pass alone on a batch already on the device (bf16 autocast and channels-last on a
  GPU, as the label actors run it), images per second;
- ``nvjpeg``: ``torchvision.io.decode_jpeg(list, device="cuda")`` (one batched nvJPEG call: what the pseudo-label
  stage's ``resources.label_decode: gpu`` runs today) and a bilinear resize on the GPU;
- ``torchcodec_cuda``: ``torchcodec.decoders.decode_jpeg(list, device="cuda")``, TorchCodec's batched nvJPEG
  (torchvision 0.29 deprecates its own decoders in its favour), and the same resize;
- ``cpu_per_core`` and ``cpu_node``: the default CPU backend (``stages/data/decoders.py``, resize to 256 and centre
  crop) on one thread, and on one thread per core of this node (what a node's CPUs can feed at most).

Each is timed for about ``--seconds`` after a warm-up, and reported in images per second and as a fraction of
``bare`` (``keeps_pace``: at least 1). Without ``--gpu`` (or without CUDA) the GPU decoders are reported as not
measured, with the reason. Prints one JSON line, saved to ``bench/results/gpu_bare-<stamp>.json``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_common import add_result_args, save_result  # noqa: E402


def timed(fn: Callable[[], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Images per second of ``fn`` (which returns how many images one call handled): one warm-up call, then calls
    until ``seconds`` have passed (at least two)."""
    fn()
    sync()
    done, start, calls = 0, time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        done += fn()
        calls += 1
    sync()
    return done / (time.perf_counter() - start)


def bare_forward(model_name: str, size: int, batch: int, device, seconds: float) -> float:
    import timm
    import torch

    model = timm.create_model(model_name, num_classes=1000).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step() -> int:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(x)
        return batch

    return timed(step, seconds, torch.cuda.synchronize if device.type == "cuda" else lambda: None)


def gpu_decoder(name: str, jpegs: list[bytes], size: int, batch: int, seconds: float, device: str = "cuda") -> float:
    """Batched nvJPEG (torchvision's or TorchCodec's) and a resize to ``size`` on the GPU (``device="cpu"``: the
    same calls on the CPU, for the tests)."""
    import torch
    import torch.nn.functional as F

    if name == "nvjpeg":
        from torchvision.io import decode_jpeg

        sources = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    else:
        from torchcodec.decoders import decode_jpeg

        sources = list(jpegs)
    chunks = [sources[i : i + batch] for i in range(0, len(sources), batch)]

    def run() -> int:
        for chunk in chunks:
            images = torch.stack(decode_jpeg(chunk, device=device))  # the 500x375 images share a size
            F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        return len(sources)

    return timed(run, seconds, torch.cuda.synchronize if device == "cuda" else lambda: None)


def cpu_decoder(jpegs: list[bytes], size: int, threads: int, seconds: float) -> tuple[str, float]:
    """The default CPU backend, resize to ``floor(size / 0.875)`` and centre crop, on ``threads`` threads."""
    from stages.data.decoders import DEFAULT, get_decoder, resolve, short_side_for

    backend = resolve(DEFAULT)
    decode, short = get_decoder(backend), short_side_for(size, 0.875)
    with ThreadPoolExecutor(threads) as pool:

        def run() -> int:
            list(pool.map(lambda data: decode(data, size, 3, short_side=short), jpegs))
            return len(jpegs)

        return backend, timed(run, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the model and the GPU decoders on CUDA")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=512, help="JPEGs decoded per timed call")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    add_result_args(parser)
    args = parser.parse_args()

    import torch

    from bench.decode import make_jpegs

    cuda = args.gpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    jpegs = make_jpegs(500, 375, args.images)
    bare = bare_forward(args.model, args.size, args.batch, device, args.seconds)
    print(f"bare forward {args.model} {args.size}px on {device.type}: {bare:,.0f} img/s", flush=True)
    decoders: dict[str, dict] = {}
    for name in ("nvjpeg", "torchcodec_cuda"):
        if not cuda:
            decoders[name] = {"measured": False, "why": "no --gpu" if not args.gpu else "no CUDA"}
            continue
        try:
            rate = gpu_decoder(name, jpegs, args.size, args.batch, args.seconds)
            decoders[name] = {"measured": True, "images_per_s": round(rate, 1)}
        except Exception as exc:  # noqa: BLE001 - a decoder this machine lacks is a result, not a crash
            decoders[name] = {"measured": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
    cores = len(os.sched_getaffinity(0))
    backend, one = cpu_decoder(jpegs, args.size, 1, args.seconds)
    _, node = cpu_decoder(jpegs, args.size, cores, args.seconds)
    decoders["cpu_per_core"] = {"measured": True, "backend": backend, "images_per_s": round(one, 1)}
    decoders["cpu_node"] = {"measured": True, "backend": backend, "threads": cores, "images_per_s": round(node, 1)}
    for name, d in decoders.items():
        if d["measured"]:
            d["of_bare"] = round(d["images_per_s"] / bare, 3)
            d["keeps_pace"] = d["images_per_s"] >= bare
        print(f"{name:>16}: " + (f"{d['images_per_s']:,.0f} img/s = {d['of_bare']:.3f} of bare" if d["measured"]
                                 else f"not measured ({d['why']})"), flush=True)  # fmt: skip
    result = {
        "bench": "gpu_bare",
        "setting": f"{device.type} {args.model} {args.size}px batch {args.batch}",
        "device": device.type,
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "images": args.images,
        "jpeg": "500x375 q90",
        "bare_images_per_s": round(bare, 1),
        "decoders": decoders,
    }
    save_result(result, "gpu_bare", args)


if __name__ == "__main__":
    main()
