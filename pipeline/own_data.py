"""Commands for your own images and models: ``prepare-folder``, ``predict`` and ``export``.

``python -m pipeline prepare-folder SRC --out DIR`` (or ``--csv FILE``) writes WebDataset shards, ``classes.json``
and ``data.yaml`` (``stages/prepare.py``); ``predict --model DIR IMAGE…`` classifies files with a round's
model, by class name (``--json`` for a machine-readable list); ``export RUN --format onnx|torchscript --to FILE``
writes a round's model with its class names and preprocessing and checks it against PyTorch
(``stages/models/export.py``).
Registered by ``pipeline/cli.py``, which prints the one-line ``error:`` for the errors raised here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from stages.core.errors import DataError

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def shard_size(text: str) -> int:
    """``256MB``, ``64KiB``, ``1g`` or plain bytes, as an int (argparse type)."""
    match = SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = (match.group(2) or "b").lower()[:1]
    return int(float(match.group(1)) * 1024 ** "bkmgt".index(unit))


def add_commands(sub) -> None:
    """Add ``prepare-folder``, ``predict``, ``export`` and ``suggest-labels`` to the CLI's subparsers."""
    p = sub.add_parser(
        "prepare-folder",
        help="write a folder (or CSV) of images as WebDataset shards, classes.json and data.yaml",
        description="SRC holds labeled/<class>/..., test/<class>/..., optionally val/<class>/..., and unlabeled/... "
        "(any depth, no labels); or give --csv FILE with path,label,split columns (paths relative to the CSV). "
        "Classes are numbered by sorted name, as torchvision's ImageFolder does. Images are copied as they are (or "
        "shrunk with --max-side); unreadable files are listed in DIR/prepare.json and skipped with a count. A re-run "
        "skips finished shards.",
    )
    p.add_argument("src", nargs="?", metavar="SRC", help="the source folder (not needed with --csv)")
    p.add_argument("--csv", dest="csv_path", help="a CSV file with path,label,split columns instead of SRC")
    p.add_argument("--out", required=True, help="output folder: DIR/{labeled,val,test,unlabeled}/*.tar")
    p.add_argument("--shard-size", type=shard_size, default="256MB", help="bytes per shard (default 256MB)")
    p.add_argument(
        "--parallel",
        choices=("auto", "ray", "off"),
        default="auto",
        help="ray: one Ray task per shard; off: in this process; auto (default): Ray above 64 MB of images",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffles which images share a shard (default 0)")
    p.add_argument(
        "--max-side",
        type=int,
        default=0,
        metavar="N",
        help="store an image whose short side is above N pixels resized to a short side of N (aspect kept; JPEG "
        "quality 90, PNG for alpha, palette or PNG sources); smaller ones keep their bytes. Default 0: none is resized",
    )
    p.add_argument(
        "--labeled-only",
        action="store_true",
        help="with --csv: the CSV holds labeled rows only (images to add to a run's data.labeled, e.g. the "
        "suggest-labels CSV once a person has set its labels)",
    )
    p.add_argument(
        "--classes",
        help="a classes.json (a run's, or prepare-folder's) to number the labels by, so that added images get the "
        "run's class indices (default: the labeled rows' names, sorted)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_folder)

    p = sub.add_parser(
        "suggest-labels",
        help="the unlabeled images whose labels would help a run most, as a folder and a CSV to label",
        description="Runs the run's best round (or --round) over its unlabeled shards and picks --n images: those the "
        "model is least sure of, half of them near a class the rounds left behind (run.json's stuck_classes), the "
        "rest spread over the predicted classes. Writes DIR/images/<key>.<ext> (the original bytes), "
        "DIR/suggestions.csv (key, image, predicted class, confidence, margin, why) and DIR/labels.csv "
        "(path,label,split; label pre-filled with the prediction). Correct the labels, then: prepare-folder --csv "
        "DIR/labels.csv --labeled-only --classes <the run's classes.json> --out NEW, and add NEW/labeled/*.tar to "
        "data.labeled.",
    )
    p.add_argument("run", metavar="RUN", help="run name under --storage, or a path or URL of a run folder")
    p.add_argument("--storage", default="runs", help="storage root: folder or URL (default runs)")
    p.add_argument("--round", type=int, dest="round_index", help="the model to ask (default: the run's best round)")
    p.add_argument("--n", type=int, default=50, help="images to suggest (default 50)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_suggest_labels)

    p = sub.add_parser(
        "predict",
        help="classify image files with a round's model",
        description="Loads DIR/model.json + DIR/model.safetensors (a round folder or a download) un-noised and "
        "prints the top classes of each image, by name when the model's model.json names its classes.",
    )
    p.add_argument("--model", required=True, help="a round folder holding model.json and model.safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list: image, class, index, probability, top")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a round's model to ONNX or torch.export (.pt2), checked against PyTorch",
        description="Writes the model with its class names and preprocessing (size, mean, std, resize) in the file's "
        "metadata, runs it on a few of the run's test images beside PyTorch and prints the largest difference; a "
        "difference above the tolerance is an error. ONNX needs pip install -e '.[export]'.",
    )
    p.add_argument("run", metavar="RUN", help="run name under --storage, or a path or URL of a run folder")
    p.add_argument("--storage", default="runs", help="storage root: folder or URL (default runs)")
    p.add_argument(
        "--round",
        type=int,
        dest="round_index",
        help="round to export (default: the run's best round, as download takes it; else the latest finished)",
    )
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="default onnx")
    p.add_argument("--to", required=True, help="file to write (e.g. model.onnx, model.pt2)")
    p.add_argument("--images", type=int, default=8, help="test images the check runs on (default 8)")
    p.set_defaults(func=cmd_export)


def cmd_prepare_folder(args) -> int:
    from pipeline.distributed.executor import choose_executor
    from pipeline.distributed.runtime import init_ray
    from stages.data.folder import REQUIRED_SPLITS
    from stages.data.resize import check_max_side
    from stages.prepare import prepare_folder, source_images
    from stages.storage.layout import CLASSES, PREPARE_CONFIG, PREPARE_SUMMARY

    if bool(args.src) == bool(args.csv_path):
        raise DataError("prepare-folder: give either SRC or --csv FILE")
    mode = {"auto": "auto", "ray": "ray", "off": "local"}[args.parallel]
    progress = not args.no_progress
    if args.labeled_only and not args.csv_path:
        raise DataError("prepare-folder: --labeled-only goes with --csv FILE")
    max_side = check_max_side(args.max_side, "--max-side")
    classes = None
    if args.classes:
        from stages.data.folder import read_classes

        try:
            classes = read_classes(args.classes)
        except ValueError as exc:
            raise DataError(f"--classes {exc}") from exc
    required = ("labeled",) if args.labeled_only else REQUIRED_SPLITS
    images = source_images(args.src, args.csv_path, required, classes)
    executor, why = choose_executor(mode, "", False, images, "", progress)
    if executor.kind == "ray":
        init_ray()
    print(f"prepare-folder: {executor.kind} ({why})", file=sys.stderr)
    summary = prepare_folder(
        args.src, args.out, executor, args.csv_path, args.shard_size, args.seed, progress, required, classes, max_side
    )
    counts = ", ".join(f"{s} {i['samples']} ({i['shards']} shard(s))" for s, i in summary["splits"].items())
    print(f"wrote {summary['out']}: {len(summary['classes'])} classes, {counts}")
    if summary["max_side"]:
        print(
            f"--max-side {summary['max_side']}: {summary['resized']} image(s) resized to that short side; image bytes "
            f"{summary['bytes_in'] / 2**20:.1f} MB read, {summary['bytes_out'] / 2**20:.1f} MB stored"
        )
    if summary["skipped_count"]:
        first = summary["skipped"][0]
        print(
            f"skipped {summary['skipped_count']} file(s), e.g. {first['path']}: {first['reason']} "
            f"(all listed in {Path(summary['out']) / PREPARE_SUMMARY})"
        )
    print(f"classes: {Path(summary['out']) / CLASSES}")
    print(f"data section: {Path(summary['out']) / PREPARE_CONFIG}")
    return 0


def cmd_predict(args) -> int:
    from stages.core.errors import BadSample
    from stages.data.shards import decode_image
    from stages.evaluate import predict_probs
    from stages.models.factory import load_model
    from stages.storage.layout import MODEL_CARD, MODEL_WEIGHTS, ModelFiles

    model_dir = Path(args.model)
    files = ModelFiles(model_dir)
    if not Path(files.card).is_file() or not Path(files.weights).is_file():
        raise DataError(f"--model {model_dir}: needs {MODEL_CARD} and {MODEL_WEIGHTS} (a round folder or download)")
    model, card = load_model(model_dir)
    names = card.get("classes") or [str(c) for c in range(card["num_classes"])]
    images = []
    for path in args.images:
        try:
            images.append(decode_image(Path(path).read_bytes(), card["input_size"][0]))
        except (OSError, BadSample) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from exc
    probs = predict_probs(model, images, card)
    k = max(1, min(args.topk, probs.shape[1]))
    results = []
    for path, p in zip(args.images, probs, strict=True):
        top = [int(c) for c in p.argsort()[::-1][:k]]
        results.append(
            {
                "image": path,
                "class": names[top[0]],
                "index": top[0],
                "probability": round(float(p[top[0]]), 6),
                "top": [{"class": names[c], "index": c, "probability": round(float(p[c]), 6)} for c in top],
            }
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from pipeline.report.text import columns

    lines = [
        (
            r["image"],
            r["class"],
            f"{r['probability']:.3f}",
            ", ".join(f"{t['class']}:{t['probability']:.3f}" for t in r["top"]),
        )
        for r in results
    ]
    print(columns(("image", "class", "probability", f"top-{k}"), lines))
    return 0


def cmd_export(args) -> int:
    from pipeline.cluster.run_store import RunStore
    from stages.models.export import export_model
    from stages.storage.layout import RunLayout

    for chatty in ("onnx_ir", "onnxscript"):  # a line per optimisation pass at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    store = RunStore(args.run, args.storage)
    finished = [r["round"] for r in store.rounds() if r["finished"]]
    if not finished:
        raise DataError(f"run {store.location} has no finished round to export")
    r = store.best_round(finished) if args.round_index is None else args.round_index  # as download chooses
    if r not in finished:
        raise DataError(f"run {store.location}: round {r} is not finished (finished: {finished})")
    model_dir = RunLayout(store.location).round(r).dir
    images = test_images(store, args.images)
    if not images:
        print("note: the run's test shards were not found; checking on random inputs", file=sys.stderr)
    result = export_model(model_dir, args.format, args.to, images)
    print(f"wrote {result['file']}: round {r} of {store.name}, {result['timm_model']}, {args.format}")
    print(f"classes: {', '.join(json.loads(result['classes']))}")
    print(f"preprocessing: {result['preprocessing']}")
    print(
        f"checked on {result['images']} image(s): largest |logit difference| to PyTorch {result['max_abs_diff']:.3g}, "
        f"top-1 agrees on {result['top1_agreement']:.0%}"
    )
    return 0


def test_images(store, count: int) -> list:
    """The first ``count`` images of the run's test shards (its config.yaml), or none when they cannot be read."""
    import yaml

    from stages.core.errors import BadSample
    from stages.data.shards import decode_image, expand_shards, image_field, iter_raw_samples
    from stages.storage.layout import CONFIG

    try:
        data = yaml.safe_load(_read_text(store, CONFIG)).get("data", {})
        images = []
        for shard in expand_shards(data.get("test", []), "data.test"):
            for sample in iter_raw_samples(shard):
                try:
                    images.append(decode_image(image_field(sample), int(data.get("channels", 1))))
                except BadSample:
                    continue
                if len(images) >= count:
                    return images
        return images
    except (OSError, DataError, ValueError, AttributeError):
        return []


def _read_text(store, rel: str) -> str:
    from stages.storage.files import join, read_text

    return read_text(join(store.location, rel))


def export_images(shards_of: dict[str, str], out: Path) -> dict[str, str]:
    """Each key's image bytes, as stored in its shard (``shards_of``: key -> shard), written to
    ``out/images/<key>.<ext>``; returns key -> that path relative to ``out``. Each shard is read once."""
    from stages.data.shards import IMAGE_EXTENSIONS, iter_raw_samples

    (out / "images").mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for shard in sorted(set(shards_of.values())):
        for sample in iter_raw_samples(shard):
            if shards_of.get(sample["__key__"]) == shard:
                ext = next(k for k in sample if k in IMAGE_EXTENSIONS)
                files[sample["__key__"]] = f"images/{sample['__key__']}.{ext}"
                (out / files[sample["__key__"]]).write_bytes(sample[ext])
    missing = sorted(set(shards_of) - set(files))
    if missing:
        raise DataError(f"{len(missing)} image(s) not found in their shards, e.g. {missing[0]}")
    return files


def cmd_suggest_labels(args) -> int:
    """``suggest-labels``: the images to label next (``stages.maths.classes.suggestion_order``)."""
    import csv
    import tempfile

    import numpy as np
    import pyarrow as pa
    import yaml

    from pipeline.cluster.run_store import RunStore
    from stages.core.stage import InProcess, LabelResources
    from stages.data.folder import classes_json
    from stages.data.shards import expand_shards
    from stages.maths.classes import margins, suggestion_order
    from stages.models.factory import model_sha
    from stages.pseudo_label import PseudoLabelConfig, label_shards
    from stages.storage.files import atomic_write_json, read_table
    from stages.storage.layout import CLASSES, CONFIG, SUGGESTED_LABELS, SUGGESTIONS, RunLayout, sidecar_file

    store = RunStore(args.run, args.storage)
    finished = [r["round"] for r in store.rounds() if r["finished"]]
    if not finished:
        raise DataError(f"run {store.location} has no finished round to ask")
    r = store.best_round(finished) if args.round_index is None else args.round_index
    if r not in finished:
        raise DataError(f"run {store.location}: round {r} is not finished (finished: {finished})")
    config = yaml.safe_load(_read_text(store, CONFIG))
    data = config["data"]
    shards = expand_shards(data["unlabeled"], "data.unlabeled")
    names = data.get("classes") or [str(c) for c in range(int(data["num_classes"]))]
    stuck = [names.index(s["class"]) for s in store.status().get("stuck_classes") or [] if s["class"] in names]
    model = RunLayout(store.location).round(r).model
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="ns-suggest-") as tmp:  # the model's predictions on the pool
        cfg, channels = PseudoLabelConfig(), int(data.get("channels", 1))
        label_shards(
            model.dir, model_sha(model), shards, tmp, cfg, channels, LabelResources(), InProcess(not args.no_progress)
        )
        table = pa.concat_tables(read_table(Path(tmp) / sidecar_file(s), ["key", "shard", "probs"]) for s in shards)
    probs = np.asarray(table.column("probs").to_pylist(), dtype=np.float32)
    rows, why = suggestion_order(probs, stuck, args.n)
    picked = {table.column("key")[int(i)].as_py(): int(i) for i in rows}
    shards_of = {key: table.column("shard")[i].as_py() for key, i in picked.items()}
    files = export_images(shards_of, out)
    margin = margins(probs)
    atomic_write_json(out / CLASSES, classes_json(names))  # the run's numbering, for prepare-folder --classes
    with open(out / SUGGESTIONS, "w", newline="") as f, open(out / SUGGESTED_LABELS, "w", newline="") as g:
        suggestions, labels = csv.writer(f), csv.writer(g)
        suggestions.writerow(["key", "image", "predicted", "confidence", "margin", "why"])
        labels.writerow(["path", "label", "split"])
        for (key, i), reason in zip(picked.items(), why, strict=True):
            predicted = names[int(probs[i].argmax())]
            suggestions.writerow([key, files[key], predicted, f"{probs[i].max():.4f}", f"{margin[i]:.4f}", reason])
            labels.writerow([files[key], predicted, "labeled"])
    print(
        f"wrote {len(picked)} suggestions from round {r} of {store.name} to {out}: images/, {SUGGESTIONS}, "
        f"{SUGGESTED_LABELS}"
    )
    if stuck:
        print(f"classes left behind (run.json): {', '.join(names[c] for c in stuck)}")
    labels = out / SUGGESTED_LABELS
    print(
        f"next: correct the labels in {labels}, then python -m pipeline prepare-folder --csv {labels} --labeled-only "
        f"--classes {out / CLASSES} --out NEW; add NEW/labeled/*.tar to data.labeled"
    )
    return 0
