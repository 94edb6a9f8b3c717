"""The recipe search's pure parts: the knobs, how a trial's knobs enter a config, and re-tempered soft labels.

The knobs are those that decided the digits result, all for the round-1 student: pseudo-label temperature, student
epochs, unlabeled:labeled ratio, learning rate, dropout, stochastic depth, RandAugment N and M, the selection floor
and the K factor. ``SPACE`` says where each is searched (``choice`` of values, or a ``uniform`` / ``loguniform``
range); ``pipeline/distributed/tune.py`` turns it into Ray Tune's search space.

A trial reuses the run's teacher and its stored soft labels: ``softmax(z / T)`` for any ``T`` follows from
``softmax(z / T0)`` as ``p ** (T0 / T)``, renormalised (``retemper``), exact up to the sidecar's float16 storage
(probabilities below ~6e-8 were stored as 0). Top-k sidecars are re-tempered over their k classes, an approximation
that ignores the mass outside them.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa

FLOAT16_ZERO = 3e-8  # half float16's smallest subnormal

# knob -> (kind, arguments); kinds: choice (values), uniform (low, high), loguniform (low, high)
SPACE: dict[str, tuple[str, tuple]] = {
    "temperature": ("choice", (0.3, 0.5, 0.7, 1.0)),
    "student_epochs": ("choice", (10, 15, 20, 30)),
    "unlabeled_ratio": ("choice", (1.0, 2.0, 3.0, 5.0)),
    "lr": ("loguniform", (7e-4, 5e-3)),
    "drop_rate": ("uniform", (0.0, 0.5)),
    "drop_path_rate": ("uniform", (0.0, 0.25)),
    "randaug_n": ("choice", (1, 2, 3)),
    "randaug_m": ("choice", (3.0, 5.0, 7.0, 9.0)),
    "floor": ("choice", (0.0, 0.3, 0.5, 0.7)),
    "per_class_factor": ("choice", (0.5, 1.0, 1.5, 2.0)),
}


def student_rung(tree: dict) -> int:
    """The ladder entry the round-1 student trains (a shorter ladder repeats its last entry)."""
    return min(1, len(tree["ladder"]) - 1)


def recipe(tree: dict) -> dict:
    """The knobs' values in a config tree (the current recipe: what the trials are compared with)."""
    rung = tree["ladder"][student_rung(tree)]
    return {
        "temperature": tree["pseudo_label"]["temperature"],
        "student_epochs": tree["student"]["epochs"],
        "unlabeled_ratio": tree["student"]["unlabeled_ratio"],
        "lr": tree["student"]["lr"],
        "drop_rate": rung["drop_rate"],
        "drop_path_rate": rung["drop_path_rate"],
        "randaug_n": rung["randaug_n"],
        "randaug_m": rung["randaug_m"],
        "floor": tree["select"]["floor"],
        "per_class_factor": tree["select"]["per_class_factor"],
    }


def apply_knobs(tree: dict, knobs: dict) -> dict:
    """A copy of the config tree with ``knobs`` set for the students. With a ladder of two entries (teacher,
    students) that is every student round; with a longer one, rung 1's noise only."""
    out = copy.deepcopy(tree)
    rung = out["ladder"][student_rung(out)]
    if rung is out["ladder"][0]:  # a one-entry ladder: the teacher's rung is the students' too; give them their own
        rung = copy.deepcopy(rung)
        out["ladder"].append(rung)
    out["pseudo_label"]["temperature"] = float(knobs["temperature"])
    out["student"]["epochs"] = int(knobs["student_epochs"])
    out["student"]["unlabeled_ratio"] = float(knobs["unlabeled_ratio"])
    out["student"]["lr"] = float(knobs["lr"])
    rung["drop_rate"], rung["drop_path_rate"] = float(knobs["drop_rate"]), float(knobs["drop_path_rate"])
    rung["randaug_n"], rung["randaug_m"] = int(knobs["randaug_n"]), float(knobs["randaug_m"])
    out["select"]["floor"] = float(knobs["floor"])
    out["select"]["per_class_factor"] = float(knobs["per_class_factor"])
    return out


def retemper(probs: np.ndarray, t_from: float, t_to: float) -> np.ndarray:
    """``softmax(z / t_to)`` per row from ``softmax(z / t_from)``, in float32."""
    # a stored 0 is a float16 underflow (below 6e-8): half of that is its best guess, and warming makes it count
    p = np.asarray(probs, dtype=np.float64)
    logp = np.log(np.where(p > 0, p, FLOAT16_ZERO)) * (t_from / t_to)
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def retemper_table(table: pa.Table, t_from: float, t_to: float) -> pa.Table:
    """A pseudo-label sidecar (``stages/pseudo_label.py``) as if labeled at temperature ``t_to``: its soft labels
    re-tempered. ``label`` (the argmax) and ``confidence`` (the teacher's own, at T = 1) do not depend on the
    temperature, so the floor keeps the same samples whatever temperature a trial tries."""
    n = table.num_rows
    column = "probs" if "probs" in table.column_names else "topk_prob"
    probs = np.asarray(table.column(column).to_pylist(), dtype=np.float32).reshape(n, -1)
    new = retemper(probs, t_from, t_to) if n else probs
    values = pa.array(list(new.astype(np.float16)), type=table.schema.field(column).type)
    return table.set_column(table.column_names.index(column), column, values)
