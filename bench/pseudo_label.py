"""Pseudo-label throughput: the real Ray stage against the best of the hand-written loops, and the bare forward pass.

    python bench/pseudo_label.py --images 200000 --image-size 64 --encode jpeg     # the acceptance run (2 cores)
    python bench/pseudo_label.py --images 2000 --no-save                           # a smoke run
    python bench/pseudo_label.py --gpu --images 20000 --image-size 224 --model resnet50 --actors 4 --cpus-per-actor 3

Generates photo-like shards (``bench/images.py``: gradients, shapes, texture; ``--encode jpeg|png|mixed``, 1,000
per shard, kept with ``--shards DIR`` and reused), saves an untrained ``--model`` and times, with the same model,
batch size (256) and decoding (the stage's own functions):

- ``stage``: ``stages.pseudo_label.label_shards`` on the Ray executor (``RayExecutor``: a Ray Data actor pool on a
  running local Ray, set here whatever ``choose_executor`` would pick for the data's size), writing its sidecars
  (actor start-up included, ``ray.init`` not). It holds ``actors x cpus_per_actor`` CPUs: ``stage_cpus``; with
  ``--decode tasks``, CPU decode tasks of ``--decode-cpus`` each feed the actors, and ``stage_cpus`` is the
  machine's. Its CPU decoding backend is ``--cpu-decoder`` (``stages/data/decoders.py``), by default ``pil``:
  what the loops decode with (``decode_image`` and the card's transform), so that the ratio compares the stage's
  orchestration with the loops', not two decoders (``bench/decode.py`` compares those); ``stage_decoders`` is what ran.
- the loops (``bench/label_loops.py``), each given ``stage_cpus`` CPUs: ``serial`` (one process, decode in series
  with the forward pass), ``loader`` (``wds.WebLoader`` with decode workers, ``--loader WxT``: W workers feeding a
  forward of T torch threads; default ``stage_cpus`` x ``stage_cpus``; ``loop_workers`` in the JSON), and ``procs``
  (``stage_cpus`` processes each labeling 1/N of the shards with one torch thread, imports and model load timed);
- ``bare``: the forward pass alone on tensors already in memory.

``ratio`` is the stage's images/s over the best loop's (``loop_best``); every loop's figure is in ``loops``. With
``--gpu`` every variant runs the model on the GPU with bf16 autocast and channels_last, as the stage's actors do
there; the stage's ``--actors`` share it (``gpus_per_actor = 1 / actors``).

Ray is left to finish booting (dashboard, agents) before the stage is timed. Peak RSS is the largest resident set
of one process (this one or any Ray worker), less the object store's shared pages, polled every 0.5 s during the
stage. Final line: ``{"bench": "pseudo_label", "ratio": ..., ...}``, also saved to ``bench/results/``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Accel, PeakRss, add_result_args, save_result, wait_until_idle  # noqa: E402
from images import ENCODINGS, make_shards  # noqa: E402
from label_loops import label_loader, label_procs, label_serial  # noqa: E402

BATCH, PER_SHARD, CLASSES = 256, 1000, 10
MEAN = STD = (0.5, 0.5, 0.5)
VARIANTS = ("serial", "loader", "procs")


def save_teacher(out: Path, model: str, input_size: int) -> None:
    from stages.models.factory import ModelSpec, create_model, model_card, save_model

    spec = ModelSpec(model)
    save_model(create_model(spec, CLASSES, 3, noised=False), out, model_card(spec, CLASSES, 3, input_size, MEAN, STD))


def bench_bare(model: torch.nn.Module, images: int, size: int, accel: Accel) -> float:
    x = accel.batch(torch.randn(BATCH, 3, size, size))
    steps = max(1, images // BATCH)
    with torch.inference_mode(), accel.autocast():
        for _ in range(3):
            model(x)  # warm-up (on a GPU: kernel selection, allocator)
        accel.sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        accel.sync()
    return steps * BATCH / (time.perf_counter() - start)


def run_loops(args, teacher: Path, shards: list[str], stage_cpus: int, accel: Accel, work: Path) -> dict[str, dict]:
    """Every requested loop variant on the same shards; ``{name: {"images_per_s", ...}}``."""
    from stages.models.factory import load_model

    model, card = load_model(teacher)
    model = accel.model(model)
    loops: dict[str, dict] = {}
    for variant in args.variants.split(","):
        if variant == "serial":
            runs = {"serial": label_serial(model, card, shards, accel, BATCH, stage_cpus)}
        elif variant == "loader":
            settings = (args.loader or f"{stage_cpus}x{stage_cpus}").split(",")
            grid = [tuple(int(v) for v in wt.split("x")) for wt in settings]
            runs = {f"loader-{w}x{t}": label_loader(model, card, shards, accel, BATCH, w, t) for w, t in grid}
        elif variant == "procs":
            runs = {"procs": label_procs(teacher, shards, stage_cpus, args.gpu, work / "procs", BATCH)}
        else:
            raise SystemExit(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS)}")
        for name, run in runs.items():
            if run["images"] != args.images:
                raise RuntimeError(f"{name}: labeled {run['images']} of {args.images} images")
            run["images_per_s"] = round(run.pop("images") / run["seconds"], 1)
            run["seconds"] = round(run["seconds"], 1)
            loops[name] = run
            print(f"loop {name:<12} {run['images_per_s']:8.0f} img/s ({run['workers']} workers)", flush=True)
    torch.set_num_threads(args.threads)
    return loops


def run_stage(args, teacher: Path, shards: list[str], out: Path) -> tuple[dict, float, PeakRss, object]:
    import ray

    from pipeline.distributed.executor import RayExecutor
    from pipeline.distributed.runtime import init_ray
    from stages.core.stage import LabelResources
    from stages.models.factory import model_sha
    from stages.pseudo_label import PseudoLabelConfig, label_shards
    from stages.storage.layout import ModelFiles

    init_ray(num_cpus=os.cpu_count())
    print(f"Ray booted and idle after {wait_until_idle():.1f} s more", flush=True)
    actors = args.actors or (1 if args.gpu else 0)
    resources = LabelResources(
        actors=actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=1 / actors if args.gpu else 0.0,
        threads=args.actor_threads,
        decode=args.decode,
        cpu_decoder=args.cpu_decoder,
        decode_cpus=args.decode_cpus,
    )
    assert resources.actor_count(ray.cluster_resources()) == stage_actors(args)
    sha, cfg = model_sha(ModelFiles(teacher)), PseudoLabelConfig(batch_size=BATCH)
    with PeakRss() as rss:
        start = time.perf_counter()
        summary = label_shards(teacher, sha, shards, out, cfg, 3, resources, RayExecutor())
        seconds = time.perf_counter() - start
    if summary["rows"] != args.images:
        raise RuntimeError(f"stage: labeled {summary['rows']} of {args.images} images")
    return summary, seconds, rss, resources


def stage_actors(args) -> int:
    """The stage's actor count, as ``LabelResources.actor_count`` gives it on this machine's local Ray (decode tasks
    on CPUs alone: one task's CPUs left to them)."""
    if args.actors:
        return args.actors
    reserved = args.decode_cpus if args.decode == "tasks" else 0.0
    return 1 if args.gpu else max(1, int(((os.cpu_count() or 1) - reserved) // args.cpus_per_actor))


def held_cpus(args) -> int:
    """The CPUs the stage holds, which every loop is given too: its actors', or with decode tasks the machine's
    (the tasks take what the actors leave)."""
    if args.decode == "tasks":
        return os.cpu_count() or 1
    return math.ceil(stage_actors(args) * args.cpus_per_actor)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--image-size", type=int, default=64, help="stored image size (pixels, square)")
    parser.add_argument("--input-size", type=int, default=0, help="model input size (0 = --image-size)")
    parser.add_argument("--encode", choices=ENCODINGS, default="jpeg")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the bare pass")
    parser.add_argument("--actors", type=int, default=0, help="label actors (0 = the stage's default: one per CPU)")
    parser.add_argument("--actor-threads", type=int, default=0, help="torch threads per actor (0 = one per CPU held)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each label actor holds")
    parser.add_argument("--gpu", action="store_true", help="every variant on the GPU; the stage's actors share it")
    parser.add_argument(
        "--decode",
        choices=("cpu", "gpu", "tasks"),
        default="cpu",
        help="where the stage decodes: cpu (actor threads), gpu (nvJPEG on the actor's GPU), tasks (CPU decode tasks)",
    )
    parser.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task (--decode tasks)")
    parser.add_argument("--cpu-decoder", default="pil", help="the stage's CPU decoding backend (default: the loops')")
    parser.add_argument("--shards", type=Path, help="keep the generated shards here and reuse them next time")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"loops to time, of {', '.join(VARIANTS)}")
    parser.add_argument("--loader", default="", help="loader settings WxT[,WxT...] (default stage_cpus x stage_cpus)")
    parser.add_argument("--skip-loop", action="store_true", help="only the stage (memory runs, more actors)")
    add_result_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    accel = Accel(args.gpu)
    torch.set_num_threads(args.threads)
    input_size = args.input_size or args.image_size
    cpus = held_cpus(args)
    with tempfile.TemporaryDirectory(prefix="bench-pl-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards = make_shards(args.shards or root / "shards", args.images, args.image_size, args.encode)
        print(f"{args.images} images in {len(shards)} shards ready in {time.perf_counter() - t0:.1f} s", flush=True)
        save_teacher(root / "teacher", args.model, input_size)
        from stages.models.factory import load_model

        bare_model = accel.model(load_model(root / "teacher")[0])
        bare = bench_bare(bare_model, min(args.images, 50_000 if args.gpu else 5_000), input_size, accel)
        del bare_model
        print(f"bare  {bare:8.0f} img/s on {accel.describe()}", flush=True)
        loops = {} if args.skip_loop else run_loops(args, root / "teacher", shards, cpus, accel, root)
        summary, seconds, rss, resources = run_stage(args, root / "teacher", shards, root / "out")
    stage, startup = args.images / seconds, summary["startup_seconds"]
    print(f"stage {stage:8.0f} img/s ({seconds:.1f} s, of which {startup:.1f} s actor start-up)", flush=True)
    best = max(loops, key=lambda k: loops[k]["images_per_s"]) if loops else None
    best_rate = loops[best]["images_per_s"] if best else None
    result = {
        "bench": "pseudo_label",
        "setting": f"{'gpu' if args.gpu else 'cpu'} {args.model} {args.image_size}px {args.encode}"
        + {"cpu": "", "gpu": " gpu-decode", "tasks": " decode-tasks"}[args.decode]
        + (f" {args.cpu_decoder}" if args.cpu_decoder != "pil" else ""),
        "images": args.images,
        "image_size": args.image_size,
        "input_size": input_size,
        "encode": args.encode,
        "model": args.model,
        "stage_images_per_s": round(stage, 1),
        "loop_best": best,
        "loop_best_images_per_s": best_rate,
        "ratio": round(stage / best_rate, 3) if best_rate else None,
        "loops": loops,
        # the decode workers (loader) or processes (procs) each parallel loop was given: stage_cpus by default
        "loop_workers": min((v["workers"] for k, v in loops.items() if k != "serial"), default=None),
        "loop_best_workers": loops[best]["workers"] if best else None,
        "stage_cpus": cpus,
        "bare_images_per_s": round(bare, 1),
        "ratio_bare": round(stage / bare, 3),
        "stage_seconds": round(seconds, 1),
        "stage_startup_s": round(startup, 1),
        "stage_after_startup_images_per_s": round(args.images / (seconds - startup), 1),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_process": rss.peak_process.split()[0] if rss.peak_process else "",
        "peak_object_store_shared_mb": round(rss.peak_shared / 2**20, 1),
        "actors": stage_actors(args),
        "actor_threads": resources.torch_threads(),
        "cpus_per_actor": args.cpus_per_actor,
        "decode": args.decode,
        "decode_cpus": args.decode_cpus if args.decode == "tasks" else None,
        "stage_decode": summary["decode"],  # shards per decoder that actually ran (gpu asked of a CPU actor: cpu)
        "cpu_decoder": args.cpu_decoder,
        "stage_decoders": summary.get("decoders"),  # shards per CPU decoding backend that ran (after fallbacks)
        "device": accel.describe(),
    }
    save_result(result, "pseudo_label", args)


if __name__ == "__main__":
    main()
