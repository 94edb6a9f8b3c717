"""The recipe search: knobs in and out of a config, re-tempered soft labels, and a two-trial search on the session's
finished run (its teacher and soft labels reused; trials of one epoch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.distributed.tune import pick_best, run_tune, trial_tree
from stages.maths.tuning import SPACE, apply_knobs, recipe, retemper, retemper_table


def test_knobs_round_trip_through_a_config_and_validate(tiny_config):
    tree = tiny_config().to_dict()
    knobs = {name: args[0] if kind == "choice" else args[1] for name, (kind, args) in SPACE.items()}
    tuned = apply_knobs(tree, knobs)
    assert recipe(tuned) == pytest.approx(knobs)
    cfg = load_config(None, base=tuned)  # still a valid config
    assert cfg.spec(1).drop_rate == knobs["drop_rate"] and cfg.spec(0) == load_config(None, base=tree).spec(0)
    assert recipe(tree) != recipe(tuned) and tree == tiny_config().to_dict()  # the input is not edited


def test_retemper_equals_labeling_at_the_other_temperature():
    z = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3
    at = {t: torch.softmax(z / t, dim=-1).numpy() for t in (0.5, 1.0, 2.0)}
    assert np.abs(retemper(at[0.5], 0.5, 1.0) - at[1.0]).max() < 1e-6
    assert np.abs(retemper(at[1.0], 1.0, 0.5) - at[0.5]).max() < 1e-6
    stored = at[0.5].astype(np.float16)  # as a sidecar keeps them: what underflowed is guessed, close enough
    assert np.abs(retemper(stored, 0.5, 1.0) - at[1.0]).max() < 2e-3
    table = pa.table(
        {
            "key": ["a", "b"],
            "label": pa.array(at[0.5][:2].argmax(1), pa.int32()),
            "confidence": pa.array(at[0.5][:2].max(1), pa.float32()),
            "probs": pa.array(list(stored[:2]), pa.list_(pa.float16())),
        }
    )
    warmer = retemper_table(table, 0.5, 1.0)
    assert warmer.column("label").to_pylist() == table.column("label").to_pylist()
    assert np.allclose(np.asarray(warmer.column("probs").to_pylist()), at[1.0][:2], atol=2e-3)
    # the teacher's own confidence (what the floor reads) does not move with the temperature
    assert warmer.column("confidence").to_pylist() == table.column("confidence").to_pylist()


def test_trials_get_absolute_shard_paths(digits_root, tiny_config, monkeypatch):
    """A trial runs in Ray's artifacts folder: a relative pattern would match nothing there."""
    monkeypatch.chdir(digits_root)
    cfg = tiny_config("data.labeled=[labeled/*.tar]", "data.val=[val/*.tar]")
    tree = trial_tree(cfg)
    assert tree["data"]["labeled"] == [str(p) for p in sorted((digits_root / "labeled").glob("*.tar"))]
    assert all(p.startswith("/") for split in ("labeled", "unlabeled", "val") for p in tree["data"][split])
    assert load_config(None, base=tree).data.val == tuple(tree["data"]["val"])


def test_the_best_trial_is_a_finished_one_by_validation_the_earliest_on_a_tie():
    table = [
        {"trial": 0, "val_top1": 0.99, "ended": "stopped"},
        {"trial": 1, "val_top1": 0.95, "ended": "finished"},
        {"trial": 2, "val_top1": 0.97, "ended": "finished"},
        {"trial": 3, "val_top1": 0.97, "ended": "finished"},
    ]
    assert pick_best(table)["trial"] == 2
    assert pick_best(table[:1]) is None


@pytest.mark.slow
def test_a_two_trial_search_reuses_the_run_and_writes_best_yaml_and_the_table(finished_run, tmp_path):
    cfg, run_dir, _ = finished_run
    before = (run_dir / "round-001" / "manifest.json").read_text()
    # floor pinned low here: a floor that keeps nothing is refused (checked at the end)
    space = dict(SPACE, student_epochs=("choice", (1,)), temperature=("choice", (0.5, 2.0)), floor=("choice", (0.0,)))
    summary = run_tune(cfg, run_dir, trials=2, budget_minutes=5, out=tmp_path, progress=False, space=space)
    assert (run_dir / "round-001" / "manifest.json").read_text() == before  # nothing of the base run redone
    assert summary["trials"] == 2 and summary["finished"] == 2 and summary["best"] is not None
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert load_config(None, base=best).student.epochs == 1
    assert best["pseudo_label"]["temperature"] == summary["best"]["knobs"]["temperature"]
    assert (tmp_path / "trials.csv").read_text().count("\n") == 3
    assert "config's recipe" in (tmp_path / "trials.md").read_text()
    assert "test" not in (tmp_path / "trials.csv").read_text()
    # a recipe whose floor keeps no pseudo-label is one the pipeline refuses: listed as refused, never the best
    nothing = dict(space, floor=("choice", (1.0,)))
    empty = run_tune(cfg, run_dir, trials=1, budget_minutes=5, out=tmp_path / "empty", progress=False, space=nothing)
    assert (empty["refused"], empty["finished"], empty["best"]) == (1, 0, None)
    assert (
        not (tmp_path / "empty" / "best.yaml").exists() and "refused" in (tmp_path / "empty" / "trials.csv").read_text()
    )
