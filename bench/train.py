"""Training throughput: the real Ray Train stage vs a hand-written PyTorch loop vs the bare step.

    python bench/train.py [--steps 60] [--threads 2] [--repeat 3]
    python bench/train.py --gpu --loader-workers 8 --batch 512 --steps 100

Same model (``resnet18``, 32x32 RGB, 10 classes), batch size (128), optimizer (AdamW) and noise
(RandAugment n2 m9, dropout 0.2, drop path 0.1), on synthetic PNG/JPEG shards:

- ``stage``: ``pipeline.distributed.train.run_training`` through Ray Train, one worker, reading shards; images/s is
  the steady-state rate measured by the worker over its epochs (the first epoch, with DataLoader start-up,
  excluded), and ``stage_wall_s`` the whole ``fit()`` including Ray Train start-up;
- ``loop``: webdataset + DataLoader with the same decoding and RandAugment, the same steps (first epoch's
  worth excluded the same way);
- ``bare``: forward + backward + step on tensors already in memory.

With ``--gpu`` all three run on the GPU with bf16 autocast and channels_last, as the stage does there (the stage's
one worker holds the GPU: ``use_gpu``).

With ``--repeat N`` loop and stage alternate N times and the medians are reported (with each pair's ratio): this
machine's speed drifts by 10-20% between minutes, more than the difference being measured.

Final line: ``{"bench": "train", "stage_images_per_s": s, "loop_images_per_s": l, "bare_images_per_s": b,
"ratio": s/l, "ratio_bare": s/b, ...}``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Accel  # noqa: E402

from bench.pseudo_label import make_shards  # noqa: E402
from stages.models import ModelSpec, create_model  # noqa: E402
from stages.train import TrainConfig, build_optimizer, noisy_student_loss  # noqa: E402

MODEL, SIZE, CLASSES = "resnet18", 32, 10
SPEC = ModelSpec(MODEL, drop_rate=0.2, drop_path_rate=0.1, randaug_n=2, randaug_m=9)
MEAN = STD = (0.5, 0.5, 0.5)


def label_shards(shards: list[str]) -> None:
    """Give the synthetic samples a class, in place (labeled shards need ``.cls``)."""
    import tarfile

    for path in shards:
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
                key = member.name.rsplit(".", 1)[0]
                cls = str(int(key[1:]) % CLASSES).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(cls)
                tar.addfile(info, io.BytesIO(cls))


def train_step(model, opt, x, y, cfg: TrainConfig, accel: Accel) -> None:
    """One step as the stage takes it: autocast forward and loss, backward, optimizer step."""
    x, y = accel.batch(x), y.to(accel.device, non_blocking=True)
    with accel.autocast():
        loss, _ = noisy_student_loss(model(x), y, torch.zeros(0, CLASSES, device=accel.device), cfg)
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_bare(cfg: TrainConfig, steps: int, accel: Accel) -> float:
    model = accel.model(create_model(SPEC, CLASSES, 3, noised=True).train())
    opt = build_optimizer(model, cfg)
    x, y = torch.randn(cfg.batch_size, 3, SIZE, SIZE), torch.randint(0, CLASSES, (cfg.batch_size,))
    x, y = accel.batch(x), y.to(accel.device)
    for i in range(steps + 3):
        if i == 3:
            accel.sync()
            start = time.perf_counter()
        train_step(model, opt, x, y, cfg, accel)
    accel.sync()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def bench_loop(cfg: TrainConfig, shards: list[str], steps: int, warmup: int, accel: Accel) -> float:
    import webdataset as wds
    from PIL import Image
    from torch.utils.data import DataLoader

    from stages.transforms import noised_transform

    transform = noised_transform(SIZE, MEAN, STD, SPEC.randaug_n, SPEC.randaug_m)

    def decode(sample):
        data = sample.get("png") or sample.get("jpg")
        return transform(Image.open(io.BytesIO(data)).convert("RGB")), int(sample["cls"])

    # resampled: an endless stream of shards (repeat=True alone stopped after one pass here)
    ds = wds.WebDataset(shards, resampled=True, shardshuffle=False, empty_check=False).shuffle(2048).map(decode)
    loader = DataLoader(
        ds.batched(cfg.batch_size),
        batch_size=None,
        num_workers=cfg.loader_workers,
        prefetch_factor=4,
        pin_memory=accel.cuda,
    )
    model = accel.model(create_model(SPEC, CLASSES, 3, noised=True).train())
    opt = build_optimizer(model, cfg)
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            accel.sync()
            start = time.perf_counter()
        if i == warmup + steps:
            break
        train_step(model, opt, x, y, cfg, accel)
    accel.sync()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def bench_stage(
    cfg: TrainConfig, shards: list[str], images: int, root: Path, threads: int, gpu: bool, name: str = "bench"
) -> tuple[float, float]:
    from pipeline.config import TrainResources
    from pipeline.distributed.runtime import init_ray
    from pipeline.distributed.train import run_training
    from stages.train import TrainPlan

    init_ray(num_cpus=os.cpu_count())
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    plan = TrainPlan(
        spec=SPEC,
        cfg=cfg,
        num_classes=CLASSES,
        channels=3,
        image_size=SIZE,
        mean=MEAN,
        std=STD,
        labeled=tuple(shards),
        pseudo=(),
        labeled_count=images,
        pseudo_count=0,
        metrics_path=str(root / "metrics.jsonl"),
        threads=threads,
    )
    start = time.perf_counter()
    run_training(plan, str(root / "ray_train"), name, TrainResources(use_gpu=gpu), root / "final")
    wall = time.perf_counter() - start
    epochs = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steady-state steps timed in each of stage and loop")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--gpu", action="store_true", help="all three on the GPU (the stage with use_gpu)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="loop and stage alternated this many times; the medians are reported (this machine drifts 10-20%%)",
    )
    args = parser.parse_args()
    accel = Accel(args.gpu)
    torch.set_num_threads(args.threads)
    per_epoch = 20  # steps per epoch: the stage times epochs 2.., the loop skips as many warm-up steps
    epochs = 1 + max(1, round(args.steps / per_epoch))
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=args.batch,
        optimizer="adamw",
        lr=1e-3,
        warmup_epochs=0,
        loader_workers=args.loader_workers,
        checkpoint_every=epochs,
        label_smoothing=0.1,
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        images = per_epoch * args.batch
        shards = make_shards(root / "shards", images)
        label_shards(shards)
        bare = bench_bare(cfg, min(args.steps, 30), accel)
        print(f"bare  {bare:7.0f} img/s on {accel.describe()}", flush=True)
        loops, stages, walls = [], [], []
        for i in range(args.repeat):
            loops.append(bench_loop(cfg, shards, (epochs - 1) * per_epoch, per_epoch, accel))
            print(f"loop  {loops[-1]:7.0f} img/s", flush=True)
            stage, wall = bench_stage(cfg, shards, images, root, args.threads, args.gpu, name=f"bench-{i}")
            stages.append(stage)
            walls.append(wall)
            print(f"stage {stage:7.0f} img/s (fit() wall {wall:.1f} s)", flush=True)
        loop, stage, wall = (statistics.median(v) for v in (loops, stages, walls))
    print(
        json.dumps(
            {
                "bench": "train",
                "stage_images_per_s": round(stage, 1),
                "loop_images_per_s": round(loop, 1),
                "bare_images_per_s": round(bare, 1),
                "ratio": round(stage / loop, 3),
                "ratio_bare": round(stage / bare, 3),
                "stage_wall_s": round(wall, 1),
                "ratios": [round(s / lo, 3) for s, lo in zip(stages, loops, strict=True)],
                "steps_timed": (epochs - 1) * per_epoch,
                "threads": args.threads,
                "loader_workers": args.loader_workers,
                "batch": args.batch,
                "device": accel.describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
