"""What the run report reads: a run's per-round files, calibration on the test set, example pseudo-labeled images.

Everything here comes from the run folder (``config.yaml``, ``run.json``, ``round-NNN/{metrics,manifest,model}.json``,
``train_metrics.jsonl``, ``selection/``, ``eval/``) and from the shards it names. The reliability diagram reads each
round's test predictions from the evaluate stage's sidecars (``round-NNN/eval/test/``: confidence, predicted and true
class per image); nothing runs the test set a second time.

Used by ``pipeline/report/page.py``; run ``python -m pipeline report RUN``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

from pipeline.report import ReportError
from stages.core.errors import BadSample, DataError
from stages.data.shards import decode_image, image_field, iter_raw_samples
from stages.maths.metrics import reliability
from stages.storage.files import StorageError, is_url, read_json
from stages.storage.layout import CONFIG, METRICS, RoundLayout, RunLayout, locate_run
from stages.train import read_metrics_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundFiles:
    """One round's recorded files, parsed."""

    index: int
    dir: Path
    metrics: dict
    manifest: dict
    card: dict
    selection: dict | None  # selection/selection.json (student rounds)
    train_log: list[dict]  # train_metrics.jsonl, one record per epoch

    @property
    def rel(self) -> str:
        """The round folder relative to the run folder, as the report's data-file attributes name it."""
        return self.dir.name


@dataclass(frozen=True)
class RunFiles:
    dir: Path
    config: dict
    status: dict
    rounds: list[RoundFiles]


def resolve_run(run: str, storage: str = "runs") -> Path:
    """A local run for the report: ``stages.storage.files.locate_run``, with a ``ReportError`` when there is none."""
    try:
        location = locate_run(run, storage)
    except StorageError as exc:
        raise ReportError(str(exc)) from exc
    if is_url(location):
        raise ReportError(f"{location} is in an object store; this command reads local runs only")
    return Path(location)


def load_run(run_dir: str | Path) -> RunFiles:
    """Read every round that has a ``metrics.json`` (a round still in progress is left out)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise ReportError(f"{run_dir} is not a run folder (no {CONFIG})")
    config = yaml.safe_load(layout.config.read_text()) or {}
    status = read_json(layout.status) if layout.status.is_file() else {}
    rounds = [_load_round(layout.round(i)) for i in layout.round_indices() if layout.round(i).metrics.is_file()]
    if not rounds:
        raise ReportError(f"run {run_dir} has no evaluated round yet (no round-NNN/{METRICS})")
    return RunFiles(run_dir, config, status, rounds)


def _load_round(layout: RoundLayout) -> RoundFiles:
    selection, log_path = layout.selection_summary, layout.train_metrics
    train_log = read_metrics_lines(log_path.read_text()) if log_path.exists() else []
    manifest = read_json(layout.manifest) if layout.manifest.is_file() else {"stages": {}}
    return RoundFiles(
        index=layout.index,
        dir=layout.dir,
        metrics=read_json(layout.metrics),
        manifest=manifest,
        card=read_json(layout.model.card),
        selection=read_json(selection) if selection.is_file() else None,
        train_log=train_log,
    )


def class_names(run: RunFiles) -> list[str]:
    """Class names by index: the latest round's ``metrics.json`` (or ``model.json``) ``classes``, else the indices."""
    latest = run.rounds[-1]
    names = latest.metrics.get("classes") or latest.card.get("classes")
    return list(names) if names else [str(c) for c in range(len(latest.metrics["per_class_top1"]))]


def calibration(run: RunFiles) -> dict[int, dict]:
    """Reliability bins per round, from the round's test sidecars (``round-NNN/eval/test/*.parquet``).

    Rounds without them (a run made before the evaluate stage wrote sidecars) are left out with a warning.
    """
    from stages.evaluate import read_predictions

    out: dict[int, dict] = {}
    missing = []
    for rf in run.rounds:
        sidecars = sorted(Path(RoundLayout(rf.dir, rf.index).eval, "test").glob("*.parquet"))
        if not sidecars:
            missing.append(rf.index)
            continue
        conf, pred, labels = read_predictions(sidecars)
        out[rf.index] = reliability(conf, pred, labels)
    if missing:
        log.warning("report: no test predictions under %s/round-*/eval/test for rounds %s", run.dir, missing)
    return out


@dataclass(frozen=True)
class Example:
    image: Image.Image
    confidence: float
    key: str


def example_images(rf: RoundFiles, per_side: int = 4, max_classes: int = 20, max_shards: int = 4) -> dict:
    """``{class: {"most": [Example], "least": [Example]}}`` of kept pseudo-labeled samples of round ``rf``.

    Only the first ``max_shards`` selection sidecars are considered, so that the report reads a bounded amount of
    the unlabeled data however large it is; classes beyond ``max_classes`` are left out.
    """
    import pyarrow.parquet as pq

    sidecars = sorted((rf.dir / "selection").glob("*.parquet"))[:max_shards]
    if not sidecars:
        return {}
    cols = ["key", "shard", "label", "confidence"]
    rows = [r for p in sidecars for r in pq.read_table(p, columns=cols).to_pylist()]
    chosen: dict[int, dict[str, list[dict]]] = {}
    for c in sorted({r["label"] for r in rows})[:max_classes]:
        ranked = sorted((r for r in rows if r["label"] == c), key=lambda r: -r["confidence"])
        least = ranked[max(per_side, len(ranked) - per_side) :][::-1]  # disjoint from "most" when there are few
        chosen[c] = {"most": ranked[:per_side], "least": least}
    wanted: dict[str, set[str]] = {}
    for sides in chosen.values():
        for r in sides["most"] + sides["least"]:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    images = _read_images(wanted, channels=int(rf.card["input_size"][0]))
    return {
        c: {
            side: [Example(images[r["key"]], float(r["confidence"]), r["key"]) for r in picked if r["key"] in images]
            for side, picked in sides.items()
        }
        for c, sides in chosen.items()
    }


def _read_images(wanted: dict[str, set[str]], channels: int) -> dict[str, Image.Image]:
    """Decode the wanted keys of each shard, stopping each shard's scan once all its keys are found."""
    images: dict[str, Image.Image] = {}
    for shard, keys in wanted.items():
        left = set(keys)
        try:
            for sample in iter_raw_samples(shard):
                if sample["__key__"] in left:
                    left.discard(sample["__key__"])
                    try:
                        images[sample["__key__"]] = decode_image(image_field(sample), channels)
                    except BadSample:
                        pass  # the pseudo-label stage skipped it too; it cannot be in the selection
                    if not left:
                        break
        except DataError as exc:  # a moved or damaged shard costs the report its examples only
            log.warning("report: cannot read examples from %s: %s", shard, exc)
    return images
