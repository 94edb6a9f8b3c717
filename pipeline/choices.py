"""What the round loop chooses on, and how it records it: validation only, test reported, never used to choose.

* ``load_validation``: the validation split from ``data.val`` shards, or carved from the labeled set
  (``data.val_per_class``, ``stages/validation.py``); returns the labeled training part, the split and the record
  kept in ``run.json`` (``validation``). A resumed run whose carve would differ from the recorded one is refused.
* ``round_seeds``: each round's training and selection seeds, derived from the run seed (``stages/stopping.py``).
* ``extra_metrics``: validation top-1 and top-1 on corrupted copies of the test set (``stages/corruptions.py``),
  merged into each round's ``metrics.json``.
* ``stop_record``: the stop rule and the best round (by validation) after each round, kept in ``run.json`` as
  ``stop``; ``python -m pipeline download RUN`` takes its ``best_round``.
"""

from __future__ import annotations

import logging

from pipeline.config import ConfigError, PipelineConfig
from stages.corruptions import corrupt_all, corruption_metrics
from stages.data import LabeledSet, expand_shards, load_labeled
from stages.evaluate import predict_probs
from stages.stopping import best_round, gains, round_seed, should_stop
from stages.validation import carve_keys, split_off, validation_metrics

log = logging.getLogger(__name__)


def load_validation(cfg: PipelineConfig, labeled: LabeledSet) -> tuple[LabeledSet, LabeledSet | None, dict]:
    """``(labeled training part, validation split or None, record for run.json)``."""
    data = cfg.data
    if data.val:
        shards = expand_shards(data.val, "data.val")
        val = load_labeled(shards, data.num_classes, data.channels, data.max_bad_fraction, "data.val")
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


class ExtraEvaluation:
    """Validation and corruption top-1 of a round's model; the corrupted test copies are made once per process."""

    def __init__(self, cfg: PipelineConfig, val: LabeledSet | None, test: LabeledSet):
        self.cfg, self.val, self.test = cfg, val, test
        self._corrupted: dict | None = None

    def corrupted(self) -> dict:
        if self._corrupted is None:
            self._corrupted = corrupt_all(self.test.images, self.cfg.robustness)
        return self._corrupted

    def __call__(self, model, card: dict) -> dict:
        out: dict = {}
        if self.val is not None:
            out |= validation_metrics(predict_probs(model, self.val.images, card), self.val.labels)
        if self.cfg.robustness.corruptions:
            copies = self.corrupted()
            probs = predict_probs(model, [im for ims in copies.values() for im in ims], card)
            pred = probs.argmax(axis=1).reshape(len(copies), len(self.test))
            top1 = {key: float((p == self.test.labels).mean()) for key, p in zip(copies, pred, strict=True)}
            out["corruption_top1"] = corruption_metrics(top1)
        return out


def stop_record(cfg: PipelineConfig, rows: list[dict]) -> dict:
    """After the rounds in ``rows`` (one metrics dict each, round 0 first): whether to stop, and the best round."""
    val = [m.get("val_top1") for m in rows]
    known = [v for v in val if v is not None]
    best = best_round(val)
    record = {
        "rule": {"patience": cfg.stop.patience, "min_gain": cfg.stop.min_gain},
        "val_top1": val,
        "gains": gains(known) if len(known) == len(val) else [],
        "best_round": best,
        "best_by": "val_top1" if known else "last round (no validation split)",
        "best_val_top1": val[best],
        "best_test_top1": rows[best].get("test_top1"),
        "stopped_early": False,
    }
    if len(known) == len(val) and should_stop(known, cfg.stop):
        record |= {
            "stopped_early": True,
            "stopped_after_round": len(rows) - 1,
            "reason": f"{cfg.stop.patience} student(s) in a row gained less than {cfg.stop.min_gain:g} "
            f"validation top-1 over their teachers",
        }
    return record
