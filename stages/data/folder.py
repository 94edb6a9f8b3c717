"""From a folder of images (or a CSV list of them) to WebDataset shards: scanning, planning shards, writing one.

A source folder holds ``labeled/<class>/…``, ``test/<class>/…``, optionally ``val/<class>/…`` (class folders may
nest further), and ``unlabeled/…`` (any depth, no labels). A CSV file lists ``path,label,split`` instead (paths
relative to the CSV's folder; ``label`` empty for ``unlabeled`` rows, where one that is given is written as a
diagnostic ``.cls`` only). Classes are numbered like torchvision's ``ImageFolder``: their names sorted.

``scan_folder`` / ``scan_csv`` list the images and refuse what cannot be meant (a class folder with no image, an
image in ``labeled/`` outside any class folder, a CSV row whose file is missing) with one ``DataError`` line;
files that are not images are listed as skipped, never silently. ``plan_shards`` packs each split into shards of
about ``shard_bytes`` of source images in a seeded, shuffled order (so a shard is not one class), and ``write_shard``
writes one with webdataset's ``TarWriter``: images copied byte for byte (or, with ``max_side``, those whose short
side is larger shrunk to it and re-encoded: ``stages/data/resize.py``), keys derived from the file's path, fixed
mtimes (the same tree gives the same bytes). An image Pillow cannot decode is skipped and listed in the shard's
record (``<split>-NNNNNN.json`` beside it), which also lets a re-run skip a shard whose plan (images and
``max_side``) has not changed.

The fan-out (one task per shard on the executor) is ``stages/prepare.py``
(``python -m pipeline prepare-folder SRC --out DIR``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from stages.core.errors import BadSample, DataError
from stages.data.resize import fit_short_side
from stages.data.shards import IMAGE_EXTENSIONS, decode_image
from stages.storage.artifacts import trusted_receipt, write_receipt
from stages.storage.files import atomic_target

SPLITS = ("labeled", "val", "test", "unlabeled")
LABELED_SPLITS = ("labeled", "val", "test")
REQUIRED_SPLITS = ("labeled", "test", "unlabeled")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
RECORD_FORMAT = "prepare-folder/v3"  # v3: max_side in the plan, resized and byte counts in the record
COUNTS = ("samples", "gray", "color", "resized", "bytes_in", "bytes_out")  # a shard record's counts, summed per run


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One image to copy: its absolute path, its path as the source names it (the key comes from it), its class
    index (-1: none), and size and mtime (a changed file changes its shard's plan)."""

    path: str
    rel: str
    label: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """A WebDataset key: readable (the path, dots and separators made ``_``) and unique (a hash of the path)."""
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(self.rel)[0]).strip("_")[-80:]
        return f"{stem}-{hashlib.sha1(self.rel.encode()).hexdigest()[:8]}"

    @property
    def ext(self) -> str:
        return os.path.splitext(self.path)[1].lower().lstrip(".")


@dataclasses.dataclass(frozen=True)
class Scan:
    """What a source holds: class names (index = position), the images per split, and skipped non-images."""

    classes: tuple[str, ...]
    images: dict[str, list[SourceImage]]
    skipped: list[dict]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One shard to write: ``<out>/<split>/<split>-NNNNNN.tar``, the images that go into it, in order, and the
    short side above which an image is shrunk (0: none is)."""

    split: str
    index: int
    out: str
    images: tuple[SourceImage, ...]
    max_side: int = 0

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def path(self) -> str:
        return os.path.join(self.out, self.split, f"{self.name}.tar")

    @property
    def record_path(self) -> str:
        return os.path.join(self.out, self.split, f"{self.name}.json")

    def digest(self) -> str:
        items = [(i.rel, i.label, i.size, i.mtime_ns) for i in self.images]
        return hashlib.sha256(json.dumps([RECORD_FORMAT, self.max_side, items]).encode()).hexdigest()


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def _source(path: str, rel: str, label: int) -> SourceImage:
    st = os.stat(path)
    return SourceImage(os.path.abspath(path), rel.replace(os.sep, "/"), label, st.st_size, st.st_mtime_ns)


def _walk(root: str, skipped: list[dict]) -> list[str]:
    """Every image file under ``root`` (sorted, symlinks followed); other files go to ``skipped``."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if _is_image(name):
                found.append(path)
            else:
                skipped.append({"path": path, "reason": "not an image file (" + ", ".join(IMAGE_EXTENSIONS) + ")"})
    return found


