"""Malformed and tampered bundles are refused with the right error, before any parser sees a file."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import edgevlm
from edgevlm.bundle import open_bundle
from edgevlm.errors import BundleError, IntegrityError

NAME = "llava-clip-llama"


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle(NAME), dst)
    return dst


def _edit(b, fn):
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_valid_bundle_opens(copy):
    assert open_bundle(copy).manifest.family == "llava"


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(surprise=1), "unknown key"),
    (lambda m: m["components"]["vision"].update(extra="x"), r"components.vision: unknown key"),
    (lambda m: m.update(image_tokens="16"), "image_tokens: expected int"),
    (lambda m: m["generation"].update(eos_token_ids=[True]), "eos_token_ids"),
    (lambda m: m.pop("tokenizer"), "missing key tokenizer"),
    (lambda m: m.update(format_version=2), "format_version"),
    (lambda m: m["components"].pop("decoder"), "components.decoder is required"),
    (lambda m: m["components"]["vision"].update(backend="tensorflow"), "backend must be"),
    (lambda m: m["components"]["vision"].update(sha256="abc"), "64 lowercase hex"),
    (lambda m: m["tokenizer"].update(file="missing.json"), "missing"),
    (lambda m: m["tokenizer"].update(file="../outside.json"), "leaves the bundle"),
    (lambda m: m["tokenizer"].update(file="/etc/passwd"), "leaves the bundle"),
    (lambda m: m["preprocess"].update(std=[1, 0, 1]), "std"),
])
def test_malformed_manifest_is_a_bundle_error(copy, edit, match):
    _edit(copy, edit)
    with pytest.raises(BundleError, match=match):
        edgevlm.load(copy)


def test_not_json_and_not_a_directory(copy, tmp_path):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(copy)
    with pytest.raises(BundleError, match="not a directory"):
        open_bundle(tmp_path / "nope")


def test_extra_file_is_refused(copy):
    (copy / "smuggled.onnx.data").write_bytes(b"\0" * 16)
    with pytest.raises(BundleError, match="not named in manifest.json"):
        open_bundle(copy)


def test_symlink_out_of_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "tokenizer.json", outside)
    os.remove(copy / "tokenizer.json")
    os.symlink(outside, copy / "tokenizer.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(copy)


@pytest.mark.parametrize("victim", ["vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json"])
def test_one_flipped_byte_is_caught_by_the_checksum(copy, victim):
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=victim):
        edgevlm.load(copy)


def test_no_default_bundle_gives_a_clear_error(monkeypatch, tmp_path):
    from edgevlm import model

    monkeypatch.setattr(model, "DEFAULT_BUNDLE", tmp_path / "none")
    with pytest.raises(BundleError, match="no embedded default bundle"):
        edgevlm.load()
