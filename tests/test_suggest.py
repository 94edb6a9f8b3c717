"""A class the rounds leave behind is named (stages/maths/classes.py, pipeline/rounds.warn_stuck), and the images
to label next round-trip from ``suggest-labels`` through ``prepare-folder`` into a run's labeled set."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from stages.maths.classes import margins, stuck_classes, suggestion_order


def test_a_class_that_did_not_move_while_the_others_did_is_stuck():
    rounds = [[0.5, 0.6, 0.7], [0.5, 0.8, 0.9], [0.54, 0.9, 1.0]]
    assert stuck_classes(rounds) == [0]  # +4 points, 27 below the mean
    assert stuck_classes(rounds[:1]) == []  # no student round yet
    assert stuck_classes([[0.5, 0.6], [0.5, 0.62]]) == []  # nothing moved: no class is behind the others
    assert stuck_classes([[0.8, 0.6], [0.8, 0.9]]) == []  # class 0 did not move, but it is not behind
    assert stuck_classes([[None, 0.5], [None, 0.9]]) == []  # no validation image of class 0: not judged


def test_suggestions_take_the_least_sure_near_a_stuck_class_first_then_spread_over_classes():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # 0: sure of 0
            [0.40, 0.35, 0.25],  # 1: unsure between 0 and 1 (stuck class 1 in its top two)
            [0.34, 0.33, 0.33],  # 2: least sure; top two 0 and 1
            [0.05, 0.05, 0.90],  # 3: sure of 2
            [0.10, 0.45, 0.45],  # 4: a tie between 1 and 2
            [0.20, 0.20, 0.60],  # 5: predicted 2
        ]
    )
    assert margins(probs)[4] == pytest.approx(0.0)
    rows, why = suggestion_order(probs, [1], 4)
    assert rows.tolist()[:2] == [4, 2]  # half the budget near the stuck class, least sure first
    assert all("stuck class" in w for w in why[:2]) and all("predicted class" in w for w in why[2:])
    assert len(set(rows.tolist())) == 4
    assert rows.tolist()[2:] == [1, 5]  # then round-robin over the predicted classes, least sure first in each
    # no stuck class: margins 4 (0), 2 (.01), 1 (.05), 5 (.4), 0, 3 (.85); one from each predicted class in turn
    assert suggestion_order(probs, [], 6)[0].tolist() == [2, 4, 5, 1, 3, 0]
    everyone, _ = suggestion_order(probs, [], 10)
    assert sorted(everyone.tolist()) == list(range(6))  # never more than there are


def test_a_stuck_class_is_one_warning_line_and_recorded(caplog):
    from pipeline.rounds import warn_stuck

    rows = [
        {"round": 0, "val_per_class_top1": [0.5, 0.6, 0.7]},
        {"round": 1, "val_per_class_top1": [0.5, 0.9, 1.0], "pseudo_per_class": [3, 48, 49]},
    ]
    with caplog.at_level(logging.WARNING):
        found = warn_stuck(rows, ["one", "two", "three"])
    assert [f["class"] for f in found] == ["one"] and found[0]["pseudo_share"] == pytest.approx(0.03)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("class one did not move: validation recall 50% in round 0, 50%")
    assert "3% of the pseudo-labels" in lines[0] and "suggest-labels" in lines[0]


@pytest.mark.slow
def test_suggested_labels_round_trip_through_prepare_folder_into_a_run(finished_run, tmp_path, capsys):
    """``suggest-labels`` on the session's run, the labels set as a person would (here from the truth the digits
    split knows), ``prepare-folder --csv --labeled-only``, and a run whose ``data.labeled`` adds the new shards sees
    those images with those labels (its preflight: the labeled set every stage reads)."""
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.rounds import preflight
    from stages.data.digits import split_digits

    cfg, run_dir, _ = finished_run
    out = tmp_path / "suggest"
    assert main(["suggest-labels", str(run_dir), "--n", "12", "--out", str(out), "--no-progress"]) == 0
    with open(out / "suggestions.csv") as f:
        suggested = list(csv.DictReader(f))
    assert len(suggested) == 12 and all((out / s["image"]).is_file() for s in suggested)
    truth = split_digits(0).unlabeled_y  # unlabeled-NNNNN is row NNNNN of the split's unlabeled images
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = str(truth[int(row["path"].rsplit("-", 1)[1].split(".")[0])])
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    added = tmp_path / "added"
    argv = [
        "prepare-folder",
        "--csv",
        str(out / "labels.csv"),
        "--labeled-only",
        "--classes",
        str(out / "classes.json"),
    ]
    assert main([*argv, "--out", str(added), "--no-progress"]) == 0
    labeled = [*cfg.data.labeled, str(added / "labeled" / "*.tar")]
    bigger = load_config(None, [f"data.labeled={labeled}"], base=cfg.to_dict())
    data = preflight(bigger, progress=False).data
    assert len(data.labeled) == len(preflight(cfg, progress=False).data.labeled) + 12
    new = {k: int(y) for k, y in zip(data.labeled.keys, data.labeled.labels, strict=True) if k.startswith("images")}
    assert sorted(new.values()) == sorted(int(r["label"]) for r in rows)
    capsys.readouterr()
