"""README "Your own images", end to end: an ImageFolder tree of named classes (the digits as PNG files under zero/ …
nine/) through prepare-folder (Ray tasks), one round of iterate through Ray (MLflow tracking on), rounds, predict --json
and export (ONNX, TorchScript). The README's commands are read from the README and run in order, once, by the
module fixture; the tests check what they left.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from stages.data.shards import expand_shards, iter_raw_samples, load_labeled
from stages.models.export import read_metadata, run_onnx, run_program
from stages.models.factory import load_model
from stages.models.transforms import card_transform

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# What the test adds to the README's commands: tiny model and epochs, and the Ray path of prepare-folder (the
# README's tree is small enough to be written in-process).
EXTRA = {
    "prepare-folder": ["--parallel", "ray", "--shard-size", "24KB", "--no-progress"],
    "iterate": [
        "--no-progress",
        *("--set", "ladder=[{model: test_resnet, randaug_n: 1, randaug_m: 3.0}]", "--set", "data.image_size=24"),
        *("--set", "teacher.epochs=1", "--set", "student.epochs=1", "--set", "select.floor=0.0"),
        *("--set", "teacher.batch_size=16", "--set", "student.batch_size=16", "--set", "student.unlabeled_ratio=1.0"),
        *("--set", "teacher.loader_workers=0", "--set", "student.loader_workers=0"),
        *("--set", "resources.torch_threads=2"),
        *("--set", "data.val_per_class=2"),  # a validation split, so the trackers have val_top1 and a best round
    ],
}


def readme_commands() -> list[list[str]]:
    """The ``python -m pipeline`` lines of the README's "Your own images" section, split like a shell would."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line)[3:] for line in section.splitlines() if line.startswith("python -m pipeline ")]


def write_photos(root: Path) -> None:
    """The digits as PNG files: 10 labeled per class, 60 test, 200 unlabeled in nested folders, plus one broken
    image and one note (both must be skipped and listed)."""
    from stages.data.digits import split_digits

    split = split_digits(0)
    for name, xs, ys in (("labeled", split.labeled_x, split.labeled_y), ("test", split.test_x[:60], split.test_y[:60])):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            path = root / name / NAMES[y] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x, "L").save(path)
    for i, x in enumerate(split.unlabeled_x[:200]):
        path = root / "unlabeled" / f"batch-{i % 3}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x, "L").save(path)
    (root / "unlabeled" / "broken.png").write_bytes(b"\x89PNG but cut short")
    (root / "labeled" / "zero" / "README.txt").write_text("ten zeros")


@pytest.fixture(scope="module")
def walkthrough(ray_session, tmp_path_factory):
    """Run the README's commands in a fresh folder: ``(folder, {command index: (exit code, stdout)})``."""
    work = tmp_path_factory.mktemp("own")
    write_photos(work / "photos")
    test_images = sorted(str(p.relative_to(work)) for p in (work / "photos" / "test").rglob("*.png"))[:3]
    results = {}
    before = os.getcwd()
    os.chdir(work)
    try:
        for i, argv in enumerate(readme_commands()):
            argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
            if any(a.startswith("photos/test/") for a in argv):
                argv = [a for a in argv if not a.startswith("photos/test/")] + test_images
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(argv + EXTRA.get(argv[0], []))
            results[i] = (argv[0], code, out.getvalue())
    finally:
        os.chdir(before)
    return work, results


def _output(results: dict, command: str, nth: int = 0) -> str:
    return [out for name, _, out in results.values() if name == command][nth]


def test_every_readme_command_ran(walkthrough):
    _, results = walkthrough
    assert [name for name, _, _ in results.values()] == [
        "prepare-folder",
        "iterate",
        "rounds",
        "predict",
        "export",
        "export",
    ]
    assert all(code == 0 for _, code, _ in results.values()), results


def test_prepare_folder_wrote_named_shards_and_listed_what_it_skipped(walkthrough):
    work, results = walkthrough
    out = work / "data" / "own"
    assert json.loads((out / "classes.json").read_text()) == {str(i): n for i, n in enumerate(sorted(NAMES))}
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["skipped_count"] == 2 and "skipped 2 file(s)" in _output(results, "prepare-folder")
    assert {Path(s["path"]).name for s in summary["skipped"]} == {"broken.png", "README.txt"}
    assert {s: i["samples"] for s, i in summary["splits"].items()} == {"labeled": 100, "test": 60, "unlabeled": 200}
    assert summary["splits"]["unlabeled"]["shards"] > 1  # several Ray tasks
    shard = sorted((out / "labeled").glob("*.tar"))[0]
    sample = next(iter_raw_samples(str(shard)))
    name = sorted(NAMES)[int(sample["cls"])]
    originals = [p.read_bytes() for p in (work / "photos" / "labeled" / name).glob("*.png")]
    assert sample["png"] in originals  # the file's own bytes


