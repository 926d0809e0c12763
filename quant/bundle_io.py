"""Reading a source bundle's graphs (verified bytes) and writing graph files (edgevlm.atomic makes the bundle atomic)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

from edgevlm.bundle import MANIFEST, Bundle, sha256_file
from edgevlm.errors import IntegrityError
from edgevlm.manifest import Component

from .graphs import QuantError


def read_verified(bundle: Bundle, rel: str, sha256: str) -> bytes:
    """A bundle file's bytes, checked against the manifest's sha256 (once read, they are what we use)."""
    blob = bundle.path(rel).read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise IntegrityError(f"bundle file {rel!r} no longer matches its sha256: the source changed while reading")
    return blob


def load_graph(bundle: Bundle, comp: Component) -> onnx.ModelProto:
    """The component's graph, external data included, from verified bytes."""
    if not comp.data_files:
        return onnx.load_model_from_string(read_verified(bundle, comp.file, comp.sha256))
    for ref in comp.data_files:  # verify, then let onnx read them by path
        read_verified(bundle, ref.file, ref.sha256)
    return onnx.load(str(bundle.path(comp.file)), load_external_data=True)


def bundle_bytes(root: Path) -> int:
    """Bytes of every file in a bundle directory (the manifest included)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def write_graph(model: onnx.ModelProto, path: Path) -> str:
    """Save one self-contained graph file; returns its sha256."""
    blob = model.SerializeToString()
    if len(blob) > 1_800_000_000:
        raise QuantError(f"{path.name} would exceed protobuf's 2 GB limit; external data is not written yet")
    path.write_bytes(blob)
    return sha256_file(path)


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def bundle_path_size(root: Path, rel: str) -> int:
    return (Path(root) / rel).stat().st_size
