"""Every export failure is one line on stderr naming what is not supported and what to do, never a traceback:
checkpoints that differ from the supported ones in one file each (tiny random-weight ones, real parts)."""

from __future__ import annotations

import json
import shutil

import pytest

from edgevlm.apps.export_cmd import main


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _copy(checkpoint, name, tmp_path):
    return shutil.copytree(checkpoint(name), tmp_path / "hf")


def _fails_in_one_line(capsys, tmp_path, src, *expected):
    rc = main(["--from", str(src), "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    print(lines)
    assert rc == 1
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_unsupported_model_type(capsys, tmp_path):
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(tmp_path / "hf")
    _fails_in_one_line(capsys, tmp_path, tmp_path / "hf", "qwen2_vl", "not supported", "supported:")


def test_unexpected_processor_class(capsys, tmp_path, checkpoint):
    # a LLaVA checkpoint whose processor_config.json names another family's processor
    hf = _copy(checkpoint, "llava-clip-llama", tmp_path)
    _edit_json(hf / "processor_config.json", processor_class="Idefics3Processor")
    _fails_in_one_line(capsys, tmp_path, hf, "'llava'")


def test_template_without_image_items(capsys, tmp_path, checkpoint):
    # no processor template; the tokenizer's takes text only (as llava-onevision's tokenizer_config.json template)
    hf = _copy(checkpoint, "llava-siglip-qwen2", tmp_path)
    for f in ("chat_template.json", "chat_template.jinja"):
        (hf / f).unlink(missing_ok=True)
    text_only = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    _edit_json(hf / "tokenizer_config.json", chat_template=text_only)
    _fails_in_one_line(capsys, tmp_path, hf, "chat template", "image")


def test_apple_layout_with_another_tower(capsys, tmp_path):
    from real_checkpoints import REAL

    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads((REAL / "fastvlm-0.5b-apple" / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    _fails_in_one_line(capsys, tmp_path, hf, "llava_qwen2", "mm_vision_tower", "clip-vit-large-patch14-336")


def test_hub_id_not_in_the_cache_offline(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _fails_in_one_line(capsys, tmp_path, "edgevlm-tests/no-such-model", "edgevlm-tests/no-such-model", "cache")


def test_neither_a_directory_nor_a_hub_id(capsys, tmp_path):
    _fails_in_one_line(capsys, tmp_path, tmp_path / "missing" / "dir", "no such directory")


@pytest.mark.parametrize("field,value,word", [("do_image_splitting", False, "do_image_splitting"),
                                              ("max_image_size", {"shortest_edge": 32}, "max_image_size")])
def test_smolvlm_processor_settings_not_supported(capsys, tmp_path, checkpoint, field, value, word):
    hf = _copy(checkpoint, "smolvlm-llama", tmp_path)
    path = hf / "processor_config.json"  # transformers 5 keeps the image processor's settings in there
    _edit_json(path, image_processor={**json.loads(path.read_text())["image_processor"], field: value})
    _fails_in_one_line(capsys, tmp_path, hf, "smolvlm", word)
