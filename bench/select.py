"""Selection at scale: the real select stage (three passes of Ray tasks) over synthetic pseudo-label sidecars.

    python bench/select.py --rows 10000000 --classes 1000 [--shards 1000] [--topk 5] [--payload-bytes 64]
    python bench/select.py --rows 20000 --classes 100 --no-save                                  # a smoke run

Writes ``--shards`` sidecars in the pseudo-label stage's format (top-k soft labels, float16, the stage's footer),
with class sizes drawn from a Zipf-like law (so some classes are cut to K and others duplicated) and confidences
from a Beta law, and beside each the unlabeled shard it labels: a tar with one ``--payload-bytes`` member per row
(pass 3 reads it to copy the selected samples into the compact training shards, as the stage does with real
images). Then times ``stages.select.select_shards`` with the paper's settings (floor 0.3, balanced, K derived) on
the Ray executor (``RayExecutor``: Ray tasks on a running local Ray; ``--executor local``: the same passes in this
process) (``ray.init``, sidecar and shard generation not timed). Peak RSS is the largest resident set of this
process or any Ray worker during the stage (see ``bench_common.PeakRss``).
Final line: ``{"bench": "select", "rows": N, "classes": C, "seconds": s, "peak_rss_mb": m, ...}``, also saved
to ``bench/results/`` (``--no-save`` for smoke runs).
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: this file must not shadow the stdlib select module

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import PeakRss, add_result_args, save_result  # noqa: E402

from stages.data.shards import write_shards  # noqa: E402
from stages.pseudo_label import SIDECAR_FORMAT  # noqa: E402
from stages.storage.artifacts import write_table  # noqa: E402


def _list_column(matrix: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), dtype), matrix.shape[1]).cast(pa.list_(dtype))


def make_sidecars(
    root: Path, rows: int, classes: int, shards: int, topk: int, payload: int, seed: int = 0
) -> list[str]:
    """``shards`` sidecars under ``root/pseudo_labels`` and the unlabeled shards they label under
    ``root/unlabeled``."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1) ** 0.8
    weights /= weights.sum()
    paths = []
    (root / "pseudo_labels").mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(np.diff(np.linspace(0, rows, shards + 1).astype(np.int64))):
        keys = [f"{s:06d}-{i:07d}" for i in range(n)]
        samples = [{"__key__": k, "bin": bytes(payload)} for k in keys]
        (shard,) = write_shards(samples, root / "unlabeled", f"unlabeled-{s:06d}", 1)
        labels = rng.choice(classes, size=n, p=weights).astype(np.int32)
        conf = rng.beta(4.0, 1.5, size=n).astype(np.float32)
        others = (labels[:, None] + rng.integers(1, classes, size=(n, topk - 1))) % classes
        idx = np.concatenate([labels[:, None], others], axis=1).astype(np.int32)
        rest = (1 - conf)[:, None] * rng.dirichlet(np.ones(topk - 1), size=n)
        prob = np.concatenate([conf[:, None], rest], axis=1).astype(np.float16)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "shard": pa.array([shard] * n, pa.string()),
                "label": pa.array(labels),
                "confidence": pa.array(conf),
                "true_label": pa.array(np.full(n, -1, np.int32)),
                "topk_idx": _list_column(idx, pa.int32()),
                "topk_prob": _list_column(prob, pa.float16()),
            }
        )
        path = root / "pseudo_labels" / f"unlabeled-{s:06d}.parquet"
        write_table(table, path, format=SIDECAR_FORMAT, made_by="bench/select.py", bad="[]")
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=0, help="default: one per 10,000 rows")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--payload-bytes", type=int, default=64, help="bytes of each unlabeled sample's one member")
    ap.add_argument("--executor", choices=("ray", "local"), default="ray", help="Ray tasks (default) or this process")
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    add_result_args(ap)
    args = ap.parse_args()
    shards = args.shards or max(1, args.rows // 10_000)

    from pipeline.distributed.executor import RayExecutor
    from pipeline.distributed.runtime import init_ray
    from stages.core.stage import InProcess
    from stages.maths.selection import SelectConfig
    from stages.select import select_shards

    with tempfile.TemporaryDirectory(prefix="bench-select-", dir=args.dir or None) as tmp:
        root = Path(tmp)
        print(f"writing {args.rows:,} rows in {shards} sidecars and unlabeled shards ...", file=sys.stderr)
        sidecars = make_sidecars(root, args.rows, args.classes, shards, args.topk, args.payload_bytes)
        if args.executor == "ray":
            init_ray()
        executor = RayExecutor() if args.executor == "ray" else InProcess()
        cfg = SelectConfig()
        with PeakRss() as rss:
            summary = select_shards(sidecars, root / "selection", args.classes, cfg, "bench/select.py", executor)
        out_mb = sum(f.stat().st_size for f in (root / "selection").glob("*.parquet")) / 2**20
        compact_mb = sum(f.stat().st_size for f in (root / "selection").glob("*.tar")) / 2**20
    result = {
        "bench": "select",
        "setting": f"{args.rows:,} rows, {args.classes:,} classes, top-{args.topk}"
        + (" in-process" if args.executor == "local" else ""),
        "rows": args.rows,
        "classes": args.classes,
        "shards": shards,
        "seconds": summary["seconds"],
        "peak_rss_mb": round(rss.peak / 2**20),
        "rows_per_s": round(args.rows / summary["seconds"]),
        "K": summary["K"],
        "kept": summary["kept"],
        "copies_out": summary["copies_out"],
        "dropped_by_floor": summary["dropped_by_floor"],
        "output_mb": round(out_mb, 1),
        "compact_mb": round(compact_mb, 1),  # the compact training shards pass 3 wrote
        "payload_bytes": args.payload_bytes,
        "executor": summary["ran_as"],
        "cpus": os.cpu_count(),
    }
    save_result(result, "select", args)


if __name__ == "__main__":
    main()
