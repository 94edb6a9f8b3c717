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

from stages.data import decode_image, iter_raw_samples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_two_label_actors_share_one_gpu_and_agree_with_the_cpu(ray_session, digits_root, tmp_path):
    from pipeline.config import LabelResources
    from pipeline.distributed.pseudo_label import run_pseudo_label
    from stages.models import ModelSpec, create_model, load_model, model_card, save_model
    from stages.pseudo_label import PseudoLabelConfig, sidecar_path
    from stages.transforms import clean_transform

    spec = ModelSpec("resnet10t")
    torch.manual_seed(0)
    model = create_model(spec, 10, 1, noised=False)
    with torch.no_grad():  # move the BatchNorm statistics, so that eval mode differs from a fresh model
        model.train()(torch.randn(32, 1, 16, 16))
    save_model(model, tmp_path / "teacher", model_card(spec, 10, 1, 16, (0.5,), (0.5,)))
    shards = sorted(str(p) for p in (digits_root / "unlabeled").glob("*.tar"))

    summary = run_pseudo_label(
        str(tmp_path / "teacher"),
        shards,
        str(tmp_path / "labels"),
        PseudoLabelConfig(batch_size=256, temperature=2.0),
        1,
        LabelResources(actors=2, gpus_per_actor=0.5),
        progress=False,
    )
    assert summary["devices"] == {"cuda": len(shards)}

    reference, _ = load_model(tmp_path / "teacher")  # float32 on the CPU
    transform = clean_transform(16, (0.5,), (0.5,))
    got, want = [], []
    for shard in shards:
        samples = list(iter_raw_samples(shard))
        table = pq.read_table(sidecar_path(tmp_path / "labels", shard))
        assert table.column("key").to_pylist() == [s["__key__"] for s in samples]
        got.append(np.asarray(table.column("probs").to_pylist(), dtype=np.float32))
        x = torch.stack([transform(decode_image(s["png"], 1)) for s in samples])
        with torch.inference_mode():
            want.append(torch.softmax(reference(x) / 2.0, dim=-1).numpy())
    got_all, want_all = np.concatenate(got), np.concatenate(want)
    agree = float((got_all.argmax(1) == want_all.argmax(1)).mean())
    err = float(np.abs(got_all - want_all).max())
    print(f"\nGPU (bf16) vs CPU (float32) labels: argmax agreement {agree:.4f}, max |p diff| {err:.4f}")
    assert agree >= 0.97
    assert err < 0.05  # bf16 logits: a few parts in a thousand, amplified little by the softmax at T=2
    assert err > 0, "bit-identical to float32 on the CPU: the actors did not run the bf16 GPU path"


def test_a_ray_train_worker_trains_on_the_gpu(ray_session, digits_root, tmp_path):
    from pipeline.config import TrainResources
    from pipeline.distributed.train import run_training
    from tests.test_faults import digits_train_plan

    plan = digits_train_plan(digits_root, tmp_path, 3)
    final = run_training(plan, str(tmp_path / "ray_train"), "gpu", TrainResources(use_gpu=True), tmp_path / "final")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\nepochs {[r['epoch'] for r in rows]}, loss {[round(r['loss'], 3) for r in rows]}, on {rows[0]['device']}")
    assert [r["device"] for r in rows] == ["cuda"] * 3
    assert final["step"] == 21  # ceil(100 labeled / 16) = 7 steps per epoch
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "final" / "final-model.safetensors").exists()