def scan_folder(src: str | Path) -> Scan:
    """The images of an ImageFolder-style source; a layout that cannot be meant is one ``DataError`` line."""
    src = str(src)
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a folder (expected labeled/<class>/…, test/<class>/…, unlabeled/…)")
    entries = sorted(e for e in os.listdir(src) if not e.startswith("."))
    unknown = [e for e in entries if os.path.isdir(os.path.join(src, e)) and e not in SPLITS]
    if unknown:
        raise DataError(f"{src}/{unknown[0]}: unknown split folder; expected {', '.join(SPLITS)} (val optional)")
    missing = [s for s in REQUIRED_SPLITS if not os.path.isdir(os.path.join(src, s))]
    if missing:
        raise DataError(f"{src}: no {missing[0]}/ folder (needs labeled/<class>/…, test/<class>/…, unlabeled/…)")
    skipped: list[dict] = []
    skipped += [{"path": os.path.join(src, e), "reason": "not in a split folder"} for e in entries if e not in SPLITS]
    per_class: dict[str, dict[str, list[str]]] = {}
    for split in LABELED_SPLITS:
        root = os.path.join(src, split)
        if os.path.isdir(root):
            per_class[split] = _class_folders(root, split, skipped)
    classes = tuple(sorted({c for folders in per_class.values() for c in folders}))
    index = {c: i for i, c in enumerate(classes)}
    images: dict[str, list[SourceImage]] = {}
    for split, folders in per_class.items():
        images[split] = [_source(p, os.path.relpath(p, src), index[c]) for c, paths in folders.items() for p in paths]
    images["unlabeled"] = [
        _source(p, os.path.relpath(p, src), -1) for p in _walk(os.path.join(src, "unlabeled"), skipped)
    ]
    if not images["unlabeled"]:
        raise DataError(f"{src}/unlabeled: no images (.{'/.'.join(IMAGE_EXTENSIONS)})")
    return Scan(classes, images, skipped)


def _class_folders(root: str, split: str, skipped: list[dict]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith("."):
            skipped.append({"path": path, "reason": "hidden"})
        elif os.path.isdir(path):
            folders[entry] = _walk(path, skipped)
            if not folders[entry]:
                raise DataError(
                    f"{path}: class folder with no images (.{'/.'.join(IMAGE_EXTENSIONS)}); remove it or add images"
                )
        elif _is_image(entry):
            raise DataError(f"{path}: image in {split}/ outside any class folder; move it into {split}/<class>/")
        else:
            skipped.append({"path": path, "reason": "not an image file"})
    if not folders:
        raise DataError(f"{root}: no class folders (expected {split}/<class>/<image>)")
    return folders


def scan_csv(
    csv_path: str | Path, required: Sequence[str] = REQUIRED_SPLITS, classes: Sequence[str] | None = None
) -> Scan:
    """The images a ``path,label,split`` CSV lists (paths relative to its folder); a bad row is one line.

    ``required``: the splits it must hold rows of (only ``labeled`` for images added to a run's labeled set).
    ``classes``: the class names by index to number labels with (a run's own, so that added images get its indices);
    by default the labeled rows' names, sorted."""
    csv_path = str(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0]) if rows else set()
    except OSError as exc:
        raise DataError(f"--csv {csv_path}: cannot read it ({exc.strerror or exc})") from exc
    if not {"path", "label", "split"} <= columns:
        raise DataError(f"{csv_path}: needs a header with columns path,label,split (found {sorted(columns) or 'none'})")
    listed, skipped = [], []
    for line, row in enumerate(rows, start=2):
        split, label, rel = (row["split"] or "").strip(), (row["label"] or "").strip(), (row["path"] or "").strip()
        where = f"{csv_path}:{line}"
        if split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if split in LABELED_SPLITS and not label:
            raise DataError(f"{where}: a {split} row needs a label")
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        if not os.path.isfile(path):
            raise DataError(f"{where}: no file {path}")
        if not _is_image(path):
            skipped.append({"path": path, "reason": "not an image file"})
            continue
        listed.append((split, label, path, rel))
    found = {label for split, label, _, _ in listed if split in LABELED_SPLITS}
    if classes is not None:
        unknown = sorted(found - set(classes))
        if unknown:
            raise DataError(f"{csv_path}: label {unknown[0]!r} is not one of the classes given ({', '.join(classes)})")
    classes = tuple(classes) if classes is not None else tuple(sorted(found))
    index = {c: i for i, c in enumerate(classes)}
    images: dict[str, list[SourceImage]] = {s: [] for s in SPLITS}
    for split, label, path, rel in listed:
        if split == "unlabeled" and label and label not in index:
            raise DataError(f"{csv_path}: unlabeled row {rel} has label {label!r}, which no labeled row has")
        images[split].append(_source(path, rel, index.get(label, -1)))
    for split in required:
        if not images[split]:
            raise DataError(f"{csv_path}: no {split} rows")
    return Scan(classes, {s: v for s, v in images.items() if v}, skipped)


