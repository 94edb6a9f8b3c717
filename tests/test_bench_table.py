"""``bench/table.py``: the README's benchmark tables come from the result files, and ``--check`` catches a figure
typed by hand. Standard library only, no bench is run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    """The module with the code-age check answering "as measured" (the made-up commits here are not in git)."""
    module = _load_table()
    module.changed_since = lambda commit, paths: None
    return module


def test_a_result_older_than_the_code_it_measures_is_marked():
    real = _load_table()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    first = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()[0]
    if first == head:
        pytest.skip("a shallow clone: one commit, no history to compare with")
    assert real.changed_since(head, ("stages",)) is None
    assert real.changed_since(first, ("stages",)) not in (None, "?")  # stages/ changed since the first commit
    assert real.changed_since("f" * 40, ("stages",)) == "?"
    result = {"bench": "select", "_file": "bench/results/x.json", "machine": {"date": "2026-12-01", "commit": first}}
    assert "**older than the code it measures**" in real._when(result)
    assert real._when(result, stale=lambda c, p: None).endswith(f"`{first[:7]}`")


MACHINE = {
    "cpu_model": "AMD EPYC",
    "cores": 2,
    "gpu": None,
    "date": "2026-12-01T10:00:00Z",
    "commit": "0123456789abcdef",
    "command": "python bench/pseudo_label.py --images 200000 --image-size 64 --encode jpeg",
}
PSEUDO_LABEL = {
    "bench": "pseudo_label",
    "setting": "cpu resnet18 64px jpeg",
    "images": 200000,
    "stage_images_per_s": 1669.0,
    "loop_best": "procs",
    "loop_best_images_per_s": 1960.0,
    "ratio": 0.852,
    "loops": {
        "serial": {"images_per_s": 1440.0, "workers": 0},
        "loader-2x2": {"images_per_s": 1326.0, "workers": 2},
        "procs": {"images_per_s": 1960.0, "workers": 2},
    },
    "stage_cpus": 2,
    "loop_workers": 2,
    "bare_images_per_s": 2300.0,
    "machine": MACHINE,
}
ROW = (
    "| pseudo_label | cpu resnet18 64px jpeg | 1,669 | procs 1,960 | 0.85 | 2,300 | "
    "200,000 images; loops (2 CPUs each): serial 1,440, loader-2x2 1,326, procs 1,960 | AMD EPYC, 2 cores | "
    "[2026-12-01](bench/results/pseudo_label-20261201T100000Z.json) `0123456` |"
)
README = "# Project\n\n## Benchmarks\n\n<!-- bench-table:start -->\nold figures\n<!-- bench-table:end -->\n\nAfter.\n"


def _write(folder: Path, name: str, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(result))


def test_a_results_file_renders_into_the_expected_row(table, tmp_path):
    _write(tmp_path / "results", "pseudo_label-20261201T100000Z.json", PSEUDO_LABEL)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert table.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ROW in text.splitlines()
    assert "old figures" not in text
    assert text.startswith("# Project\n\n## Benchmarks\n\n<!-- bench-table:start -->\n")
    assert text.endswith("<!-- bench-table:end -->\n\nAfter.\n")  # nothing outside the markers is touched


def test_the_latest_result_per_setting_is_shown(table, tmp_path):
    older = {**PSEUDO_LABEL, "stage_images_per_s": 1000.0, "machine": {**MACHINE, "date": "2026-11-01T10:00:00Z"}}
    other = {**PSEUDO_LABEL, "setting": "cpu resnet18 224px jpeg", "stage_images_per_s": 90.0}
    _write(tmp_path, "pseudo_label-20261101T100000Z.json", older)
    _write(tmp_path, "pseudo_label-20261201T100000Z.json", PSEUDO_LABEL)
    _write(tmp_path, "pseudo_label-20261201T110000Z.json", other)
    rows = table.throughput_rows(table.load_results(tmp_path))
    assert [(r[1], r[2]) for r in rows] == [("cpu resnet18 224px jpeg", "90"), ("cpu resnet18 64px jpeg", "1,669")]


def test_check_passes_on_the_rendered_readme_and_catches_a_hand_edited_figure(table, tmp_path, capsys):
    _write(tmp_path / "results", "pseudo_label-20261201T100000Z.json", PSEUDO_LABEL)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert table.main([*args, "--check"]) == 1  # the hand-typed block differs from the files
    table.main(args)
    assert table.main([*args, "--check"]) == 0
    readme.write_text(readme.read_text().replace("| 1,669 |", "| 1,869 |"))
    assert table.main([*args, "--check"]) == 1
    assert "-| pseudo_label | cpu resnet18 64px jpeg | 1,869 |" in capsys.readouterr().out


def test_every_bench_result_renders(table, tmp_path):
    results = {
        "train_student": {
            "bench": "train_student",
            "setting": "cpu resnet18 32px jpeg student",
            "stage_images_per_s": 400.0,
            "loop_images_per_s": 420.0,
            "bare_images_per_s": 500.0,
            "ratio": 0.95,
            "ratios": [0.9, 0.95, 1.0],
            "repeat": 3,
            "steps_timed": 60,
            "step_images": 128,
        },
        "e2e": {
            "bench": "e2e",
            "setting": "cpu digits rounds=1",
            "pipeline_wall_s": 150.0,
            "plain_wall_s": 100.0,
            "ratio": 1.5,
            "pipeline_outside_stages_s": 30.0,
            "pipeline_split_s": {"start-up to a running Ray": 20.0, "after the last stage (report, shutdown)": 10.0},
            "train_outside_epochs_s": {"pipeline": {"round-000": 18.0}, "plain": {"round-000": 1.0}},
            "label_actor_startup_s": {"round-001": 7.0},
            "top1": {"pipeline": [0.936, 0.964], "plain": [0.936, 0.961]},
        },
        "select": {"bench": "select", "setting": "10,000,000 rows", "seconds": 31.0, "rows_per_s": 322580,
                   "peak_rss_mb": 1060},
        "peers": {"bench": "peers", "setting": "digits", "peers": {"SVC": 0.89, "LabelSpreading": 0.95},
                  "pipeline": {}},
        "scale": {"bench": "scale", "setting": "cpu resnet10t 64px 100 classes", "labeled": 10000, "unlabeled": 50000,
                  "test": 2000, "driver_peak_rss_mb": 1534.2, "student_bytes_ratio": 38.46, "seconds": 300.0,
                  "stage_seconds": {"teacher": 150.0, "pseudo_label": 90.0, "student": 45.0, "select": 5.0,
                                    "evaluate": 10.0}},
        "suggest": {"bench": "suggest", "config": "configs/digits-hard.yaml", "n": 20, "base_rounds": 3, "rounds": 1,
                    "seeds": [{}, {}, {}],
                    "gains": {"chosen_worst_class_top1": {"suggested_mean": 0.9, "random_mean": 0.85,
                                                          "gain_mean": 0.05, "gain_std": 0.02},
                              "chosen_test_top1": {"suggested_mean": 0.96, "random_mean": 0.955, "gain_mean": 0.005,
                                                   "gain_std": 0.01}}},
    }  # fmt: skip
    for name, result in results.items():
        _write(tmp_path, f"{name}-20261201T100000Z.json", {**result, "machine": MACHINE})
    block = table.render(table.load_results(tmp_path))
    assert "| train_student | cpu resnet18 32px jpeg student | 400 | DataLoader loop 420 | 0.95 |" in block
    assert "median of 3 (pairs 0.90–1.00)" in block
    assert "| cpu digits rounds=1 | 150 s | 100 s | 1.50 | 30 s (start-up to a running Ray 20," in block
    assert "| 10,000,000 rows | 31.0 s | 322,580 | 1,060 MB |" in block
    assert "| peers | digits | LabelSpreading 95.00% |" in block
    assert (
        "| suggest | configs/digits-hard.yaml +20 labels, 3 seeds | worst class +5.00 ± 2.00 points (suggested "
        "90.00%, random 85.00%) | test +0.50 ± 1.00 points (suggested 96.00%, random 95.50%) | base 3 round(s), "
        "arms 1 |"
    ) in block
    scale = "| 10,000 / 50,000 / 2,000 | cpu resnet10t 64px 100 classes | 1,534 MB | 38.5 | 300 s | "
    assert scale + "teacher 150 s (50%), pseudo_label 90 s (30%), student 45 s (15%), evaluate 10 s (3%) |" in block


def test_a_readme_without_markers_is_refused(table, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="bench-table:start"):
        table.main(["--results", str(tmp_path), "--readme", str(readme)])


def _gpu_check_output(folder: Path, summary: str, logs: dict[str, str], results: dict[str, dict]) -> Path:
    """What one bench/gpu_check.sh run leaves in $OUT: summary.txt and logs.tgz (logs + results/)."""
    import io
    import tarfile

    folder.mkdir(parents=True)
    (folder / "summary.txt").write_text(summary)
    with tarfile.open(folder / "logs.tgz", "w:gz") as tar:
        files = {f"./{k}.log": v for k, v in logs.items()} | {
            f"./results/{k}": json.dumps(v) for k, v in results.items()
        }
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return folder


def test_a_gpu_check_run_is_filed_with_every_step_and_renders_what_was_not_measured(table, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_record", ROOT / "bench" / "gpu_record.py")
    gpu_record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_record)
    gpu = {**MACHINE, "gpu": {"name": "NVIDIA H200", "count": 1, "memory_gb": 140}, "cores": 16}
    train = {
        "bench": "train", "setting": "gpu resnet50 224px jpeg teacher", "stage_images_per_s": 1953.4,
        "loop_images_per_s": 1681.0, "bare_images_per_s": 3034.1, "ratio": 1.162, "ratio_bare": 0.644,
        "ratios": [1.162], "repeat": 1, "steps_timed": 40, "step_images": 256, "machine": gpu,
    }  # fmt: skip
    bare = {
        "bench": "gpu_bare", "setting": "cuda resnet50 224px batch 256", "bare_images_per_s": 15512.0,
        "decoders": {"nvjpeg": {"measured": True, "images_per_s": 7756.0, "of_bare": 0.5},
                     "torchcodec_cuda": {"measured": False, "why": "ImportError: no torchcodec"}},
        "machine": gpu,
    }  # fmt: skip
    summary = (
        "GPU 0: NVIDIA H200\n16\n3.12.3 torch 2.11.0\n== bare: rc 0 in 40 s\n== tests: rc 0 in 85 s\n"
        "3 passed in 81.76s\n"
        "== train: rc 0 in 85 s\n== e2e: rc 124 in 150 s\n== pl_4actors: skipped, -1 s left\ntotal 386 s\n"
    )
    tests_log = (
        "GPU (bf16) vs CPU (float32) labels: argmax agreement 0.9871, max |p diff| 0.0223\n"
        "epochs [1, 2, 3], loss [2.0, 1.5, 1.0], on cuda\n.\n3 passed, 3 warnings in 81.76s (0:01:21)\n"
    )
    folder = _gpu_check_output(
        tmp_path / "device",
        summary,
        {"tests": tests_log, "e2e": "plain script 32.8 s"},
        {"train-1.json": train, "gpu_bare-1.json": bare},
    )
    path = gpu_record.record(folder, tmp_path / "results")
    filed = json.loads(path.read_text())
    assert path.name == "gpu-20261201T100000Z.json" and (tmp_path / "results" / "train-1.json").exists()
    assert [(s["name"], s["status"], s["results"]) for s in filed["steps"]] == [
        ("bare", "ok", ["bench/results/gpu_bare-1.json"]),
        ("tests", "ok", []),
        ("train", "ok", ["bench/results/train-1.json"]),
        ("e2e", "cut at its time limit", []),
        ("pl_4actors", "skipped (no time left)", []),
    ]
    assert filed["tests"]["outcome"] == "3 passed"
    assert filed["tests"]["figures"][0].startswith("GPU (bf16) vs CPU (float32) labels: argmax agreement 0.9871")
    rows = table.gpu_rows(table.load_results(tmp_path / "results"))
    assert [r[1:4] for r in rows] == [
        ["bare", "ok", "40 s"],
        ["tests", "ok", "85 s"],
        ["train", "ok", "85 s"],
        ["e2e", "cut at its time limit", "150 s"],
        ["pl_4actors", "skipped (no time left)", "–"],
    ]
    assert "bare 15,512 img/s; decoders (of bare) nvjpeg 7,756 (0.50), torchcodec_cuda not measured" in rows[0][4]
    assert "stage 1,953 img/s, loop 1,681, bare 3,034; stage/loop 1.16, stage/bare 0.64" in rows[2][4]
    assert rows[3][4] == "–"  # a step cut at its limit shows nothing measured, not a stale figure


def test_the_seeds_bench_quotes_the_sample_std_over_the_runs_that_reached_each_round():
    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    runs = [
        [{"test_top1": 0.90}, {"test_top1": 0.94}],
        [{"test_top1": 0.92}, {"test_top1": 0.96}],
        [{"test_top1": 0.94}],
    ]
    stats = seeds.per_round(runs)
    assert stats["runs_per_round"] == [3, 2]
    assert stats["test_top1_mean"] == pytest.approx([0.92, 0.95])
    assert stats["test_top1_std"] == pytest.approx([0.02, 0.0141421356])  # ddof=1: 0.02 over three, not 0.0163
    assert seeds.per_round([[{"test_top1": 0.9}]])["test_top1_std"] == [0.0]
    worst = seeds.per_round([[{"test_top1": 0.9, "per_class_top1": [1.0, None, 0.5]}], [{"per_class_top1": [0.7]}]])
    assert worst["worst_class_top1_mean"] == pytest.approx([0.6])


def test_a_bench_on_missing_data_stops_with_one_error_line(tmp_path):
    """A bench reads its data the way ``make iterate`` does (the digits written when the config asks for them) and a
    missing shard is one ``error:`` line and exit 2, not a traceback."""
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seeds.py"), "--config", str(ROOT / "configs" / "digits.yaml")]
        + ["--seeds", "1", "--results", str(tmp_path), "--set", "data.prepare_digits="]
        + ["--set", f"data.labeled=[{tmp_path}/none-*.tar]"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.labeled: no shard matches")


def test_the_seeds_bench_scores_pseudo_labels_against_the_truth_the_digits_split_knows(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.storage.layout import RunLayout

    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    run = RunLayout(str(tmp_path))
    folder = Path(run.round(1).pseudo_labels)
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"key": ["unlabeled-000002", "unlabeled-000000"], "label": [2, 1]}), folder / "a.parquet")
    pq.write_table(pa.table({"key": ["unlabeled-000001"], "label": [1]}), folder / "b.parquet")
    truth = np.array([0, 1, 2])
    assert seeds.pseudo_label_accuracy(run, {"round": 1}, truth) == pytest.approx(2 / 3)
    assert seeds.pseudo_label_accuracy(run, {"round": 2}, truth) is None  # no sidecars: round 0 or another layout


def test_the_suggest_bench_labels_its_folders_from_the_truth_and_reports_the_gain_over_random(tmp_path):
    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_suggest", ROOT / "bench" / "suggest.py")
    suggest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suggest)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "path,label,split\nimages/unlabeled-000002.png,one,labeled\nimages/unlabeled-000000.png,?,labeled\n"
    )
    names = ["zero", "one", "two"]
    assert suggest.label_from_truth(tmp_path, np.array([1, 0, 2]), names) == [2, 1]  # row i of the pool: truth[i]
    assert csv_path.read_text().splitlines()[1:] == ["images/unlabeled-000002.png,two,labeled",
                                                     "images/unlabeled-000000.png,one,labeled"]  # fmt: skip
    rows = [{"test_top1": 0.5, "per_class_top1": [0.6, None, 0.4]}, {"test_top1": 0.7, "per_class_top1": [0.9, 0.5]}]
    figures = suggest.arm_figures(rows, 1)
    assert (figures["round0_worst_class_top1"], figures["chosen_worst_class_top1"]) == (0.4, 0.5)

    def seed(suggested: float, random: float) -> dict:
        return {arm: {f: v for f in suggest.FIGURES} for arm, v in (("suggested", suggested), ("random", random))}

    gains = suggest.gains([seed(0.9, 0.8), seed(0.8, 0.8)])
    assert gains["chosen_worst_class_top1"]["gain_mean"] == pytest.approx(0.05)
    assert gains["chosen_worst_class_top1"]["gain_std"] == pytest.approx(np.std([0.1, 0.0], ddof=1))
    assert gains["chosen_test_top1"]["random_mean"] == pytest.approx(0.8)


def test_the_bare_ceilings_bench_runs_each_decoder_path_on_the_cpu():
    """``bench/gpu_bare.py`` (gpu_check.sh's first step): its GPU decoders' calls through their CPU devices, the
    bare forward and the CPU decoder, so the one GPU call does not find a typo."""
    spec = importlib.util.spec_from_file_location("bench_gpu_bare", ROOT / "bench" / "gpu_bare.py")
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    import io

    import numpy as np
    import torch
    from PIL import Image

    def jpeg(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (375, 500, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        return out.getvalue()

    jpegs = [jpeg(i) for i in range(3)]
    for name in ("nvjpeg", "torchcodec_cuda"):
        assert bare.gpu_decoder(name, jpegs, 32, 2, 0.0, device="cpu") > 0
    assert bare.bare_forward("resnet10t", 32, 2, torch.device("cpu"), 0.0) > 0
    backend, rate = bare.cpu_decoder(jpegs, 32, 2, 0.0)
    assert backend and rate > 0


@pytest.mark.parametrize(
    ("result", "step"),
    [
        ({"decode": "gpu", "actors": 1}, "pl_gpudecode"),
        ({"decode": "tasks", "actors": 1}, "pl_tasks"),
        ({"decode": "cpu", "actors": 1}, "pl_1actor"),
        ({"decode": "cpu", "actors": 4}, "pl_4actors"),
    ],
)
def test_each_pseudo_label_result_is_filed_under_the_gpu_check_step_that_wrote_it(result, step):
    spec = importlib.util.spec_from_file_location("gpu_record", ROOT / "bench" / "gpu_record.py")
    gpu_record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_record)
    assert gpu_record._step_of({"bench": "pseudo_label", **result}) == step
