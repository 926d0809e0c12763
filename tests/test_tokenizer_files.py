"""A checkpoint whose tokenizer is published only as a SentencePiece `tokenizer.model` (MobileVLM's hub repositories,
many LLaMA-era ones): transformers converts it when sentencepiece is installed, and without it the export says so
in one line."""

from __future__ import annotations

import json
import shutil
import sys

from edgevlm.apps.export_cmd import main


def _sentencepiece_only(checkpoint, tmp_path):
    """The tiny MobileVLM checkpoint with its tokenizer.json replaced by the same vocabulary as a SentencePiece
    BPE model (pieces scored by rank, as SentencePiece orders merges)."""
    from sentencepiece import sentencepiece_model_pb2 as spm  # the module transformers reads it with (one
    # protobuf descriptor pool: a second module defining the same .proto would make that read fail)

    hf = shutil.copytree(checkpoint("mobilevlm-v2"), tmp_path / "hf")
    vocab = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    # SentencePiece piece types: UNKNOWN, CONTROL, USER_DEFINED (<image> keeps the id config.json names)
    specials = {"<unk>": 2, "<s>": 3, "</s>": 3, "<image>": 4, "<pad>": 4}
    model = spm.ModelProto()
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        assert i == len(model.pieces)  # a piece's id is its position
        p = model.pieces.add()
        p.piece, p.type, p.score = piece, specials.get(piece, 1), 0.0 if piece in specials else -float(i)
    model.trainer_spec.model_type, model.trainer_spec.vocab_size = 2, len(model.pieces)  # 2: BPE
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", True
    model.normalizer_spec.escape_whitespaces, model.normalizer_spec.remove_extra_whitespaces = True, False
    (hf / "tokenizer.model").write_bytes(model.SerializeToString())
    (hf / "tokenizer.json").unlink()
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "legacy": False}
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert [p.piece for p in model.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    return hf


def test_sentencepiece_tokenizer_model_exports(checkpoint, tmp_path, capsys):
    hf = _sentencepiece_only(checkpoint, tmp_path)
    assert main(["--from", str(hf), "--to", str(tmp_path / "out"), "--parity-tokens", "8"]) == 0
    parity = json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["parity"]
    print(parity)
    assert parity["prompt_ids_match"] and parity["greedy_match"] and parity["max_abs_logit_diff"] <= 1e-4


def test_sentencepiece_missing_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    hf = _sentencepiece_only(checkpoint, tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    assert main(["--from", str(hf), "--to", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    print(lines)
    assert len(lines) == 1 and "Traceback" not in err
    assert "tokenizer.model" in lines[0] and "pip install sentencepiece" in lines[0] and "mobilevlm" in lines[0]
