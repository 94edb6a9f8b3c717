"""Pseudo-label throughput: the real Ray stage vs a hand-written webdataset loop vs the bare forward pass.

    python bench/pseudo_label.py --images 20000 [--threads 2] [--actors 0] [--actor-threads 0] [--loop-script]
    python bench/pseudo_label.py --gpu --images 100000 --actors 4 --cpus-per-actor 3 --shards /tmp/pl-shards

With ``--gpu`` the loop and bare runs use the GPU with bf16 autocast and channels_last (as the stage's actors
do there) and the stage's ``--actors`` share one GPU (``gpus_per_actor = 1 / actors``; default one actor).
``--shards DIR`` keeps the generated shards in DIR and reuses them on the next run.

Generates synthetic shards (32x32 RGB, PNG and JPEG mixed, 1,000 per shard), saves an untrained ``resnet18``,
and times, with the same model, batch size (256) and torch thread count:

- ``stage``: ``pipeline.distributed.pseudo_label.run_pseudo_label`` on a running local Ray, writing its sidecars
  (actor start-up included, ``ray.init`` not);
- ``loop``: one process reading the shards with the webdataset library, decoding, batching, forward;
- ``bare``: the forward pass alone on tensors already in memory.

Shards are generated in a forked child, so this process's RSS is not inflated by the samples. Ray is left to
finish booting (dashboard, agents) before the stage is timed. Peak RSS is the largest resident set of one
process (this one or any Ray worker), less the object store's shared pages (reported apart), polled every 0.5 s
during the stage.
Final line: ``{"bench": "pseudo_label", "images": N, "stage_images_per_s": ..., ...}``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Accel, PeakRss, wait_until_idle  # noqa: E402

from stages.data import write_shards  # noqa: E402

MODEL, BATCH, SIZE, PER_SHARD, CLASSES = "resnet18", 256, 32, 1000, 10


def make_shards(root: Path, images: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(images):
        array = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buf, fmt = io.BytesIO(), ("png", "jpg")[i % 2]
        Image.fromarray(array).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
        samples.append({"__key__": f"s{i:08d}", fmt: buf.getvalue()})
    shards = write_shards(samples, root, "unlabeled", max(1, images // PER_SHARD))
    (root / "count").write_text(str(images))  # for --shards: these shards may be reused
    return shards


def kept_shards(folder: Path | None, images: int) -> list[str] | None:
    """The shards a previous ``--shards`` run left in ``folder``, if they hold ``images`` samples."""
    if folder is None or not (folder / "count").exists() or (folder / "count").read_text() != str(images):
        return None
    return sorted(str(p) for p in folder.glob("*.tar"))


def save_teacher(out: Path) -> None:
    from stages.models import ModelSpec, create_model, model_card, save_model

    spec = ModelSpec(MODEL)
    save_model(
        create_model(spec, CLASSES, 3, noised=False), out, model_card(spec, CLASSES, 3, SIZE, (0.5,) * 3, (0.5,) * 3)
    )


def bench_bare(model: torch.nn.Module, images: int, accel: Accel) -> float:
    x = accel.batch(torch.randn(BATCH, 3, SIZE, SIZE))
    with torch.inference_mode(), accel.autocast():
        for _ in range(3):
            model(x)  # warm-up (on a GPU: kernel selection, allocator)
        accel.sync()
        start = time.perf_counter()
        for _ in range(max(1, images // BATCH)):
            model(x)
        accel.sync()
    return max(1, images // BATCH) * BATCH / (time.perf_counter() - start)


def bench_loop(model: torch.nn.Module, shards: list[str], accel: Accel) -> float:
    """What a user writes by hand: webdataset pipeline, PIL decode, clean transform, batched forward."""
    import webdataset as wds

    from stages.transforms import clean_transform

    transform = clean_transform(SIZE, (0.5,) * 3, (0.5,) * 3)

    def decode(sample):
        data = sample.get("png") or sample.get("jpg")
        return sample["__key__"], transform(Image.open(io.BytesIO(data)).convert("RGB"))

    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).map(decode).batched(BATCH)
    n, start = 0, time.perf_counter()
    with torch.inference_mode():
        for keys, x in ds:
            with accel.autocast():
                logits = model(accel.batch(x))
            torch.softmax(logits.float(), dim=-1).cpu()  # the labels come back to the host, as the stage's do
            n += len(keys)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--actors", type=int, default=0, help="label actors (0 = the stage's default: one per CPU)")
    parser.add_argument("--actor-threads", type=int, default=0, help="torch threads per actor (0 = one per CPU held)")
    parser.add_argument("--gpu", action="store_true", help="loop and bare on the GPU; the stage's actors share it")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each label actor holds")
    parser.add_argument("--shards", type=Path, help="keep the generated shards here and reuse them next time")
    parser.add_argument("--skip-loop", action="store_true", help="only the stage (for memory runs)")
    parser.add_argument(
        "--loop-script",
        action="store_true",
        help="also time the loop as a fresh process (imports and model load included, as the stage's actors pay)",
    )
    parser.add_argument(
        "--_loop-only", dest="loop_only", nargs=2, metavar=("TEACHER", "SHARDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    accel = Accel(args.gpu)
    if args.loop_only:  # the child of --loop-script: what a user's script does from its first line
        torch.set_num_threads(args.threads)
        from stages.models import load_model

        model, _ = load_model(args.loop_only[0])
        bench_loop(accel.model(model), json.loads(args.loop_only[1]), accel)
        return
    torch.set_num_threads(args.threads)

    import ray

    from pipeline.config import LabelResources
    from pipeline.distributed.pseudo_label import run_pseudo_label
    from pipeline.distributed.runtime import init_ray
    from stages.models import load_model
    from stages.pseudo_label import PseudoLabelConfig

    with tempfile.TemporaryDirectory(prefix="bench-pl-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards = kept_shards(args.shards, args.images)
        if shards is None:
            for stale in args.shards.glob("*.tar") if args.shards else ():
                stale.unlink()
            # Generated in a child process: the samples it holds would otherwise stay in this process's RSS.
            with multiprocessing.get_context("fork").Pool(1) as pool:
                shards = pool.apply(make_shards, (args.shards or root / "shards", args.images))
            print(f"generated {args.images} images in {len(shards)} shards ({time.perf_counter() - t0:.1f} s)")
        save_teacher(root / "teacher")
        model, _ = load_model(root / "teacher")
        model = accel.model(model)
        bare = bench_bare(model, min(args.images, 5_000 if not args.gpu else 50_000), accel)
        print(f"bare  {bare:8.0f} img/s on {accel.describe()}", flush=True)
        loop = None if args.skip_loop else bench_loop(model, shards, accel)
        if loop:
            print(f"loop  {loop:8.0f} img/s", flush=True)
        loop_script = None
        if args.loop_script:
            start = time.perf_counter()
            child = [sys.executable, __file__, "--threads", str(args.threads), *(["--gpu"] if args.gpu else [])]
            child += ["--_loop-only", str(root / "teacher")]
            subprocess.run([*child, json.dumps(shards)], check=True)
            loop_script = args.images / (time.perf_counter() - start)
            print(f"loop as a script {loop_script:8.0f} img/s (process start, imports, model load included)")
        init_ray(num_cpus=os.cpu_count())
        print(f"Ray booted and idle after {wait_until_idle():.1f} s more", flush=True)
        cfg = PseudoLabelConfig(batch_size=BATCH)
        actors = args.actors or (1 if args.gpu else 0)
        resources = LabelResources(
            actors=actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=1 / actors if args.gpu else 0.0,
            threads=args.actor_threads,
        )
        with PeakRss() as rss:
            start = time.perf_counter()
            summary = run_pseudo_label(str(root / "teacher"), shards, str(root / "out"), cfg, 3, resources)
            seconds = time.perf_counter() - start
        assert summary["rows"] == args.images, summary["rows"]
        stage = args.images / seconds
        startup = summary["startup_seconds"]
        print(f"stage {stage:8.0f} img/s ({seconds:.1f} s, of which {startup:.1f} s actor start-up)", flush=True)
    print(
        json.dumps(
            {
                "bench": "pseudo_label",
                "images": args.images,
                "stage_images_per_s": round(stage, 1),
                "loop_images_per_s": round(loop, 1) if loop else None,
                "bare_images_per_s": round(bare, 1),
                "ratio": round(stage / loop, 3) if loop else None,
                "ratio_bare": round(stage / bare, 3),
                "peak_rss_mb": round(rss.peak / 2**20, 1),
                "peak_rss_process": rss.peak_process.split()[0] if rss.peak_process else "",
                "peak_object_store_shared_mb": round(rss.peak_shared / 2**20, 1),
                "loop_script_images_per_s": round(loop_script, 1) if loop_script else None,
                "ratio_script": round(stage / loop_script, 3) if loop_script else None,
                "stage_seconds": round(seconds, 1),
                "stage_startup_s": round(startup, 1),
                "stage_after_startup_images_per_s": round(args.images / (seconds - startup), 1),
                "threads": args.threads,
                "actors": resources.actor_count(ray.cluster_resources()),
                "actor_threads": resources.torch_threads(),
                "cpus_per_actor": args.cpus_per_actor,
                "device": accel.describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