def test_the_run_names_its_classes_everywhere(walkthrough):
    work, results = walkthrough
    run = work / "runs" / "own1"
    names = sorted(NAMES)
    for r in (0, 1):
        card = json.loads((run / f"round-{r:03d}" / "model.json").read_text())
        metrics = json.loads((run / f"round-{r:03d}" / "metrics.json").read_text())
        assert card["classes"] == names and metrics["classes"] == names
        assert card["augment"] == "natural" and card["input_size"] == [3, 24, 24]
    assert '<th scope="row">zero</th>' in (run / "report.html").read_text()
    table = _output(results, "rounds").split("per-class test top-1 by round:\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["class", "round", "0"] and sorted(line.split()[0] for line in table[2:12]) == names


def test_predict_json_gives_class_names(walkthrough):
    _, results = walkthrough
    predictions = json.loads(_output(results, "predict"))
    assert len(predictions) == 3
    for p in predictions:
        assert p["class"] in NAMES and p["class"] == sorted(NAMES)[p["index"]]
        assert p["top"][0]["class"] == p["class"] and 0 <= p["probability"] <= 1


def _test_set(work: Path, r: int | None = None):
    """The test images as round ``r``'s model sees them (default: the run's best round, which ``export`` takes)."""
    if r is None:
        r = json.loads((work / "runs" / "own1" / "run.json").read_text())["stop"]["best_round"]
    model, card = load_model(work / "runs" / "own1" / f"round-{r:03d}")
    test = load_labeled(expand_shards([str(work / "data" / "own" / "test" / "*.tar")]), 10, 3)
    x = torch.stack([card_transform(card)(im) for im in test.images])
    with torch.inference_mode():
        reference = model(x).numpy()
    return x, reference, card


def test_onnx_export_agrees_with_pytorch_on_every_test_image(walkthrough):
    work, results = walkthrough
    x, reference, card = _test_set(work)
    got = run_onnx(work / "own1.onnx", x.numpy())
    assert len(x) == 60 and np.array_equal(got.argmax(1), reference.argmax(1))
    assert np.abs(got - reference).max() < 1e-3
    meta = read_metadata(work / "own1.onnx")
    assert json.loads(meta["classes"]) == sorted(NAMES)
    pre = json.loads(meta["preprocessing"])
    assert pre["input_size"] == [3, 24, 24] and pre["mean"] == card["mean"] and pre["resize"] == "centre_crop"
    assert "largest |logit difference| to PyTorch" in _output(results, "export")


def test_the_pt2_export_of_the_teacher_carries_names_and_preprocessing(walkthrough):
    work, _ = walkthrough
    meta = read_metadata(work / "own1-teacher.pt2")
    assert json.loads(meta["classes"]) == sorted(NAMES) and meta["timm_model"] == "test_resnet"
    model, card = load_model(work / "runs" / "own1" / "round-000")
    x = torch.stack([card_transform(card)(Image.new("RGB", (30, 20), (i * 40, 0, 0))) for i in range(3)])
    with torch.inference_mode():
        assert np.allclose(run_program(work / "own1-teacher.pt2", x), model(x).numpy(), atol=1e-4)


def test_mlflow_has_a_parent_run_and_one_run_per_round(walkthrough):
    from mlflow.tracking import MlflowClient

    work, _ = walkthrough
    status = json.loads((work / "runs" / "own1" / "run.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=status["uri"])
    assert status["uri"] == (work / "mlruns").as_uri()
    children = {r: client.get_run(run_id) for r, run_id in status["rounds"].items()}
    assert sorted(children) == ["0", "1"]
    metrics = json.loads((work / "runs" / "own1" / "round-001" / "metrics.json").read_text())
    got = children["1"].data
    assert got.tags["mlflow.parentRunId"] == status["parent_run_id"]
    assert got.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
    assert got.metrics["val_top1"] == pytest.approx(metrics["val_top1"])  # a user compares runs on validation
    stop = json.loads((work / "runs" / "own1" / "run.json").read_text())["stop"]
    parent = client.get_run(status["parent_run_id"]).data
    assert parent.tags["noisy_student.best_round"] == str(stop["best_round"])
    assert parent.metrics["best_round"] == stop["best_round"]
    assert parent.metrics["best_val_top1"] == pytest.approx(stop["best_val_top1"])
    assert got.metrics["top1_zero"] == pytest.approx(metrics["per_class_top1"][sorted(NAMES).index("zero")])
    assert got.params["model.model"] == "test_resnet"
    artifacts = {a.path for a in client.list_artifacts(status["rounds"]["1"], "model")}
    assert artifacts == {"model/model.safetensors", "model/model.json", "model/metrics.json"}
    assert client.get_run(status["parent_run_id"]).data.params["data.augment"] == "natural"


def test_a_tracking_failure_is_a_warning_not_a_stopped_run(tiny_config, tmp_path, caplog):
    from pipeline.report.tracking import track_round

    cfg = tiny_config("tracking.mlflow=nosuchscheme://nowhere")
    status: dict = {}
    with caplog.at_level("WARNING", logger="pipeline.report.tracking"):
        track_round(cfg, tmp_path / "no-run", 0, status)  # neither the store nor the run exists: no exception
    assert "round 0 not logged to MLflow" in caplog.text
    assert status["tracking"].get("rounds", {}) == {}
