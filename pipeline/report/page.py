"""The run report: ``<run>/report.html``, one static page (embedded PNGs, no network) about a run's rounds.

Rebuilt after every round by the round loop and by hand with::

    python -m pipeline report RUN            # RUN: a name under runs/ (or --storage ROOT), or a run folder
    python -m pipeline compare RUN_A RUN_B   # per-round test top-1 side by side, plus a plot

Every number in the page's tables is a cell with ``data-file`` (a file of the run, relative to the run folder),
``data-key`` (a dotted path into that JSON/YAML file, integers index lists), ``data-value`` (the value there) and
``data-scale`` (shown = value * scale, rounded); ``pipeline/report/check.py`` checks them all against the files.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.report import plots
from pipeline.report.data import RoundFiles, RunFiles, calibration, class_names, example_images, load_run
from pipeline.report.tensorboard import write_tensorboard
from stages.core.stage import ROUND_STAGES
from stages.storage import files as storage
from stages.storage.files import Location, atomic_write_bytes, atomic_write_text
from stages.storage.layout import CONFIG, MODEL_WEIGHTS, STATUS, RoundLayout, RunLayout

log = logging.getLogger(__name__)

EXAMPLES_PER_SIDE = 4

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;margin-top:2em} .note{color:#555}
table{border-collapse:collapse;margin:.6em 1.2em .6em 0;font-size:13px} .tables{display:flex;flex-wrap:wrap}
th,td{border:1px solid #ddd;padding:2px 8px} th{background:#f4f4f4} td.num{text-align:right}
img{max-width:100%;display:block;margin:.6em 0}
"""


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` atomically from the run's files and return its path."""
    run = load_run(run_dir)
    sections = [
        ("Accuracy", _accuracy),
        ("Validation, best round and robustness", _choices),
        ("Pseudo-labels", _pseudo_labels),
        ("Selection", _selection),
        ("Example pseudo-labeled images", _examples),
        ("Calibration", _calibration),
        ("Time and throughput", _timing),
        ("Models along the ladder", _models),
        ("Training curves", _training),
    ]
    body = [_header(run)] + [_guarded(title, fn, run) for title, fn in sections]
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(run.dir.name)} report</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = RunLayout(run.dir).report
    atomic_write_text(path, page)
    log.info("report: wrote %s", path)
    return path


# What the report and the TensorBoard events never read: a URL run's node-local copy leaves them out.
MIRROR_SKIP = ("ray_train", "pseudo_labels", "tensorboard")


def refresh_report(run_dir: Location) -> Location | None:
    """TensorBoard events and report.html for the round loop: a failure is logged, never raised.

    A run at a URL: both writers work on files, so they run on a node-local copy of the run (without Ray Train's
    checkpoints and the pseudo-label sidecars) and what they wrote is uploaded: ``report.html`` as one object, and each
    event folder that changed (its old objects removed first, so TensorBoard does not
    show a point twice; a reader between the two sees that folder empty for a moment)."""
    if storage.is_url(run_dir):
        return _refresh_copy(str(run_dir))
    try:
        write_tensorboard(run_dir)
    except Exception as exc:  # the run's results matter more than its charts
        log.warning("tensorboard events for %s not written: %s", run_dir, exc, exc_info=True)
    try:
        return build_report(run_dir)
    except Exception as exc:
        log.warning("report for %s not written: %s", run_dir, exc, exc_info=True)
        return None


def _refresh_copy(url: str) -> Location | None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ns-report-") as tmp:
        local = Path(tmp) / storage.name(url)  # the report names the run after its folder
        try:
            storage.download_tree(url, local, skip=MIRROR_SKIP)
            # the events' source stamps only: unchanged folders are neither rewritten nor uploaded again
            for events in storage.listdir(storage.join(url, "tensorboard")):
                source = storage.join(url, "tensorboard", events, ".source.sha256")
                if storage.exists(source):
                    (local / "tensorboard" / events).mkdir(parents=True, exist_ok=True)
                    (local / "tensorboard" / events / ".source.sha256").write_bytes(storage.read_bytes(source))
        except Exception as exc:
            log.warning("report for %s not written: cannot copy the run (%s)", url, exc, exc_info=True)
            return None
        try:
            for folder in write_tensorboard(local):
                storage.upload_tree(folder, str(storage.join(url, "tensorboard", folder.name)), replace=True)
        except Exception as exc:
            log.warning("tensorboard events for %s not written: %s", url, exc, exc_info=True)
        try:
            report = build_report(local)
            storage.upload(report, str(RunLayout(url).report))
        except Exception as exc:
            log.warning("report for %s not written: %s", url, exc, exc_info=True)
            return None
    return RunLayout(url).report


def compare_runs(run_a: Path, run_b: Path, out: Path) -> list[dict]:
    """Per-round test top-1 of two runs (None where a run has no such round); writes a plot to ``out``."""
    a, b = load_run(run_a), load_run(run_b)
    by_a = {r.index: r.metrics for r in a.rounds}
    by_b = {r.index: r.metrics for r in b.rounds}
    rows = []
    for k in sorted(by_a.keys() | by_b.keys()):
        ma, mb = by_a.get(k, {}), by_b.get(k, {})
        rows.append(
            {
                "round": k,
                "a_model": ma.get("model"),
                "a_top1": ma.get("test_top1"),
                "b_model": mb.get("model"),
                "b_top1": mb.get("test_top1"),
            }
        )
    series = tuple([(r.index, r.metrics["test_top1"]) for r in x.rounds] for x in (a, b))
    atomic_write_bytes(out, plots.plot_compare((a.dir.name, b.dir.name), series))  # type: ignore[arg-type]
    return rows


# ---- HTML pieces ---------------------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value, file: str, key: str, fmt: str = "{:.3f}", scale: float = 1.0, unit: str = "", tag="td", **attrs) -> str:
    """A number cell carrying where it came from; None shows as n/a (and is checked to be null in the file)."""
    text = "n/a" if value is None else fmt.format(value if scale == 1 else value * scale) + unit
    extra = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return (
        f'<{tag} class="num" data-file="{_e(file)}" data-key="{_e(key)}" data-value="{_e(json.dumps(value))}" '
        f'data-scale="{scale:g}"{extra}>{_e(text)}</{tag}>'
    )


def _pct(value, file: str, key: str, **attrs) -> str:
    return _num(value, file, key, "{:.2f}", 100.0, "%", **attrs)


def _table(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table>{cap}<tr>{head}</tr>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"


def _th(text: object) -> str:
    return f'<th scope="row">{_e(text)}</th>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _guarded(title: str, fn: Callable[[RunFiles], str], run: RunFiles) -> str:
    """One section; a failure in it is logged and shown in its place, so the rest of the report still appears."""
    try:
        inner = fn(run)
    except Exception as exc:
        log.warning("report section %r failed: %s", title, exc, exc_info=True)
        inner = f'<p class="note section-failed">not available: {_e(exc.__class__.__name__)}: {_e(exc)}</p>'
    return f"<section><h2>{_e(title)}</h2>\n{inner}\n</section>"


def _metrics(r: RoundFiles) -> str:
    return str(RoundLayout(r.rel, r.index).metrics)


def _sel(r: RoundFiles) -> str:
    return str(RoundLayout(r.rel, r.index).selection_summary)


def _man(r: RoundFiles) -> str:
    return str(RoundLayout(r.rel, r.index).manifest)


# ---- sections -----------------------------------------------------------------------------------------------


def _header(run: RunFiles) -> str:
    done = run.status.get("rounds_completed")
    planned = run.config.get("rounds")
    facts = [
        f"config <code>{_e(run.config.get('name', ''))}</code>",
        "rounds completed " + (_num(done, STATUS, "rounds_completed", "{:d}", tag="span") if done is not None else "?"),
        "planned student rounds " + _num(planned, CONFIG, "rounds", "{:d}", tag="span"),
        f"last update {_e(run.status.get('updated_at', '?'))}",
    ]
    return f'<h1>Run {_e(run.dir.name)}</h1>\n<p class="note">{" · ".join(facts)}</p>'


def _accuracy(run: RunFiles) -> str:
    rows = [
        [
            _th(r.index),
            f"<td>{_e(r.metrics['model'])}</td>",
            _pct(r.metrics["teacher_top1"], _metrics(r), "teacher_top1", metric="teacher_top1", round=r.index)
            if "teacher_top1" in r.metrics
            else "<td>-</td>",  # round 0 learns from labels alone
            _pct(r.metrics["test_top1"], _metrics(r), "test_top1", metric="test_top1", round=r.index),
            _num(r.metrics["train_images"], _metrics(r), "train_images", "{:d}"),
            _num(r.metrics.get("pseudo_images"), _metrics(r), "pseudo_images", "{:d}"),
        ]
        for r in run.rounds
    ]
    header = ["round", "model", "teacher top-1", "student top-1", "train images", "of which pseudo-labeled"]
    n_classes, names = len(run.rounds[0].metrics["per_class_top1"]), class_names(run)
    per_class = [
        [_th(names[c])] + [_pct(r.metrics["per_class_top1"][c], _metrics(r), f"per_class_top1.{c}") for r in run.rounds]
        for c in range(n_classes)
    ]
    return (
        '<p class="note">The teacher of round k is round k-1\'s model, un-noised; round 0 is the teacher trained on '
        "the labeled data alone.</p>"
        + _img(plots.plot_top1(run.rounds), "test top-1 per round")
        + _table(header, rows)
        + _img(plots.plot_per_class(run.rounds, names), "per-class test top-1 heat map")
        + _table(["class"] + [f"round {r.index}" for r in run.rounds], per_class, "per-class test top-1")
    )


def _choices(run: RunFiles) -> str:
    """Validation top-1 (what every choice is made on) beside test top-1 (reported only), the best round and the
    stop rule's verdict from ``run.json``, and top-1 on the corrupted test copies per round."""
    stop = run.status.get("stop") or {}

    def cell(r: RoundFiles, key: str) -> str:
        value: object = r.metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return _pct(value, _metrics(r), key) if value is not None else "<td>-</td>"

    def interval(r: RoundFiles, split: str) -> str:
        key = f"{split}_top1_interval"
        if not r.metrics.get(key):
            return "<td>-</td><td>-</td>"
        return "".join(_pct(r.metrics[key][i], _metrics(r), f"{key}.{i}") for i in (0, 1))

    rows = [
        [_th(r.index), cell(r, "val_top1"), interval(r, "val"), cell(r, "test_top1"), interval(r, "test")]
        + [cell(r, "corruption_top1.mean")]
        + [f"<td>{'best' if r.index == stop.get('best_round') else ''}</td>"]
        for r in run.rounds
    ]
    names = list((run.rounds[-1].metrics.get("corruption_top1") or {}).get("per_corruption", {}))
    per = [[_th(n)] + [cell(r, f"corruption_top1.per_corruption.{n}") for r in run.rounds] for n in names]
    rounds_header = ["corruption"] + [f"round {r.index}" for r in run.rounds]
    verdict = f"best round {stop['best_round']} by {stop['best_by']}" if stop else "no stop record in run.json"
    if stop.get("best_reason"):
        verdict += f" ({stop['best_reason']})"
    if stop.get("noise_warning"):
        verdict += f". {stop['noise_warning'][0].upper()}{stop['noise_warning'][1:]}"
    if stop.get("stopped_early"):
        verdict += f"; stopped early after round {stop['stopped_after_round']}: {stop['reason']}"
    return (
        f'<p class="note">Choices are made on validation only; test is reported, never chosen on. {_e(verdict)}.</p>'
        + _table(["round", "val top-1", "95% from", "to", "test top-1", "95% from", "to", "corrupted (mean)", ""], rows)
        + (_table(rounds_header, per, "top-1, mean over severities") if per else "")
    )


def _student_rounds(run: RunFiles) -> list[RoundFiles]:
    return [r for r in run.rounds if r.selection is not None]


def _pseudo_labels(run: RunFiles) -> str:
    rounds = _student_rounds(run)
    if not rounds:
        return '<p class="note">No student round yet.</p>'
    rows = []
    for r in rounds:
        pl = "stages.pseudo_label.result"
        rows.append(
            [
                _th(r.index),
                _num(r.manifest["stages"]["pseudo_label"]["result"]["rows"], _man(r), f"{pl}.rows", "{:d}"),
                _pct(r.metrics.get("pseudo_label_accuracy"), _metrics(r), "pseudo_label_accuracy"),
                _num(r.selection["floor"], _sel(r), "floor", "{:.2f}"),
                _num(r.selection["dropped_by_floor"], _sel(r), "dropped_by_floor", "{:d}"),
                _num(r.selection["kept"], _sel(r), "kept", "{:d}"),
                _num(r.selection["K"], _sel(r), "K", "{:d}"),
                _num(r.selection["copies_out"], _sel(r), "copies_out", "{:d}"),
            ]
        )
    header = ["round", "labeled", "accuracy", "floor", "below floor", "kept", "K per class", "with copies"]
    known = any(r.metrics.get("pseudo_label_accuracy") is not None for r in rounds)
    accuracy = (
        _img(plots.plot_pseudo_accuracy(rounds), "pseudo-label accuracy per round")
        if known
        else '<p class="note">The unlabeled shards carry no <code>.cls</code>, so pseudo-label accuracy is unknown '
        "(n/a).</p>"
    )
    return _img(plots.plot_confidence(rounds), "pseudo-label confidence histograms") + accuracy + _table(header, rows)


def _selection(run: RunFiles) -> str:
    rounds = _student_rounds(run)
    if not rounds:
        return '<p class="note">No student round yet.</p>'
    tables, names = [], class_names(run)
    cols = [
        ("per_class_before", "{:d}"),
        ("per_class_candidates", "{:d}"),
        ("per_class_kept", "{:d}"),
        ("per_class_after", "{:d}"),
        ("thresholds", "{:.3f}"),
        ("duplication", "{:.3f}"),
    ]
    for r in rounds:
        s = r.selection
        rows = [
            [_th(names[c])] + [_num(s[key][c], _sel(r), f"{key}.{c}", fmt) for key, fmt in cols]
            for c in range(len(s["per_class_before"]))
        ]
        header = ["class", "argmax", "≥ floor", "kept", "after", "threshold", "dup."]
        tables.append(_table(header, rows, f"round {r.index} ({s['mode']}, {s['label_type']} labels)"))
    legend = (
        '<p class="note">Per class: samples whose teacher argmax it is, of them those at or above the floor, kept '
        "(top-K most confident), after duplication to K, the per-class confidence threshold that resulted, and "
        "the duplication factor (copies per kept sample).</p>"
    )
    return legend + (
        _img(plots.plot_selection(rounds, names), "class counts, thresholds and duplication per round")
        + '<div class="tables">'
        + "".join(tables)
        + "</div>"
    )


def _examples(run: RunFiles) -> str:
    rounds = _student_rounds(run)
    if not rounds:
        return '<p class="note">No student round yet.</p>'
    r = rounds[-1]
    examples = example_images(r, EXAMPLES_PER_SIDE)
    if not any(ex for sides in examples.values() for ex in sides.values()):
        return '<p class="note">No example could be read from the unlabeled shards (moved?).</p>'
    return (
        f'<p class="note">Round {r.index}: kept samples per pseudo-label, from the first selection sidecars of '
        f"<code>{_e(r.rel)}/selection/</code>; the number under each image is the teacher's confidence.</p>"
        + _img(
            plots.plot_examples(examples, EXAMPLES_PER_SIDE, class_names(run)),
            f"example pseudo-labeled images, round {r.index}",
        )
    )


def _calibration(run: RunFiles) -> str:
    reliability = calibration(run)
    rows = [
        [_th(r.index), _num(r.metrics["test_ece"], _metrics(r), "test_ece", "{:.4f}", metric="test_ece", round=r.index)]
        for r in run.rounds
    ]
    off = [
        r.index
        for r in run.rounds
        if r.index in reliability and abs(reliability[r.index]["ece"] - r.metrics["test_ece"]) > 1e-6
    ]
    note = (
        '<p class="note">Reliability diagrams from each round\'s test predictions (<code>round-NNN/eval/test/</code>; '
        "15 equal-width bins, as for <code>test_ece</code>).</p>"
    )
    if off:
        note += (
            f'<p class="note"><b>ECE from the predictions differs from metrics.json for rounds {off}</b>: '
            "the sidecars were rewritten since?</p>"
        )
    if reliability:
        diagrams = _img(plots.plot_reliability(reliability), "reliability diagrams")
    else:
        diagrams = '<p class="note">No reliability diagram: no round has test predictions (eval/test/).</p>'
    return note + _table(["round", "expected calibration error"], rows) + diagrams


def _timing(run: RunFiles) -> str:
    rows = []
    for r in run.rounds:
        st = r.manifest.get("stages", {})
        cells = [_th(r.index)]
        cells += [
            _num(st[s]["seconds"], _man(r), f"stages.{s}.seconds", "{:.1f}") if s in st else "<td>-</td>"
            for s in ROUND_STAGES
        ]
        for s in ("pseudo_label", "train"):
            rate = st.get(s, {}).get("result", {}).get("images_per_s")
            cells.append(
                _num(rate, _man(r), f"stages.{s}.result.images_per_s", "{:.0f}") if rate is not None else "<td>-</td>"
            )
        rows.append(cells)
    header = ["round", *(f"{s} s" for s in ROUND_STAGES), "pseudo_label images/s", "train images/s"]
    return _img(plots.plot_timing(run.rounds), "time and throughput per stage") + _table(header, rows)


def _models(run: RunFiles) -> str:
    ladder = run.config.get("ladder", [])
    rows = []
    for r in run.rounds:
        step = min(r.index, len(ladder) - 1)
        files = r.manifest.get("stages", {}).get("train", {}).get("files", [])
        at = next((i for i, f in enumerate(files) if f["path"] == MODEL_WEIGHTS), None)
        size = (
            _num(files[at]["bytes"], _man(r), f"stages.train.files.{at}.bytes", "{:.2f}", 1e-6, " MB")
            if at is not None
            else "<td>-</td>"
        )
        rows.append(
            [
                _th(r.index),
                f"<td>{_e(r.metrics['model'])}</td>",
                _num(r.metrics["params"], _metrics(r), "params", "{:,d}"),
                size,
            ]
            + [
                _num(ladder[step][k], CONFIG, f"ladder.{step}.{k}", "{:g}")
                for k in ("drop_rate", "drop_path_rate", "randaug_n", "randaug_m")
            ]
        )
    header = [
        "round",
        "model",
        "parameters",
        "weights",
        "dropout",
        "stochastic depth",
        "RandAugment N",
        "RandAugment M",
    ]
    return _img(plots.plot_models(run.rounds), "model size per round") + _table(header, rows)


def _training(run: RunFiles) -> str:
    return (
        '<p class="note">Per epoch, from each round\'s <code>train_metrics.jsonl</code>; the same curves per step are '
        f"in TensorBoard: <code>tensorboard --logdir {_e(run.dir.parent)}</code> (every run of this storage).</p>"
        + _img(plots.plot_training(run.rounds), "training loss and learning rate per epoch")
    )
