"""The prompt side of an onnxruntime-genai model directory (export/ort_genai.py writes it): tokenizer_config.json
(a tokenizer class ort-extensions knows, the chat template in what its template engine runs) and
preprocessing.json, the contract of what a native app does between a picture + a question and the generator:
the preprocessing (from the manifest), the placeholder text per image (per tile grid), the token the app
prepends, and the chat turns as plain strings for apps without a template engine.
"""

from __future__ import annotations

import dataclasses
import json
import re

from edgevlm import template, tiling
from edgevlm.errors import TemplateError
from edgevlm.manifest import Manifest

CONTRACT_FORMAT = "edgevlm-ort-genai-preprocessing"


def tokenizer_class(spec: dict) -> tuple[str, bool]:
    """tokenizer.json -> (the class that tells ort-extensions its format, whether ort-extensions encodes it as
    `tokenizers` does). Exact: byte-level BPE (GPT-2, Qwen2, SmolLM) and SentencePiece-converted BPE with byte
    fallback (Llama-2: a normalizer writes the spaces as U+2581). Not exact: a Metaspace pre-tokenizer (it
    prepends U+2581 to the first word only), and without byte fallback ort-extensions drops characters outside
    the vocabulary where `tokenizers` writes <unk>."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if "ByteLevel" in json.dumps(pre):
        return "GPT2Tokenizer", True
    spaces = json.dumps(spec.get("normalizer"), ensure_ascii=False)  # SentencePiece: " " written as U+2581
    if "Metaspace" in json.dumps([pre, spec.get("decoder")]) or "\u2581" in spaces:
        return "LlamaTokenizer", not pre and bool(model.get("byte_fallback"))
    return "GPT2Tokenizer", False


def tokenizer_files(raw: str, m: Manifest) -> tuple[dict, dict[str, int], dict]:
    """-> (tokenizer_config.json, special token -> id, the contract's tokenizer section)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(raw)
    ids = {t: tok.token_to_id(t) for t in m.special_tokens.values() if tok.token_to_id(t) is not None}
    cls, exact = tokenizer_class(json.loads(raw))
    config = {"tokenizer_class": cls, "chat_template": minja_template(m.chat_template, m.special_tokens),
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": m.generation.context_length,
              **{k: v for k, v in m.special_tokens.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}}
    # edgevlm (as transformers' apply_chat_template) lets the tokenizer add its special tokens unless the rendered
    # prompt starts with the BOS text; onnxruntime-genai's encode adds none, so the app prepends what would be added
    bos = m.special_tokens.get("bos_token")
    probe = template.render(m.chat_template, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            add_generation_prompt=True, **m.special_tokens)
    added, plain = (tok.encode("hi", add_special_tokens=flag).ids for flag in (True, False))
    prepend = None
    if not (bos and probe.startswith(bos)) and len(added) > len(plain) and added[1:] == plain:
        prepend = added[0]
    return config, ids, {"class": cls, "ort_extensions_exact": exact, "prepend_token_id": prepend}


# onnxruntime-genai's template engine (minja) has the str methods capitalize() and title() but not those filters,
# and no upper at all: `x | capitalize` becomes `x.capitalize()`, an upper-cased role name a lookup
_OPERAND = r"((?:[A-Za-z_]\w*|'[^'\\]*'|\"[^\"\\]*\")(?:\[[^\[\]]*\]|\.[A-Za-z_]\w*)*)"
_ROLES = "{'system': 'SYSTEM', 'user': 'USER', 'assistant': 'ASSISTANT'}"
_ROLE = r"([A-Za-z_]\w*(?:\[[^\[\]]*\]|\.[A-Za-z_]\w*)*?(?:\['role'\]|\[\"role\"\]|\.role))"
_REWRITES = [
    (re.compile(_OPERAND + r"\s*\|\s*(capitalize|title)\b(?!\s*\()"), lambda g: f"{g.group(1)}.{g.group(2)}()"),
    (re.compile(_ROLE + r"(?:\s*\|\s*upper\b(?!\s*\()|\.upper\(\))"), lambda g: f"{_ROLES}[{g.group(1)}]"),
]
_PROBES = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
           [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And?"}]}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]]


def minja_template(src: str, variables: dict[str, str]) -> str:
    """The chat template `src` in what onnxruntime-genai's template engine runs (see _REWRITES); kept as it is
    unless both render the same on probe chats (`variables`: the special tokens the template sees)."""
    new = src
    for pattern, write in _REWRITES:
        new = pattern.sub(write, new)
    if new == src:
        return src
    for messages in _PROBES:
        for gen in (True, False):
            try:
                a = template.render(src, messages, add_generation_prompt=gen, **variables)
            except Exception:  # the template refuses this conversation (e.g. no system role): nothing to compare
                continue
            if template.render(new, messages, add_generation_prompt=gen, **variables) != a:
                return src
    return new


def placeholders(m: Manifest) -> dict[str, list]:
    """The text that replaces one image marker, per tile grid ("RxC"; "0x0": the image is one tile), as segments:
    {"text": s} as it is, {"image_tokens": n} for n copies of the image token."""
    lay = m.image_layout
    if lay is None or lay.tiling == "none":
        return {"0x0": [{"image_tokens": m.image_tokens}]}
    most = -(-lay.longest_edge // lay.tile_size)  # tiles per side of the largest split
    grids = [(0, 0)] + [(r, c) for r in range(1, most + 1) for c in range(1, most + 1)]
    out = {}
    for r, c in grids:
        n = m.image_tokens * (r * c + 1 if r else 1)
        text = tiling.placeholder(lay, "\x00", r, c, m.image_tokens, n)
        out[f"{r}x{c}"] = _segments(text)
    return out


def _segments(text: str) -> list[dict]:
    parts, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and (text[j] == "\x00") == (text[i] == "\x00"):
            j += 1
        parts.append({"image_tokens": j - i} if text[i] == "\x00" else {"text": text[i:j]})
        i = j
    return parts


def contract_for(m: Manifest, tokenizer: dict, tile_patch: int | None) -> dict:
    """preprocessing.json: everything an app does between a picture + a question and the generator (the guide,
    docs/native-apps.md, says how)."""
    lay = m.image_layout
    tiles = None
    if lay is not None and lay.tiling == "split":
        tiles = {"kind": "split", "tile_size": lay.tile_size, "longest_edge": lay.longest_edge,
                 "global_tile": lay.global_tile, "max_side": tiling.MAX_SIDE}
    shape = list(m.components["vision"].inputs.get("pixel_values") or [])
    return {
        "format": CONTRACT_FORMAT, "version": 1, "family": m.family, "quant": m.quant.scheme,
        "preprocess": dataclasses.asdict(m.preprocess),
        "tiling": tiles,
        "tile": {"shape": shape[1:], "rows": m.image_tokens},
        "images": {"per_conversation": None if tile_patch else 1, "turn": "first"},
        "prompt": {"image_marker": m.image_token, "image_token": m.image_token, "image_token_id": m.image_token_id,
                   "placeholders": placeholders(m), "prepend_token_id": tokenizer["prepend_token_id"]},
        "chat_format": chat_format(m),
        "tokenizer": {"class": tokenizer["class"], "ort_extensions_exact": tokenizer["ort_extensions_exact"]},
        "model_inputs": {"pixel_values": "float32 [T, 3, S, S]: every tile of every image, in prompt order",
                         "image_sizes": "int64 [T, 2]: (S, S) for every tile",
                         "num_image_tokens": "int64 [1]: how many image tokens the prompt holds"},
        "generation": {"eos_token_ids": list(m.generation.eos_token_ids),
                       "context_length": m.generation.context_length,
                       "max_new_tokens": m.generation.max_new_tokens},
    }


_Q, _A = "\ue010{}\ue011", "\ue012{}\ue013"  # marked user texts and answers (private-use characters)


def chat_format(m: Manifest) -> dict | None:
    """The chat template as strings around the user's texts and the answers, for apps without a template engine:
    a conversation renders as first.before + q1 + first.after + answer + next.before + q2 + next.after + ...
    (first_text_only when the first turn has no image; images in the first turn only). None when the template
    does not render that way (checked on a three-turn chat): such an app renders the template itself."""
    def user(text, image=False):
        return {"role": "user", "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def render(messages):
        return template.render(m.chat_template, messages, add_generation_prompt=True, **m.special_tokens)

    try:
        first, text_only = (render([user(_Q.format(0), image)]).split(_Q.format(0)) for image in (True, False))
        two = render([user(_Q.format(0), True), assistant(_A.format(0)), user(_Q.format(1))])
        three = render([user(_Q.format(0), True), assistant(_A.format(0)), user(_Q.format(1)),
                        assistant(_A.format(1)), user(_Q.format(2))])
    except (TemplateError, ValueError):
        return None
    head = first[0] + _Q.format(0) + first[1]
    if len(first) != 2 or len(text_only) != 2 or not two.startswith(head) or _A.format(0) not in two:
        return None
    lead, rest = two[len(head):].split(_A.format(0), 1)
    if _Q.format(1) not in rest:
        return None
    nxt = rest.split(_Q.format(1), 1)
    fmt = {"first": first, "first_text_only": text_only, "answer_before": lead, "next": nxt}
    composed = head + "".join(lead + _A.format(i) + nxt[0] + _Q.format(i + 1) + nxt[1] for i in range(2))
    return fmt if composed == three else None
