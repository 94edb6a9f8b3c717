"""The GPU paths of the two Ray stages (marker ``gpu``; skipped where torch sees no CUDA device).

On a GPU machine: ``python -m pytest -m gpu -s tests/test_gpu.py``. The session's local Ray finds the GPU itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.data.shards import decode_image, iter_raw_samples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _teacher(tmp_path, channels: int, size: int, mean: tuple) -> str:
    """A resnet10t whose outputs differ between images: BatchNorm statistics moved, the head scaled up so the
    top two classes stand apart (a fresh head gives near-uniform outputs, where bf16 flips argmaxes at random)."""
    from stages.models.factory import ModelSpec, create_model, model_card, save_model

    spec = ModelSpec("resnet10t")
    torch.manual_seed(0)
    model = create_model(spec, 10, channels, noised=False)
    with torch.no_grad():
        model.train()(torch.randn(32, channels, size, size))
        scale = 10 / model.eval()(torch.randn(32, channels, size, size)).std()  # logits spread apart, not ~0.01
        model.get_classifier().weight.mul_(scale)
        model.get_classifier().bias.mul_(scale)
    save_model(model, tmp_path / "teacher", model_card(spec, 10, channels, size, mean, (0.5,) * channels))
    return str(tmp_path / "teacher")


def sidecar_path(out_dir, shard: str):
    from stages.storage.layout import sidecar_file

    return out_dir / sidecar_file(shard)


def run_pseudo_label(teacher, shards, out, cfg, channels, resources, progress=False) -> dict:
    """The pseudo-label stage's driver on the Ray executor (the label actors' pool)."""
    from pathlib import Path

    from pipeline.distributed.executor import RayExecutor
    from stages.pseudo_label import label_shards

    return label_shards(Path(teacher), "sha", shards, Path(out), cfg, channels, resources, RayExecutor(False), progress)


def _probs(labels_dir, shards) -> np.ndarray:
    tables = [pq.read_table(sidecar_path(labels_dir, shard)) for shard in shards]
    return np.concatenate([np.asarray(t.column("probs").to_pylist(), dtype=np.float32) for t in tables])


def _agree_but_for_near_ties(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """|p diff| small everywhere, and an argmax may differ only where the float32 top two are within 2 x that
    bound of each other (a true tie that any rounding may flip)."""
    err = float(np.abs(got - want).max())
    top2 = np.sort(want, axis=1)[:, -2:]
    flipped = got.argmax(1) != want.argmax(1)
    margin = top2[:, 1] - top2[:, 0]
    print(
        f"\n{what}: argmax agreement {1 - flipped.mean():.4f}, max |p diff| {err:.4f}, median margin "
        f"{np.median(margin):.3f}"
    )
    assert err < 0.05
    assert np.all(margin[flipped] <= 2 * err), "an argmax flipped where the classes were not tied"
    assert float(np.median(margin)) > 4 * err  # the check means something: most rows are far from a tie


def test_two_label_actors_share_one_gpu_and_agree_with_the_cpu(ray_session, digits_root, tmp_path):
    from stages.core.stage import LabelResources
    from stages.models.factory import load_model
    from stages.models.transforms import clean_transform
    from stages.pseudo_label import PseudoLabelConfig

    teacher = _teacher(tmp_path, 1, 16, (0.5,))
    shards = sorted(str(p) for p in (digits_root / "unlabeled").glob("*.tar"))

    summary = run_pseudo_label(
        teacher,
        shards,
        str(tmp_path / "labels"),
        PseudoLabelConfig(batch_size=256, temperature=2.0),
        1,
        LabelResources(actors=2, gpus_per_actor=0.5),
        progress=False,
    )
    assert summary["devices"] == {"cuda": len(shards)}

    reference, _ = load_model(teacher)  # float32 on the CPU
    transform = clean_transform(16, (0.5,), (0.5,))
    want = []
    for shard in shards:
        samples = list(iter_raw_samples(shard))
        table = pq.read_table(sidecar_path(tmp_path / "labels", shard))
        assert table.column("key").to_pylist() == [s["__key__"] for s in samples]
        x = torch.stack([transform(decode_image(s["png"], 1)) for s in samples])
        with torch.inference_mode():
            want.append(torch.softmax(reference(x) / 2.0, dim=-1).numpy())
    got_all, want_all = _probs(tmp_path / "labels", shards), np.concatenate(want)
    _agree_but_for_near_ties(got_all, want_all, "GPU (bf16) vs CPU (float32) labels")
    assert float(np.abs(got_all - want_all).max()) > 0, "bit-identical to float32: the bf16 GPU path did not run"


def test_gpu_decoding_labels_as_the_cpu_decoding_does(ray_session, tmp_path):
    """``label_decode: gpu``: RGB JPEG shards decoded by nvJPEG and resized on the GPU give the labels that PIL
    decoding gives, within bf16 and resize rounding; the summary says which decoder ran."""
    import io

    from PIL import Image

    from stages.core.stage import LabelResources
    from stages.data.shards import write_shards
    from stages.pseudo_label import PseudoLabelConfig, ShardLabeler

    rng = np.random.default_rng(0)
    samples = []
    for i in range(600):
        h, w = rng.integers(48, 160, size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, np.full((h, w), i % 10 / 10)], -1) * 200
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        samples.append({"__key__": f"p{i:04d}", "jpg": buf.getvalue()})
    shards = write_shards(samples, tmp_path / "jpegs", "jpegs", 3)
    teacher = _teacher(tmp_path, 3, 64, (0.5, 0.5, 0.5))
    cfg = PseudoLabelConfig(batch_size=128)
    resources = LabelResources(actors=1, gpus_per_actor=1.0, cpus_per_actor=2.0, decode="gpu")
    summary = run_pseudo_label(teacher, shards, str(tmp_path / "gpu"), cfg, 3, resources, progress=False)
    assert summary["decode"] == {"gpu": len(shards)} and summary["rows"] == len(samples)
    reference = ShardLabeler(teacher, str(tmp_path / "cpu"), cfg, 3, threads=2, decode="cpu")  # PIL, same GPU
    assert all(reference.process(shard, "m")["decode"] == "cpu" for shard in shards)
    _agree_but_for_near_ties(
        _probs(tmp_path / "gpu", shards), _probs(tmp_path / "cpu", shards), "nvJPEG vs PIL decoding (both bf16)"
    )


def test_a_ray_train_worker_trains_on_the_gpu(ray_session, digits_root, tmp_path):
    from stages.core.stage import TrainResources
    from tests.test_faults import digits_train_plan, run_training

    plan = digits_train_plan(digits_root, tmp_path, 3)
    final = run_training(plan, str(tmp_path / "ray_train"), "gpu", TrainResources(use_gpu=True), tmp_path / "final")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\nepochs {[r['epoch'] for r in rows]}, loss {[round(r['loss'], 3) for r in rows]}, on {rows[0]['device']}")
    assert [r["device"] for r in rows] == ["cuda"] * 3
    assert final["step"] == 21  # ceil(100 labeled / 16) = 7 steps per epoch
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "final" / "final-model.safetensors").exists()
