"""Tampered demo bundles: a flipped byte in any file is caught by its sha256 before any parser runs; paths,
symlinks and ONNX external-data locations that lead out of the bundle are refused. Every case ends in an
edgevlm error through edgevlm.load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgevlm
from edgevlm.bundle import open_bundle
from edgevlm.errors import BundleError, EdgeVLMError, IntegrityError
from edgevlm.model import DEFAULT_BUNDLE

ASSETS = DEFAULT_BUNDLE.parent
DEMOS = ["shapes-fastvlm", "shapes-fastvlm-mini"]
FILES = [(d, p.name) for d in DEMOS for p in sorted((ASSETS / d).iterdir()) if p.name != "manifest.json"]
EXAMPLE = ASSETS / "examples" / "shapes-1.png"


def _copy(demo: str, tmp_path: Path) -> Path:
    dst = tmp_path / demo
    shutil.copytree(ASSETS / demo, dst)
    return dst


@pytest.fixture
def parsers(monkeypatch):
    """Records every call into a parser of bundle content (onnxruntime, tokenizers), still calling them."""
    import onnxruntime
    from tokenizers import Tokenizer

    from edgevlm import prompt
    from edgevlm.backends import onnx as onnx_backend

    calls = []

    class Session(onnxruntime.InferenceSession):
        def __init__(self, *a, **k):
            calls.append("onnxruntime")
            super().__init__(*a, **k)

    class Tok:
        @staticmethod
        def from_str(s):
            calls.append("tokenizers")
            return Tokenizer.from_str(s)

    monkeypatch.setattr(onnx_backend.ort, "InferenceSession", Session)
    monkeypatch.setattr(prompt, "Tokenizer", Tok)
    return calls


@pytest.mark.parametrize("demo,name", FILES, ids=[f"{d}/{n}" for d, n in FILES])
@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_one_flipped_byte_in_any_file_is_caught_before_parsing(demo, name, where, tmp_path, parsers):
    b = _copy(demo, tmp_path)
    data = bytearray((b / name).read_bytes())
    i = int(len(data) * where) if where != -1 else len(data) - 1
    data[i] ^= 0x01 if where != -1 else 0x20  # the manifest's last byte is a newline: flip it to "*"
    (b / name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=name):
        edgevlm.load(b)
    assert parsers == []  # no onnxruntime session, no tokenizer was ever built


@pytest.mark.parametrize("demo", DEMOS)
def test_flipped_bytes_in_the_manifest_end_in_bundle_errors(demo, tmp_path):
    """The manifest is the root the hashes hang on: a changed byte must still end in a BundleError (a hash
    that no longer matches, JSON or schema errors, or graphs that lack what the manifest names)."""
    b = _copy(demo, tmp_path)
    raw = (b / "manifest.json").read_bytes()
    outcomes = {}
    for i in range(0, len(raw), max(1, len(raw) // 41)):
        data = bytearray(raw)
        data[i] ^= 0x01
        (b / "manifest.json").write_bytes(bytes(data))
        try:
            edgevlm.load(b, warmup=True)
            outcomes["loads"] = outcomes.get("loads", 0) + 1  # e.g. a flipped letter in the checkpoint name
        except BundleError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    print(demo, outcomes)
    assert outcomes.get("IntegrityError", 0) > 0 and outcomes.get("BundleError", 0) > 0


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _save(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("field,value,match", [
    ("file", "../shapes-fastvlm/embed.onnx", "leaves the bundle"),
    ("file", "/etc/passwd", "leaves the bundle"),
    ("file", "sub/../../embed.onnx", "leaves the bundle"),
    ("file", "C:\\\\embed.onnx", "not a plain relative path"),
    ("file", "embed.onnx\x00.txt", "not a plain relative path"),
    ("data_files", [{"file": "../x.bin", "sha256": "0" * 64}], "leaves the bundle"),
    ("data_files", [{"file": "/dev/zero", "sha256": "0" * 64}], "leaves the bundle"),
])
def test_paths_leaving_the_bundle_are_refused(tmp_path, field, value, match, parsers):
    b = _copy("shapes-fastvlm", tmp_path)
    m = _manifest(b)
    m["components"]["embed"][field] = value
    _save(b, m)
    with pytest.raises(BundleError, match=match):
        edgevlm.load(b)
    assert parsers == []


def test_symlinks_out_of_the_bundle_are_refused(tmp_path):
    b = _copy("shapes-fastvlm", tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(b / "embed.onnx", outside / "embed.onnx")
    os.symlink(outside / "embed.onnx", b / "embed.onnx")  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match="outside the bundle"):
        edgevlm.load(b)
    os.remove(b / "embed.onnx")
    os.symlink(outside, b / "sub")  # a directory symlink
    m = _manifest(b)
    m["components"]["embed"]["file"] = "sub/embed.onnx"
    _save(b, m)
    with pytest.raises(BundleError, match="outside the bundle"):
        edgevlm.load(b)
    c = _copy("shapes-fastvlm", tmp_path / "c")
    shutil.move(c / "manifest.json", outside / "manifest.json")
    os.symlink(outside / "manifest.json", c / "manifest.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        edgevlm.load(c)


def _external(b: Path, location: str, list_as: str | None) -> None:
    """Rewrite embed.onnx to keep its weights in external data at `location` (relative to the bundle), and
    list `list_as` as the component's data file (None: list nothing)."""
    model = onnx.load(str(b / "embed.onnx"))
    onnx.save_model(model, str(b / "embed.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="embed.onnx.data", size_threshold=0)
    model = onnx.load(str(b / "embed.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (b / "embed.onnx").write_bytes(model.SerializeToString())
    m = _manifest(b)
    comp = m["components"]["embed"]
    comp["sha256"] = _sha(b / "embed.onnx")
    comp["data_files"] = [{"file": list_as, "sha256": _sha(b / "embed.onnx.data")}] if list_as else []
    if list_as != "embed.onnx.data":
        if list_as is None:
            os.remove(b / "embed.onnx.data")
        else:
            shutil.move(b / "embed.onnx.data", b / list_as)
    _save(b, m)


def test_external_data_inside_the_bundle_loads(tmp_path):
    b = _copy("shapes-fastvlm", tmp_path)
    _external(b, "embed.onnx.data", "embed.onnx.data")
    want = edgevlm.load().generate(EXAMPLE, "What color is the star?", max_tokens=4)
    assert edgevlm.load(b).generate(EXAMPLE, "What color is the star?", max_tokens=4) == want


@pytest.mark.parametrize("location,list_as,match", [
    ("../outside.bin", "embed.onnx.data", "outside the bundle"),
    ("/etc/passwd", "embed.onnx.data", "outside the bundle"),
    ("sub/../../outside.bin", "embed.onnx.data", "outside the bundle"),
    ("tokenizer.json", "embed.onnx.data", "not among the component's data_files"),  # inside, but not its data
    ("manifest.json", "embed.onnx.data", "not among the component's data_files"),
    ("embed.onnx.data", None, "not among the component's data_files"),  # would be read from the working dir
])
def test_external_data_locations_outside_the_listed_files_are_refused(tmp_path, location, list_as, match, parsers,
                                                                      monkeypatch):
    b = _copy("shapes-fastvlm", tmp_path)
    _external(b, location, list_as)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 1024)
    monkeypatch.chdir(tmp_path)  # where a graph loaded from bytes would look
    with pytest.raises(BundleError, match=match):
        edgevlm.load(b)
    assert parsers == []


def test_malformed_onnx_protobuf_is_a_bundle_error(tmp_path):
    b = _copy("shapes-fastvlm", tmp_path)
    (b / "embed.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 16)  # a length past the end
    m = _manifest(b)
    m["components"]["embed"]["sha256"] = _sha(b / "embed.onnx")
    _save(b, m)
    with pytest.raises(BundleError):
        open_bundle(b)


def _external_tensor(location: str) -> onnx.TensorProto:
    t = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "v")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _plant(b: Path, where: str, location: str) -> None:
    """Put a tensor with external data at `location` in embed.onnx, somewhere the graph walk must look."""
    model = onnx.load(str(b / "embed.onnx"))
    t = _external_tensor(location)
    if where == "function attribute default":  # CVE-2022-25882's shape: a model-local function's default
        f = model.functions.add()
        f.name, f.domain = "F", "custom"
        f.attribute_proto.extend([onnx.helper.make_attribute("value", t)])
    elif where == "training info":
        init = model.training_info.add().initialization
        init.name = "init"
        init.initializer.extend([t])
    elif where == "sparse initializer":
        s = model.graph.sparse_initializer.add()
        s.values.CopyFrom(t)
        s.indices.CopyFrom(onnx.numpy_helper.from_array(np.zeros(1, np.int64), "i"))
        s.dims.extend([4])
    else:  # a field this onnx does not know (what a later onnx might add): the bytes of a tensor there
        body = t.SerializeToString()
        field = _varint((99 << 3) | 2) + _varint(len(body)) + body  # field 99, length-delimited
        (b / "embed.onnx").write_bytes(model.SerializeToString() + field)
        return
    (b / "embed.onnx").write_bytes(model.SerializeToString())


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


@pytest.mark.parametrize("where", ["function attribute default", "training info", "sparse initializer",
                                   "unknown field"])
def test_external_data_anywhere_in_the_model_is_found(tmp_path, where, parsers, monkeypatch):
    b = _copy("shapes-fastvlm", tmp_path)
    _plant(b, where, "canary.bin")
    m = _manifest(b)
    m["components"]["embed"]["sha256"] = _sha(b / "embed.onnx")
    _save(b, m)
    (tmp_path / "canary.bin").write_bytes(b"\x01" * 16)
    monkeypatch.chdir(tmp_path)  # where onnxruntime would resolve a relative location of a graph given as bytes
    with pytest.raises(BundleError, match="canary.bin"):
        edgevlm.load(b)
    assert parsers == []  # refused before onnxruntime saw the graph
