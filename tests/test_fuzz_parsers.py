"""Seeded hypothesis fuzzing of the parsers of untrusted input (CI's sample; benchmarks/fuzz_parsers.py runs
>= 100,000 cases): each case ends parsed or in an edgevlm error, never another exception."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import edgevlm
from edgevlm.errors import EdgeVLMError, TemplateError
from edgevlm.template import render

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
import fuzz_targets as ft  # noqa: E402

sys.path.pop(0)

CI = settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))


@CI
@given(ft.json_values)
def test_manifest_from_any_json_value(data):
    ft.target_manifest_value(data)


@CI
@given(ft.manifest_edits())
def test_manifest_with_edits(data):
    ft.target_manifest_value(data)


@CI
@given(ft.manifest_bytes())
def test_manifest_bytes(raw):
    ft.target_manifest_bytes(raw)


@CI
@given(ft.templates(), ft.message_lists)
def test_template_rendering(source, messages):
    ft.target_template(source, messages)


@CI
@given(ft.message_lists)
def test_demo_template_over_hostile_messages(messages):
    ft.target_demo_template(messages)


@pytest.mark.parametrize("payload", ft.INJECTIONS)
def test_template_injection_payloads_are_refused(payload):
    with pytest.raises(TemplateError):
        render(payload, [{"role": "user", "content": "hi"}])


def test_real_templates_still_render():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{{ 7*7 }} hi"}]}]
    out = render(ft.DEMO_MANIFEST["chat_template"], msgs, **ft.DEMO_MANIFEST["special_tokens"])
    assert out == "<|im_start|>user\n<image>\n{{ 7*7 }} hi<|im_end|>\n<|im_start|>assistant\n"


@settings(max_examples=12, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(ft.manifest_edits())
def test_edited_manifests_through_load_and_generate(tmp_path_factory, data):
    """Edited manifests on the real demo files (the hashes still match): load + generate end in an answer
    or an edgevlm error."""
    b = tmp_path_factory.mktemp("edited") / "b"
    shutil.copytree(ft.DEFAULT_BUNDLE, b)
    (b / "manifest.json").write_text(json.dumps(data))
    example = ft.DEFAULT_BUNDLE.parent / "examples" / "shapes-1.png"
    try:
        edgevlm.load(b, threads=1).generate(example, "What color is the star?", max_tokens=2)
    except EdgeVLMError:
        pass


@CI
@given(ft.entry_files())
def test_cache_entry_files(tmp_path_factory, entry):
    ft.target_cache_entry(*entry, tmp_path_factory.mktemp("cache"))
