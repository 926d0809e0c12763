"""Reading a source bundle's graphs (verified bytes) and writing the quantized bundle atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a private temp dir next to `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is ordinary data
    try:
        yield tmp
        for p in tmp.iterdir():  # durable before it becomes visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_graph(model: onnx.ModelProto, path: Path) -> str:
    """Save one self-contained graph file; returns its sha256."""
    blob = model.SerializeToString()
    if len(blob) > 1_800_000_000:
        raise QuantError(f"{path.name} would exceed protobuf's 2 GB limit; external data is not written yet")
    path.write_bytes(blob)
    return sha256_file(path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def bundle_path_size(root: Path, rel: str) -> int:
    return (Path(root) / rel).stat().st_size
