"""The published checkpoints verified here: their real text files (tests/data/real/<name>/, SOURCE.md says where
each came from), what is cut, and which tokenizer files they share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.export.dev.published import Cut, build_from_published

REAL = Path(__file__).parent / "data" / "real"
SMOL_TOK = REAL / "smolvlm-256m-instruct"  # SmolLM2 tokenizer: SmolVLM(2)-256M/500M share it byte for byte
QWEN2_BPE = (REAL / "fastvlm-0.5b-apple" / "vocab.json", REAL / "fastvlm-0.5b-apple" / "merges.txt")


@dataclass(frozen=True)
class Real:
    hub_id: str
    files: str  # folder under tests/data/real
    cut: Cut
    tokenizer_from: tuple = ()
    llama_tokenizer: bool = False  # MobileVLM: LLaMA's 32000-token vocabulary, rebuilt from LLaVA-1.5's
    notes: dict = field(default_factory=dict)


CHECKPOINTS = {
    "smolvlm-256m": Real("HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm-256m-instruct", Cut(1, 1)),
    "smolvlm-500m": Real("HuggingFaceTB/SmolVLM-500M-Instruct", "smolvlm-500m-instruct", Cut(1, 1), (SMOL_TOK,)),
    "smolvlm2-256m": Real("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "smolvlm2-256m-video-instruct", Cut(1, 1),
                          (SMOL_TOK,)),
    "smolvlm2-500m": Real("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "smolvlm2-500m-video-instruct", Cut(1, 1),
                          (SMOL_TOK,)),
    # 2.2B: its own 3 added tokens at 49152-49154 over the SmolLM2 BPE (no <global-img> / row tokens)
    "smolvlm-2.2b": Real("HuggingFaceTB/SmolVLM-Instruct", "smolvlm-instruct", Cut(1, 1),
                         (SMOL_TOK / "vocab.json", SMOL_TOK / "merges.txt")),
    "granite-docling": Real("ibm-granite/granite-docling-258M", "granite-docling-258m", Cut(1, 1)),
    "llava-1.5-7b": Real("llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf", Cut(1, 2)),
    "onevision-0.5b": Real("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-onevision-qwen2-0.5b-ov-hf", Cut(1, 1),
                           QWEN2_BPE),
    "fastvlm-0.5b-hf": Real("KamilaMila/FastVLM-0.5B", "fastvlm-0.5b-hf", Cut(1, stages=(1, 1, 1, 1, 1)), QWEN2_BPE),
    "fastvlm-0.5b-apple": Real("apple/FastVLM-0.5B", "fastvlm-0.5b-apple", Cut(1, stages=(1, 1, 1, 1, 1))),
    "mobilevlm-v2-1.7b": Real("mtgv/MobileVLM_V2-1.7B", "mobilevlm-v2-1.7b", Cut(1, 2), llama_tokenizer=True),
}


def llama_tokenizer(out: Path) -> Path:
    """LLaMA's 32000-token SentencePiece-BPE vocabulary (tokenizer.json) from LLaVA-1.5's, without the two tokens
    llava-hf added (<image> 32000, <pad> 32001), plus the LlamaTokenizer settings a LLaMA checkpoint publishes."""
    tok = json.loads((REAL / "llava-1.5-7b-hf" / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 32000]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
           "model_max_length": 2048, "padding_side": "right"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


def build(name: str, out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of `name` at its real widths, built from its published files."""
    r = CHECKPOINTS[name]
    extra = (llama_tokenizer(out.parent / f"{name}-tokenizer"),) if r.llama_tokenizer else ()
    return build_from_published(REAL / r.files, out, r.cut, tokenizer_from=r.tokenizer_from + extra, seed=seed)


def hub_cache(ckpt: Path, cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay `ckpt` out as huggingface_hub's cache holds a downloaded snapshot: blobs named by content,
    snapshots/<revision>/<file> symlinks to them, refs/main naming the revision. Returns the snapshot."""
    import hashlib
    import os
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in ckpt.iterdir() if p.is_file()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        blob = repo / "blobs" / h.hexdigest()
        if not blob.exists():
            try:
                os.link(f, blob)  # the weights are large: a second name, not a copy
            except OSError:
                shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap
