"""The language model of a checkpoint as GGUF (written with the `gguf` package's GGUFWriter), quantized by
llama.cpp's own quantizer, and a bundle whose decoder runs in llama.cpp next to the ONNX vision graph.

    export_gguf(hf_dir, out)                      # ONNX export (parity vs PyTorch), then decoder -> GGUF f32
    export_gguf(hf_dir, out, quant="Q4_K_M")      # ... quantized by llama_model_quantize
    export_gguf(hf_dir, out, base_bundle=B)       # reuse the vision graph of ONNX bundle B (same checkpoint)

Tensor names, hyperparameter keys and tokenizer metadata follow llama.cpp's convert_hf_to_gguf.py for the
qwen2 and llama architectures. The GGUF f32 decoder is checked against the ONNX bundle (greedy tokens and
first-step logits) before the bundle appears; quantized decoders have their agreement recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from edgevlm.atomic import atomic_dir, check_target, scratch_dir, write_atomic
from edgevlm.bundle import MANIFEST, open_bundle, sha256_file
from edgevlm.errors import ExportError
from edgevlm.manifest import Component, Manifest, Quant

log = logging.getLogger("edgevlm.export")

QUANTS = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama.cpp LLAMA_FTYPE_* values
ARCHS = {"qwen2": "qwen2", "llama": "llama"}  # transformers text model_type -> llama.cpp architecture
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 30: "BF16"}

# HF module name -> GGUF tensor name, per layer (llama.cpp's tensor_mapping for LLaMA-style blocks)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


# ---- the GGUF file ------------------------------------------------------------------------------------


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", "default"))
    if kind not in ("default", None):
        raise ExportError(f"rope scaling {kind!r} is not supported by the GGUF exporter yet")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates halves (NeoX order); llama.cpp's llama arch rotates pairs: reorder q/k rows as convert does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer regex (its vocab loader refuses unknown names)."""
    pre = tok_json.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+" in text:
        return "qwen2"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def _vocab(tok_json: dict, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's BPE ("gpt2") vocab wants them, padded to n_vocab."""
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: the GGUF exporter writes BPE vocabularies only")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: 1 for i in by_id}  # 1 normal
    for a in tok_json.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4  # 3 control, 4 user-defined
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {n_vocab}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    ttypes = [types.get(i, 5) for i in range(n_vocab)]  # 5 unused (padding rows of the embedding)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, ttypes, merges


def write_gguf(text_config, state: dict[str, np.ndarray], tokenizer_json: str, path: Path, *,
               special_ids: dict[str, int | None], chat_template: str | None = None, name: str = "edgevlm") -> None:
    """Write an f32 GGUF of a qwen2/llama language model.

    state: the language model's tensors under HF names without prefix ("embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight", "norm.weight", and "lm_head.weight" unless tied).
    """
    import gguf

    arch = ARCHS.get(text_config.model_type)
    if arch is None:
        raise ExportError(f"no GGUF mapping for language model type {text_config.model_type!r} "
                          f"(supported: {', '.join(ARCHS)})")
    n_head = text_config.num_attention_heads
    n_kv = text_config.num_key_value_heads or n_head
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_head
    n_vocab = state["embed_tokens.weight"].shape[0]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(QUANTS["F32"])
    w.add_context_length(int(text_config.max_position_embeddings))
    w.add_embedding_length(int(text_config.hidden_size))
    w.add_block_count(int(text_config.num_hidden_layers))
    w.add_feed_forward_length(int(text_config.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_freq_base(_rope_theta(text_config))
    w.add_layer_norm_rms_eps(float(text_config.rms_norm_eps))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim != text_config.hidden_size // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_vocab_size(int(n_vocab))

    tok = json.loads(tokenizer_json)
    tokens, ttypes, merges = _vocab(tok, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if special_ids.get(key) is not None:
            add(int(special_ids[key]))
    w.add_add_bos_token(special_ids.get("bos") is not None and arch == "llama")
    if chat_template:
        w.add_chat_template(chat_template)

    def put(gguf_name: str, a: np.ndarray) -> None:
        w.add_tensor(gguf_name, np.ascontiguousarray(a, dtype=np.float32))

    put("token_embd.weight", state["embed_tokens.weight"])
    for i in range(text_config.num_hidden_layers):
        for hf, gg in LAYER_TENSORS.items():
            a = state.get(f"layers.{i}.{hf}")
            if a is None:
                if hf.endswith(".bias"):
                    continue
                raise ExportError(f"the checkpoint has no tensor layers.{i}.{hf}")
            if arch == "llama" and hf.startswith("self_attn.q_proj"):
                a = _permute(a, n_head)
            elif arch == "llama" and hf.startswith("self_attn.k_proj"):
                a = _permute(a, n_kv)
            put(f"blk.{i}.{gg}", a)
    put("output_norm.weight", state["norm.weight"])
    if "lm_head.weight" in state:  # absent when tied: llama.cpp then reads token_embd
        put("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def language_state(model, adapter) -> tuple[object, dict[str, np.ndarray]]:
    """(text config, HF-named float32 tensors of the language model) from a loaded transformers VLM."""
    body, embed_tokens, lm_head = adapter.language_parts(model)
    state = {k: v.detach().float().numpy() for k, v in body.state_dict().items()}
    state["embed_tokens.weight"] = embed_tokens.weight.detach().float().numpy()
    if lm_head.weight.data_ptr() != embed_tokens.weight.data_ptr():
        state["lm_head.weight"] = lm_head.weight.detach().float().numpy()
    return adapter.text_config(model), state


# ---- llama.cpp's quantizer ----------------------------------------------------------------------------


def quantize(src: Path, dst: Path, kind: str, threads: int = 0) -> dict:
    """Quantize a GGUF with llama_model_quantize; returns what each tensor became (incl. the fallbacks
    llama.cpp takes when a row is not a multiple of the block size, e.g. Q4_K -> Q5_0 below 256)."""
    import llama_cpp

    if kind not in QUANTS or kind == "F32":
        raise ExportError(f"unknown GGUF quantization {kind!r} (choose from {', '.join(q for q in QUANTS if q != 'F32')})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[kind]
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize the decoder to {kind} (code {rc})")
    return {"ftype": kind, **tensor_types(dst)}


def tensor_types(path: Path) -> dict:
    """Tensor type counts of a GGUF file, and the matrices stored in another type than the majority."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, list[str]] = {}
    for t in reader.tensors:
        types.setdefault(GGML_TYPES.get(int(t.tensor_type), str(int(t.tensor_type))), []).append(t.name)
    counts = {k: len(v) for k, v in sorted(types.items())}
    matrices = {k: [n for n in v if not n.endswith(("norm.weight", ".bias"))] for k, v in types.items()}
    main = max(matrices, key=lambda k: len(matrices[k]))
    other = {k: sorted(v) for k, v in matrices.items() if k != main and v}
    return {"tensor_types": counts, "main_type": main, "other_matrix_types": other}


# ---- the bundle ----------------------------------------------------------------------------------------


def _gguf_manifest(base: Manifest, gguf_file: str, sha: str, precision: str, quant: dict | None) -> Manifest:
    dec = base.components["decoder"]
    comps = {k: v for k, v in base.components.items() if k not in ("decoder", "embed")}
    if base.fusion == "prefusion":  # pre-fusion text embeds still come from the embed graph
        comps["embed"] = base.components["embed"]
    comps["decoder"] = Component(
        backend="gguf", file=gguf_file, sha256=sha, precision=precision, num_layers=dec.num_layers, kv=dec.kv,
        inputs={"input_ids": [1, "seq"], "inputs_embeds": dec.inputs.get("inputs_embeds", [1, "seq", "dim"])},
        outputs={"logits": dec.outputs.get("logits", [1, 1, "vocab"])},
        quant=quant)
    scheme = "gguf-" + (quant["ftype"].lower() if quant else "f32")
    return dataclasses.replace(base, components=comps, quant=Quant(scheme=scheme, details=quant))


def export_gguf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quant: str | None = None,
                base_bundle: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                parity_tokens: int = 16, max_logit_diff: float = 1e-3) -> Manifest:
    """Export a checkpoint to a bundle whose decoder is GGUF (run by llama.cpp) and whose vision is ONNX."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .adapters import adapter_for
    from .exporter import export

    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_target(out, overwrite)
    if quant is not None and quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantization {quant!r} (choose from {', '.join(QUANTS)})")
    with scratch_dir(out) as work, atomic_dir(out, overwrite) as tmp:
        if base_bundle is None:  # the ONNX bundle: vision graph + the reference the GGUF decoder must match
            base_bundle = work / "onnx"
            export(hf_dir, base_bundle, progress=progress, parity_tokens=parity_tokens, max_logit_diff=max_logit_diff)
        base = open_bundle(base_bundle).manifest
        if base.components["decoder"].backend != "onnx":
            raise ExportError("the base bundle must have an ONNX decoder (it is the parity reference)")

        config = AutoConfig.from_pretrained(hf_dir)
        adapter = adapter_for(config.model_type)
        model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
        text_config, state = language_state(model, adapter)
        del model
        tok_json = (Path(base_bundle) / base.tokenizer.file).read_text(encoding="utf-8")
        vocab = json.loads(tok_json)
        ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])} | vocab["model"]["vocab"]
        special = {k: ids.get(base.special_tokens.get(f"{k}_token", "\x00")) for k in ("bos", "eos", "pad")}
        if base.generation.eos_token_ids:
            special["eos"] = base.generation.eos_token_ids[0]

        f32 = work / "decoder-f32.gguf"
        write_gguf(text_config, state, tok_json, f32, special_ids=special, chat_template=base.chat_template,
                   name=hf_dir.name)
        del state
        details = None
        if quant in (None, "F32"):
            shutil.move(f32, tmp / "decoder.gguf")
            precision = "fp32"
        else:
            details = quantize(f32, tmp / "decoder.gguf", quant)
            precision = quant.lower()
        keep = [base.tokenizer.file] + [r.file for name, c in base.components.items()
                                        if name != "decoder" and (name != "embed" or base.fusion == "prefusion")
                                        for r in [c] + list(c.data_files)]
        for f in keep:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(base_bundle) / f, tmp / f)
        manifest = _gguf_manifest(base, "decoder.gguf", sha256_file(tmp / "decoder.gguf"), precision, details)
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")

        figures = gguf_parity(tmp, base_bundle, max_new_tokens=parity_tokens)
        log.info("gguf parity: %s", figures)
        if precision == "fp32":
            if not figures["greedy_match"]:
                raise ExportError(f"GGUF f32 greedy tokens differ from the ONNX bundle's: {figures}")
            if figures["max_abs_logit_diff"] > max_logit_diff:
                raise ExportError(f"GGUF parity failed: max |logit diff| {figures['max_abs_logit_diff']:.3g} "
                                  f"> {max_logit_diff}")
        parity = {**base.source.parity, "gguf_vs_onnx": figures}
        manifest = dataclasses.replace(manifest, source=dataclasses.replace(manifest.source, parity=parity))
        write_atomic(tmp / MANIFEST, manifest.to_json())
    return manifest


def gguf_parity(gguf_bundle, onnx_bundle, max_new_tokens: int = 16, image=None, prompt: str | None = None) -> dict:
    """First-step logits and greedy tokens of the GGUF-decoder bundle against the ONNX bundle."""
    import edgevlm

    from . import parity

    image = image if image is not None else parity.probe_image()
    prompt = prompt or parity.PROMPT
    a, b = edgevlm.load(onnx_bundle), edgevlm.load(gguf_bundle)
    la, lb = a.prompt_logits(image, prompt), b.prompt_logits(image, prompt)
    ta = [r.token for r in a.stream(image, prompt, max_tokens=max_new_tokens)]
    tb = [r.token for r in b.stream(image, prompt, max_tokens=max_new_tokens)]
    agree = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return {"max_abs_logit_diff": float(np.abs(la - lb).max()), "greedy_tokens": len(ta),
            "greedy_match": ta == tb, "greedy_prefix_agreement": agree}
