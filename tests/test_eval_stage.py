"""The evaluate stage: prediction sidecars per shard and split, written in process or by Ray actors, and metrics
read back from them that equal scoring the decoded images in memory."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.distributed.executor import RayExecutor
from stages.core.stage import InProcess, LabelResources
from stages.data.corruptions import corrupt
from stages.data.shards import expand_shards, load_labeled
from stages.evaluate import EvalTask, eval_metrics, eval_sidecar, evaluate, evaluate_tasks, predict_probs, split_name
from stages.models.factory import ModelSpec, create_model, load_model, model_card, save_model
from stages.storage.files import sha256_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    model = create_model(ModelSpec("resnet10t"), 10, 1, noised=False)
    save_model(model, folder, model_card(ModelSpec("resnet10t"), 10, 1, 16, [0.5], [0.5]))
    return folder


def _tasks(test, val, corruption=("gaussian_noise", 3)):
    tasks = [EvalTask(s, "test") for s in test] + [EvalTask(s, "val") for s in val]
    name, severity = corruption
    return tasks + [EvalTask(s, split_name(name, severity), name, severity) for s in test]


def run_evaluation(model_dir, sha, tasks, out, resources, only, executor=None):
    return evaluate_tasks(model_dir, sha, tasks, out, 1, resources, executor or InProcess(False), only, 0, False)


def test_sidecar_metrics_equal_scoring_in_memory_and_a_resume_skips_what_this_model_did(
    digits_root, model_dir, tmp_path
):
    test = expand_shards([f"{digits_root}/test/*.tar"])
    labeled = expand_shards([f"{digits_root}/labeled/*.tar"])
    held = load_labeled(labeled[:1], 10, 1)
    only = frozenset(held.keys[:7])  # a carved validation split: 7 keys of the first labeled shard
    sha = sha256_file(model_dir / "model.safetensors")
    tasks = _tasks(test, labeled[:1])
    out = tmp_path / "eval"
    summary = run_evaluation(model_dir, sha, tasks, out, LabelResources(), {"val": only})
    assert summary["ran_as"] == "in-process" and summary["devices"] == {"cpu": len(tasks)} and not summary["resumed"]
    got = eval_metrics(out, test, 10, labeled[:1], [("gaussian_noise", 3)])

    model, card = load_model(model_dir)
    decoded = load_labeled(test, 10, 1)
    want = evaluate(model, card, decoded)
    assert got["test_top1"] == pytest.approx(want["test_top1"]) and got["confusion"] == want["confusion"]
    assert got["test_ece"] == pytest.approx(want["test_ece"], abs=1e-6) and got["test_images"] == len(decoded)
    assert got["val_images"] == 7
    val_probs = predict_probs(model, held.take(list(range(7))).images, card)
    assert got["val_top1"] == pytest.approx(float((val_probs.argmax(1) == held.labels[:7]).mean()))
    noisy = [corrupt(im, "gaussian_noise", 3, 0, k) for k, im in zip(decoded.keys, decoded.images, strict=True)]
    noisy_top1 = float((predict_probs(model, noisy, card).argmax(1) == decoded.labels).mean())
    assert got["corruption_top1"]["per_severity"]["gaussian_noise"]["3"] == pytest.approx(noisy_top1)

    table = pq.read_table(eval_sidecar(out, "test", test[0]))
    meta = table.schema.metadata
    assert meta[b"device"] == b"cpu" and meta[b"made_by"] == tasks[0].made_by(sha, 0, None).encode()
    assert "probs" in table.column_names
    assert "topk_idx" in pq.read_table(eval_sidecar(out, split_name("gaussian_noise", 3), test[0])).column_names

    again = run_evaluation(model_dir, sha, tasks, out, LabelResources(), {"val": only})
    assert again["resumed"] == len(tasks) and again["rows"] == 0
    other = run_evaluation(model_dir, "0" * 64, tasks[:1], out, LabelResources(), None)
    assert other["resumed"] == 0 and other["rows"] == len(load_labeled(test[:1], 10, 1))  # another model: redone


def test_ray_actors_write_the_same_predictions(ray_session, digits_root, model_dir, tmp_path):
    test = expand_shards([f"{digits_root}/test/*.tar"])
    tasks = _tasks(test, [])
    sha = sha256_file(model_dir / "model.safetensors")
    local = run_evaluation(model_dir, sha, tasks, tmp_path / "a", LabelResources(), None)
    actors = run_evaluation(model_dir, sha, tasks, tmp_path / "b", LabelResources(actors=1), None, RayExecutor(False))
    assert actors["ran_as"] == "ray" and actors["rows"] == local["rows"] > 0
    for task in tasks:
        a = pq.read_table(eval_sidecar(tmp_path / "a", task.split, task.shard))
        b = pq.read_table(eval_sidecar(tmp_path / "b", task.split, task.shard))
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        assert np.array_equal(a.column("label").to_numpy(), b.column("label").to_numpy())
