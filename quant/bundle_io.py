"""Reading a source bundle's graphs (verified bytes) and writing graph files (edgevlm.atomic makes the bundle atomic)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import onnx

from edgevlm.bundle import MANIFEST, Bundle, sha256_file
from edgevlm.manifest import Component

from .graphs import QuantError


def load_graph(bundle: Bundle, comp: Component) -> onnx.ModelProto:
    """The component's graph, external data included, built from the bytes whose sha256 was checked: the
    external tensors are filled from the verified data files in memory, not re-read by path (onnx's own
    loader would open the files again after the check, and refuses a data file with several hard links).
    Bundle.read hands each file's bytes out once, as open_bundle checked them."""
    try:
        model = onnx.load_model_from_string(bundle.read(comp.file))
    except Exception as e:  # protobuf's DecodeError and the like
        raise QuantError(f"graph {comp.file!r} does not parse: {str(e).splitlines()[0][:200]}") from None
    if not comp.data_files:
        return model
    base = posixpath.dirname(comp.file)
    blobs = {ref.file: bundle.read(ref.file) for ref in comp.data_files}
    for t in _tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        rel = posixpath.normpath(posixpath.join(base, info.get("location", "")))
        if rel not in blobs:  # open_bundle checked this already; a graph read here must not name other files
            raise QuantError(f"tensor {t.name!r} of {comp.file!r} names external data {info.get('location')!r}, "
                             "not one of the component's data_files")
        blob = blobs[rel]
        try:
            start = int(info.get("offset", 0))
            end = start + int(info["length"]) if "length" in info else len(blob)
        except ValueError:
            raise QuantError(f"tensor {t.name!r} of {comp.file!r} has a malformed external-data offset/length") from None
        if not 0 <= start <= end <= len(blob):
            raise QuantError(f"tensor {t.name!r} of {comp.file!r} reads bytes {start}..{end} of {rel!r}, "
                             f"which holds {len(blob)}")
        t.raw_data = blob[start:end]
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    return model


def _tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, in subgraphs and functions too."""
    graphs, node_lists = [model.graph], [f.node for f in model.functions]
    while graphs or node_lists:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            yield from (s.values for s in g.sparse_initializer)
            node_lists.append(g.node)
            continue
        for n in node_lists.pop():
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)


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
