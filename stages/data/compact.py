"""Compact training shards: the selected pseudo-labeled samples of one unlabeled shard, in training order.

Why. The student used to stream every unlabeled shard in full and drop the rows selection had not kept: with a
per-class budget K far below the unlabeled set, its epoch read 564x (10k/50k run) to 1,812x (100k/500k run) the
bytes it trained on. The select stage already knows which samples each shard keeps, so its last pass copies them
into ``<selection>/<shard_id>.tar`` beside the selection sidecar ``<shard_id>.parquet``, and training reads those:
every member read is trained on.

Layout. The sidecar's rows are in a seeded random order (``stages.maths.selection.training_order``); the tar holds
every file of each selected sample as it was in the unlabeled shard (image, and whatever else the sample carried),
its copies materialised and spread over the shard (``stages.maths.selection.copy_order``), copy ``j > 0`` under the
key ``<key>_copy<j>`` (``copy_keys``). Member ``i`` is thus row ``copy_order(copies)[i]`` of the sidecar, which
holds its target: the loader zips the two and refuses a tar that does not match. Materialising copies costs the
duplicated bytes once on disk, and buys a reader that never skips or buffers a sample to duplicate it.

Trust. The tar is written first, then the sidecar (``stages.storage.artifacts.write_table``), whose footer records
what made the selection (``made_by``), a digest of its rows, and the tar's receipt (``tar_bytes``, ``tar_sha256``,
``train_members``): a sidecar is trusted only with a tar that matches it (or no rows). A shard with nothing
selected has an empty sidecar and no tar (an earlier plan's is removed); ``pseudo_sources`` lists the others for
training from the sidecar footers (a selected shard whose tar is missing then fails loudly in the loader rather than
being silently left out).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
from webdataset import TarWriter

from stages.core.errors import DataError
from stages.data.loader import PseudoSource
from stages.data.shards import iter_raw_samples
from stages.maths.selection import copy_keys, training_order
from stages.storage.artifacts import Footer, file_matches, read_footer, trusted_table, write_table
from stages.storage.files import Location, atomic_target, join, remove_file, sha256_file
from stages.storage.layout import compact, sidecar_file

SELECTION_FORMAT = "selection/v3"


def write_compact_shard(source: str, keys, copies: np.ndarray, path: Location) -> dict:
    """Copy the selected samples of ``source`` into the tar ``path``, member ``i`` being row ``copy_order[i]``.

    ``source`` is read once; only the selected samples' bytes are held. Returns ``{"train_members",
    "tar_bytes", "tar_sha256"}``: samples written (copies counted), the tar's size and sha256.
    """
    order, members = copy_keys(keys, copies)
    wanted = {str(k): None for k in keys}
    for sample in iter_raw_samples(source):
        if sample["__key__"] in wanted:
            wanted[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    missing = [k for k, files in wanted.items() if files is None]
    if missing:
        raise DataError(f"shard {source}: {len(missing)} selected sample(s) not in it, e.g. {missing[0]!r}")
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=0)  # the bytes as read; mtime 0: same inputs, same tar
            for row, member in zip(order.tolist(), members, strict=True):
                writer.write({"__key__": member, **wanted[str(keys[row])]})
            writer.close()
        receipt = {"tar_bytes": os.path.getsize(tmp), "tar_sha256": sha256_file(tmp)}  # hashed once, as written
    return {"train_members": len(members), **receipt}


def write_selection(table: pa.Table, path: Location, seed: int, made_by: str, **meta: str) -> dict:
    """Write one shard's selection: its compact training shard, then the sidecar ``path``, both in training order.

    ``table`` holds the shard's selected rows (``key``, ``shard``: the unlabeled shard they come from, ``copies``,
    ``label``, targets), in any order; ``meta`` goes into the sidecar's footer. Returns ``{"train_members",
    "tar_bytes", "tar_sha256"}`` (zeros, and no tar, when nothing is selected).
    """
    order = training_order(table.column("key").to_numpy(zero_copy_only=False), seed)
    table = table.take(pa.array(order, pa.int64()))
    train = {"train_members": 0, "tar_bytes": 0, "tar_sha256": ""}
    if table.num_rows:  # the tar first: a sidecar on disk vouches for the tar beside it
        keys, copies = table.column("key").to_numpy(zero_copy_only=False), table.column("copies").to_numpy()
        train = write_compact_shard(table.column("shard")[0].as_py(), keys, copies, compact(path))
    else:  # nothing kept: a tar left by an earlier plan would only take disk space
        remove_file(compact(path))
    write_table(table, path, format=SELECTION_FORMAT, made_by=made_by, **train, **meta)
    return train


def trusted_selection(path: Location, made_by: str, verify: bool = True) -> Footer | None:
    """The footer of a selection these inputs made, whose rows and compact tar are whole (``verify``), or None."""
    footer = trusted_table(path, SELECTION_FORMAT, made_by, verify)
    if footer is None or footer.rows == 0:
        return footer
    receipt = {"bytes": footer.meta.get("tar_bytes", -1), "sha256": footer.meta.get("tar_sha256")}
    return footer if file_matches(compact(path), receipt, verify) else None


def pseudo_sources(selection_dir: Location, shards: list[str]) -> list[PseudoSource]:
    """The training input of a selection: ``(compact tar, sidecar)`` of each shard with selected rows.

    Listed from the sidecar footers (written after their tars), not from the tars found: a tar missing for a
    non-empty sidecar is an error the loader reports, never a shard quietly dropped from training.
    """
    sources = []
    for shard in shards:
        sidecar = join(selection_dir, sidecar_file(shard))
        footer = read_footer(sidecar, SELECTION_FORMAT)
        if footer is None:
            raise DataError(f"selection sidecar {sidecar} is missing or incomplete; run the select stage again")
        if footer.rows:
            sources.append(PseudoSource(str(compact(sidecar)), str(sidecar)))
    return sources
