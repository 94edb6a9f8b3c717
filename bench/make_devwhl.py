"""Collect the wheels that ``bench/gpu_check.sh`` installs on a GPU machine with no package registry.

    python bench/make_devwhl.py [--out .devwhl] [--python 3.12]

That machine has torch, torchvision, timm, pyarrow, pandas, numpy and pytest of its own; this fetches, for its
Python, Ray (with what Ray Data, Ray Train and the dashboard import) and WebDataset, at the versions this
project's venv holds. Ray's wheel (79 MB) is rewritten without its Java jar, RLlib, Ray LLM and the dashboard's
source maps, which nothing here imports (43 MB), so that the whole folder stays under a 64 MiB transfer limit.
"""

from __future__ import annotations

import sys

sys.path.append(sys.path.pop(0))  # this folder last: bench/select.py must not shadow the stdlib select module

import argparse
import subprocess
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

# Not on that machine's image (read off it on 2026-11-17), imported by ray[default,data,train] or the project.
NEEDED = (
    "ray aiohttp-cors annotated-types braceexpand colorful google-api-core google-auth googleapis-common-protos "
    "jsonschema jsonschema-specifications referencing rpds-py opencensus opencensus-context opentelemetry-api "
    "opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions "
    "proto-plus pyasn1 pyasn1_modules pydantic pydantic_core smart_open tensorboardX typing-inspection webdataset "
    "cryptography cffi pycparser timm"
).split()
UNUSED = ("ray/jars/", "ray/rllib/", "ray/llm/")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)] + ["manylinux2014_x86_64"]


def strip_ray(wheel: Path, out: Path) -> None:
    """Copy of ``wheel`` without the ``UNUSED`` files, its RECORD listing only what is left."""

    def keep(name: str) -> bool:
        return not name.startswith(UNUSED) and not name.endswith(".js.map")

    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if keep(ln.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".devwhl"))
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python")
    args = parser.parse_args()
    pins = [f"{name}=={metadata.version(name)}" for name in NEEDED]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        cmd += ["--python-version", args.python, "--implementation", "cp"]
        cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([*cmd, *pins], check=True)
        for wheel in Path(tmp).glob("*.whl"):
            target = args.out / wheel.name
            if wheel.name.startswith("ray-"):
                strip_ray(wheel, target)
            else:
                target.write_bytes(wheel.read_bytes())
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
