"""What the round loop chooses on, and how it records it: validation only, test reported, never used to choose.

* ``load_validation``: the validation split from ``data.val`` shards, or carved from the labeled set
  (``data.val_per_class``, ``stages/maths/validation.py``); returns the labeled training part, the split and the record
  kept in ``run.json`` (``validation``). A resumed run whose carve would differ from the recorded one is refused.
* ``round_seeds``: each round's training and selection seeds, derived from the run seed (``stages/maths/stopping.py``).
* ``stop_record``: the stop rule and the best round after each round, both judged on the rounds' predictions on the
  same validation images (``stop.best``, ``stop.test``: ``stages/maths/round_choice.py``), kept in ``run.json`` as
  ``stop`` with the rule, its reason and each round's 95% interval; ``python -m pipeline download RUN`` takes its
  ``best_round``.
"""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig
from stages.core.errors import ConfigError
from stages.data.shards import expand_shards
from stages.maths.round_choice import ChoiceOptions, RoundPredictions, choose_round, noise_warning, stop_beyond_noise
from stages.maths.stopping import gains, round_seed, should_stop
from stages.maths.validation import S, carve_keys, split_off

log = logging.getLogger(__name__)


def load_validation(cfg: PipelineConfig, labeled: S, val: S | None = None) -> tuple[S, S | None, dict]:
    """``(labeled training part, validation split or None, record for run.json)``; ``val``: the ``data.val``
    shards, read by the caller (scanned by the round loop, decoded by ``tune``), when the config names them."""
    data = cfg.data
    if data.val:
        if val is None:
            raise ValueError("load_validation: data.val names shards; pass them, read")
        shards = expand_shards(data.val, "data.val")
        return labeled, val, {"source": "shards", "shards": shards, "images": len(val)}
    if data.val_per_class:
        try:
            carved = carve_keys(labeled.keys, labeled.labels, data.val_per_class, data.val_seed)
        except ValueError as exc:
            raise ConfigError(f"config.data.{exc}") from exc
        train, val = split_off(labeled, set(carved))
        record = {
            "source": "carved from data.labeled",
            "per_class": data.val_per_class,
            "seed": data.val_seed,
            "images": len(val),
            "carved_keys": carved,
        }
        return train, val, record
    return labeled, None, {"source": "none", "images": 0}


def check_recorded(record: dict, previous: dict | None) -> None:
    """A resumed run holds out exactly the images it held out before (its models were chosen on them)."""
    if not previous or previous.get("source") != record["source"]:
        return
    if previous.get("carved_keys", []) != record.get("carved_keys", []):
        raise ConfigError(
            f"this run carved {previous.get('images')} validation images when it started and would carve a "
            f"different set now ({record['images']}): the labeled shards changed; start a new RUN"
        )


def round_seeds(cfg: PipelineConfig, r: int) -> dict[str, int]:
    """Round ``r``'s seeds: ``train`` (initialisation, data order, augmentation) and ``select`` (ties, copies)."""
    train_cfg = cfg.teacher if r == 0 else cfg.student
    return {
        "train": round_seed(cfg.seed, train_cfg.seed, r, "train"),
        "select": round_seed(cfg.seed, cfg.select.seed, r, "select"),
    }


def stop_record(cfg: PipelineConfig, rows: list[dict], val: list[RoundPredictions | None] | None = None) -> dict:
    """After the rounds in ``rows`` (one metrics dict each, round 0 first): whether to stop, the best round and why.
    ``val``: each round's predictions on the validation images (``stages.evaluate.val_predictions``); the rules of
    ``stop.best`` and ``stop.test`` compare rounds image by image on them. Without them (no validation split) the
    best round is the last and the stop rule stays off."""
    top1 = [m.get("val_top1") for m in rows]
    opts = ChoiceOptions(alpha=cfg.stop.alpha)
    paired = val is not None and len(val) == len(rows) and all(x is not None and len(x) for x in val)
    if paired:
        choice = choose_round(val, cfg.stop.best, opts)
        best, by, reason = choice.round, cfg.stop.best, choice.reason
    else:
        best, by = len(rows) - 1, "last round (no validation split)"
        reason = f"round {best}: the last round; no validation predictions to compare rounds on"
    record = {
        "rule": {"best": cfg.stop.best, "test": cfg.stop.test, "patience": cfg.stop.patience, "alpha": cfg.stop.alpha}
        | ({"min_gain": cfg.stop.min_gain} if cfg.stop.test == "gain" else {}),
        "val_top1": top1,
        "val_top1_interval": [m.get("val_top1_interval") for m in rows],
        "gains": gains(top1) if paired else [],
        "best_round": best,
        "best_by": by,
        "best_reason": reason,
        "best_val_top1": top1[best],
        "best_test_top1": rows[best].get("test_top1"),
        "noise_warning": noise_warning(top1, len(val[0])) if paired else None,
        "stopped_early": False,
    }
    if paired and cfg.stop.patience:
        if cfg.stop.test == "gain":
            stop = should_stop(top1, cfg.stop)
            why = (
                f"{cfg.stop.patience} student(s) in a row gained less than {cfg.stop.min_gain:g} validation top-1 "
                "over their teachers"
            )
        else:
            stop, why = stop_beyond_noise(val, cfg.stop.patience, cfg.stop.alpha, cfg.stop.test)
        if stop:
            record |= {"stopped_early": True, "stopped_after_round": len(rows) - 1, "reason": why}
    return record
