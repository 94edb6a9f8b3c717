"""KubeRay's own CRD schemas, made strict, to validate deploy/kuberay manifests offline (tests/test_deploy.py).

The schemas are KubeRay v1.7.0's CRDs, vendored gzipped in ``tests/fixtures/kuberay-crds-v1.7.0/`` (its README says
where they come from). Kubernetes prunes unknown fields instead of rejecting them, so the CRD as written would let a
misspelt field through: here every object schema with ``properties`` and no ``x-kubernetes-preserve-unknown-fields``
is closed (``additionalProperties: false``). ``x-kubernetes-int-or-string`` becomes integer-or-string and
``nullable`` adds null. CEL rules (``x-kubernetes-validations``) are not evaluated: the v1.7.0 ones only guard fields
these manifests do not set (managedBy, deletionStrategy, GCS fault tolerance).

    from kuberay_schema import strict_errors
    assert strict_errors(yaml.safe_load(open("deploy/kuberay/raycluster.yaml"))) == []
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "fixtures" / "kuberay-crds-v1.7.0"
FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}


def crd_text(kind: str) -> bytes:
    return gzip.decompress((CRDS / FILES[kind]).read_bytes())


def recorded_digests() -> dict[str, str]:
    """file name -> sha256 of the uncompressed CRD, as the fixtures README records them."""
    text = (CRDS / "README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^\s+([0-9a-f]{64})\s+(\S+)$", text, flags=re.M)}


def crd_digest(kind: str) -> str:
    return hashlib.sha256(crd_text(kind)).hexdigest()


def _strict(node: dict) -> dict:
    """A copy of an OpenAPI v3 (structural) schema node with the Kubernetes extensions spelled as JSON Schema."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: _strict(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_strict(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


@functools.cache
def strict_validator(kind: str) -> jsonschema.Draft4Validator:
    """The closed ``v1`` schema of ``kind`` (RayCluster or RayJob), built once per session (~0.3 s each)."""
    crd = yaml.load(crd_text(kind), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, f"{FILES[kind]} is not the {kind} CRD"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    # OpenAPI 3.0 schemas are draft-4 style (boolean exclusiveMinimum and friends).
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def strict_errors(doc: dict) -> list[str]:
    """Every schema violation of a RayCluster or RayJob document, as ``$.json.path: message``; [] when valid."""
    errors = strict_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)