def plan_shards(scan: Scan, out: str, shard_bytes: int, seed: int = 0, max_side: int = 0) -> list[ShardPlan]:
    """Each split in a seeded shuffled order (a sorted tree would put one class per shard), cut into shards of at
    most ``shard_bytes`` of source images (tar headers counted; an image larger than that gets a shard of its own;
    images shrunk to ``max_side`` make the shard smaller: their size is known only once they are re-encoded)."""
    plans = []
    for split in SPLITS:
        items = sorted(scan.images.get(split, []), key=lambda i: i.rel)
        random.Random(f"{seed}-{split}").shuffle(items)
        shard: list[SourceImage] = []
        used = 0
        for item in items:
            cost = item.size + 3 * 512  # the image's header and padding, and the .cls member
            if shard and used + cost > shard_bytes:
                plans.append(ShardPlan(split, len([p for p in plans if p.split == split]), out, tuple(shard), max_side))
                shard, used = [], 0
            shard.append(item)
            used += cost
        if shard:
            plans.append(ShardPlan(split, len([p for p in plans if p.split == split]), out, tuple(shard), max_side))
    return plans


def shard_done(plan: ShardPlan) -> dict | None:
    """The record of a shard written for this very plan, whose tar still matches it (size and sha256), else None."""
    return trusted_receipt(plan.record_path, plan.path, RECORD_FORMAT, plan.digest())


def write_shard(plan: ShardPlan) -> dict:
    """Write one shard (atomically) and its record; returns the record: skipped images and the ``COUNTS`` (samples,
    gray/colour, images shrunk to ``plan.max_side``, image bytes read and stored). Images are written as their
    original bytes unless shrunk, and checked by decoding what is written (as training will)."""
    import webdataset as wds

    counts, skipped = dict.fromkeys(COUNTS, 0), []
    with atomic_target(plan.path) as tmp:
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for image in plan.images:
                try:
                    data = Path(image.path).read_bytes()
                    stored, ext = fit_short_side(data, image.ext, plan.max_side)
                    mode = _decodable_mode(stored)
                except (OSError, BadSample) as exc:
                    skipped.append({"path": image.path, "reason": str(exc)})
                    continue
                sample = {"__key__": image.key, ext: stored}
                if image.label >= 0:
                    sample["cls"] = str(image.label).encode()
                sink.write(sample)
                counts["samples"] += 1
                counts["gray" if mode in GRAY_MODES else "color"] += 1
                counts["resized"] += stored is not data
                counts["bytes_in"] += len(data)
                counts["bytes_out"] += len(stored)
    meta = {"split": plan.split, "index": plan.index, "max_side": plan.max_side, **counts, "skipped": skipped}
    return write_receipt(plan.record_path, plan.path, format=RECORD_FORMAT, made_by=plan.digest(), **meta)


def _decodable_mode(data: bytes) -> str:
    """The image's Pillow mode, after decoding it whole the way training will (``stages.data.shards.decode_image``)."""
    decode_image(data, 3)
    return Image.open(io.BytesIO(data)).mode


def read_classes(source: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Class names by index from a ``classes.json`` (a list, or ``{"0": name, ...}``) or a list of names."""
    if isinstance(source, (str, Path)):
        try:
            loaded = json.loads(Path(source).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {source}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not JSON ({exc})") from exc
        if isinstance(loaded, dict):
            if sorted(loaded, key=str) != sorted(map(str, range(len(loaded))), key=str):
                raise ValueError(f"{source}: keys must be the indices 0..{len(loaded) - 1}")
            loaded = [loaded[str(i)] for i in range(len(loaded))]
        where = str(source)
    else:
        loaded, where = list(source), "the list"
    if not isinstance(loaded, list) or not all(isinstance(n, str) and n for n in loaded):
        raise ValueError(f"{where}: expected a list of class names (or {{index: name}})")
    if len(set(loaded)) != len(loaded):
        raise ValueError(f"{where}: class names repeat: {sorted({n for n in loaded if loaded.count(n) > 1})}")
    return tuple(loaded)


def classes_json(classes: Iterable[str]) -> dict[str, str]:
    """``{"0": name, ...}``: index to name, as ``classes.json`` holds it."""
    return {str(i): name for i, name in enumerate(classes)}


def shard_pattern(out: str, split: str, count: int) -> str:
    """A brace pattern naming a split's ``count`` shards (``.../labeled-{000000..000003}.tar``)."""
    name = f"{split}-{{000000..{count - 1:06d}}}" if count > 1 else f"{split}-000000"
    return os.path.join(out, split, f"{name}.tar")
