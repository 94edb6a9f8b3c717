"""The hand-written peers of the pseudo-label stage: what a competent user writes instead of the Ray stage.

Used by ``bench/pseudo_label.py``; each variant decodes with the stage's own functions
(``stages.data.shards.decode_image``,
``stages.models.transforms.clean_transform``), runs the same model and batch size, and brings the soft labels back to
the host:

- ``serial``: one process, webdataset reading and decoding in series with the forward pass (the old bench loop);
- ``loader``: ``wds.WebLoader`` with ``workers`` decode processes feeding one forward process of ``threads`` torch
  threads (``pin_memory`` on a GPU);
- ``procs``: ``n`` independent processes, each labeling every n-th shard with one torch thread and saving its
  labels (keys + probabilities, one ``.npz`` per shard): the simplest parallel script. Timed from the first
  process launch to the last exit, so its imports and model loads count, as the stage's actor start-up does.

This file is also that script: ``python bench/label_loops.py --part I --of N --teacher DIR --shards LIST --out DIR``.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import Accel  # noqa: E402

from stages.data.shards import decode_image, image_field  # noqa: E402
from stages.models.transforms import clean_transform  # noqa: E402


class Decode:
    """Raw webdataset sample -> (key, image tensor), as the stage decodes (a class: DataLoader workers pickle it)."""

    def __init__(self, card: dict) -> None:
        self.transform = clean_transform(card["input_size"][-1], card["mean"], card["std"])
        self.channels = card["input_size"][0]

    def __call__(self, sample: dict) -> tuple[str, torch.Tensor]:
        return sample["__key__"], self.transform(decode_image(image_field(sample), self.channels))


def _forward(model: torch.nn.Module, x: torch.Tensor, accel: Accel) -> torch.Tensor:
    with accel.autocast():
        logits = model(accel.batch(x))
    return torch.softmax(logits.float(), dim=-1).cpu()  # the labels come back to the host, as the stage's do


def _dataset(shards: list[str], decode: Decode, batch: int):
    import webdataset as wds

    # split_by_worker: each DataLoader worker reads its own shards (the default, written out for the reader)
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker)
    return ds.map(decode).batched(batch, partial=True)


@torch.inference_mode()
def label_serial(model, card: dict, shards: list[str], accel: Accel, batch: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    n, probs, start = 0, [], time.perf_counter()
    for keys, x in _dataset(shards, Decode(card), batch):
        probs.append(_forward(model, x, accel))
        n += len(keys)
    accel.sync()
    return {"images": n, "seconds": time.perf_counter() - start, "workers": 0, "threads": threads}


@torch.inference_mode()
def label_loader(model, card: dict, shards: list[str], accel: Accel, batch: int, workers: int, threads: int) -> dict:
    import webdataset as wds

    torch.set_num_threads(threads)
    start = time.perf_counter()
    loader = wds.WebLoader(
        _dataset(shards, Decode(card), batch),
        batch_size=None,  # batched in the workers: one tensor per batch crosses the process boundary
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=accel.cuda,
    )
    n, probs = 0, []
    for keys, x in loader:
        probs.append(_forward(model, x, accel))
        n += len(keys)
    accel.sync()
    return {"images": n, "seconds": time.perf_counter() - start, "workers": workers, "threads": threads}


def label_procs(teacher: Path, shards: list[str], n: int, gpu: bool, out: Path, batch: int) -> dict:
    """``n`` processes of this file, each labeling ``shards[i::n]`` with one torch thread."""
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "shards.json"
    listing.write_text(json.dumps(shards))
    start = time.perf_counter()
    children = []
    for i in range(n):
        cmd = [sys.executable, __file__, "--part", str(i), "--of", str(n), "--teacher", str(teacher)]
        cmd += ["--shards", str(listing), "--out", str(out), "--batch", str(batch), "--launched", str(time.time())]
        children.append(subprocess.Popen([*cmd, *(["--gpu"] if gpu else [])], stdout=subprocess.PIPE, text=True))
    parts = []
    for child in children:
        stdout, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"procs: a labeling process failed (exit {child.returncode})")
        parts.append(json.loads(stdout.strip().splitlines()[-1]))
    seconds = time.perf_counter() - start
    images = sum(p["images"] for p in parts)
    return {
        "images": images,
        "seconds": seconds,
        "workers": n,
        "threads": 1,
        "startup_s": round(max(p["ready_s"] for p in parts), 2),  # launch -> model loaded, the slowest process
        "after_startup_images_per_s": round(sum(p["images"] / p["label_s"] for p in parts), 1),
    }


@torch.inference_mode()
def run_part(args: argparse.Namespace) -> None:
    """One process of ``procs``: what a user's script does from its first line."""
    from stages.models.factory import load_model

    torch.set_num_threads(1)
    accel = Accel(args.gpu)
    model, card = load_model(args.teacher)
    model = accel.model(model)
    ready = time.time()
    shards = json.loads(args.shards.read_text())[args.part :: args.of]
    decode, n = Decode(card), 0
    for shard in shards:
        keys, probs = [], []
        for k, x in _dataset([shard], decode, args.batch):
            probs.append(_forward(model, x, accel))
            keys += k
        n += len(keys)
        np.savez(args.out / f"{Path(shard).stem}.npz", keys=np.array(keys), probs=torch.cat(probs).numpy())
    accel.sync()
    print(json.dumps({"images": n, "ready_s": ready - args.launched, "label_s": time.time() - ready}))


def main() -> None:
    parser = argparse.ArgumentParser(description="one process of the procs loop (see the module docstring)")
    parser.add_argument("--part", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True, help="a JSON list of every shard")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--launched", type=float, default=time.time(), help="the parent's launch time (time.time())")
    parser.add_argument("--gpu", action="store_true")
    run_part(parser.parse_args())


if __name__ == "__main__":
    main()
