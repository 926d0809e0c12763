"""Open a bundle directory: parse the manifest, confine every path, verify every sha256.

Opening hashes every file (streamed: one chunk in memory at a time) before anything parses any of them. A file
handed out later (`Bundle.read`) is read into memory and hashed again there, so the bytes a parser sees are
bytes that were checked (no window between the check and the use), and loading holds one file at a time: the
peak is the largest graph, not the whole bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BundleError, IntegrityError
from .manifest import Manifest, parse_manifest
from .onnx_refs import external_locations

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def confined(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths, `..`, and symlinks that lead out of `root`."""
    if not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"bundle path {rel!r} is not a plain relative path")
    p = Path(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or rel.startswith("/"):
        raise BundleError(f"bundle path {rel!r} leaves the bundle directory")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"bundle path {rel!r} resolves outside the bundle directory (symlink?)")
    return full


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    sha256: str  # of manifest.json: names the whole bundle, since it pins every file's hash
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def read(self, rel: str) -> bytes:
        """A bundle file's bytes, hashed again as read (IntegrityError if it changed since the bundle opened)."""
        want = self._hashes.get(rel)
        if want is None:
            raise BundleError(f"{rel!r} is not a verified file of this bundle")
        full = confined(self.root, rel)
        try:
            blob = full.read_bytes()
        except OSError as e:
            raise BundleError(f"bundle file {rel!r} cannot be read: {e.strerror or e}") from None
        _check_hash(rel, want, hashlib.sha256(blob).hexdigest())
        return blob

    def path(self, rel: str) -> Path:
        return confined(self.root, rel)


def _check_hash(rel: str, want: str, got: str) -> None:
    if got != want:
        raise IntegrityError(
            f"bundle file {rel!r} does not match its sha256 in {MANIFEST} "
            f"(expected {want[:12]}…, found {got[:12]}…): the bundle is damaged or was tampered with")


def read_manifest(raw: bytes) -> Manifest:
    """manifest.json's bytes -> Manifest; anything else than a valid manifest is a BundleError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is {len(raw)} bytes; refusing more than {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, and ints over 4300 digits
        raise BundleError(f"{MANIFEST} is not valid JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST} nests too deeply to be a manifest") from None
    return parse_manifest(data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; a manifest may not


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Parse and verify a bundle; raises BundleError / IntegrityError with a message saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {str(path)!r} is not a directory")
    mpath = confined(root, MANIFEST)  # a manifest symlinked from elsewhere is refused too
    if not mpath.is_file():
        raise BundleError(f"bundle {str(path)!r} has no {MANIFEST}")
    raw = mpath.read_bytes()
    manifest = read_manifest(raw)
    bundle = Bundle(root=root, manifest=manifest, sha256=hashlib.sha256(raw).hexdigest())

    refs = manifest.files()
    names = [r.file for r in refs]
    if len(set(names)) != len(names):
        raise BundleError(f"{MANIFEST} names a file twice")
    onnx_files = {comp.file: (name, comp) for name, comp in manifest.components.items() if comp.backend == "onnx"}
    for ref in refs:
        full = confined(root, ref.file)
        if not full.is_file():
            raise BundleError(f"bundle file {ref.file!r} named in {MANIFEST} is missing")
        if ref.file in onnx_files:  # a graph is read whole once here: its external-data locations are checked
            blob = full.read_bytes()
            _check_hash(ref.file, ref.sha256, hashlib.sha256(blob).hexdigest())
            _check_external_data(*onnx_files[ref.file], blob)
            del blob
        else:
            _check_hash(ref.file, ref.sha256, sha256_file(full))
        bundle._hashes[ref.file] = ref.sha256
    known = set(names) | {MANIFEST}
    extra = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in known)
    if extra:
        raise BundleError(f"bundle holds file(s) not named in {MANIFEST}: {', '.join(extra[:5])}")
    return bundle


def _check_external_data(name: str, comp, blob: bytes) -> None:
    """Every external-data location in an ONNX graph must be one of the component's verified data_files
    (onnxruntime would otherwise open whatever path the graph names, relative to the working directory for
    a graph loaded from bytes)."""
    listed = {r.file for r in comp.data_files}
    base = posixpath.dirname(comp.file)
    for loc in external_locations(blob, comp.file):
        if not loc or loc.startswith(("/", "\\")) or "\\" in loc or "\x00" in loc or ":" in loc or ".." in loc.split("/"):
            raise BundleError(f"components.{name}: graph {comp.file!r} names external data at {loc!r}, "
                              "outside the bundle")
        if posixpath.normpath(posixpath.join(base, loc)) not in listed:
            raise BundleError(f"components.{name}: graph {comp.file!r} reads external data from {loc!r}, which is "
                              "not among the component's data_files in manifest.json")
