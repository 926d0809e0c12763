"""Messages -> the prompt's token ids: the chat template rendered, image markers expanded, text tokenized.

Text a user (or a client replaying a conversation) wrote stays text: a message that contains the model's
reserved strings (`<image>`, `<|im_end|>`, any added token) is tokenized literally, so it can neither fake an
image nor end a turn. Transformers' templates render such text verbatim and its tokenizer then reads the
control tokens out of it; here the template's own parts keep their special tokens and the user's parts do
not. Text without reserved strings takes the plain path: one render, one encode, token for token as
transformers produces it.
"""

from __future__ import annotations

import json
import re

import numpy as np
from tokenizers import Encoding, Tokenizer

from . import template
from .errors import ArgumentError, BundleError, ContextOverflowError, EdgeVLMError

MARK = "\ue000{}\ue001"  # private-use characters around a text's index while the template renders
_MARKS = re.compile("\ue000(\\d+)\ue001")
_PROBE = "Hello, world! 123 ünïcödé 日本語 \t\n  x"

# tokenizer.json settings whose strings are copied into every encoded text: huge ones blow up a prompt
_SMALL_STRINGS = ("content", "prepend", "prefix", "suffix", "replacement")


def load_tokenizer(raw: bytes, name: str) -> Tokenizer:
    """A bundle's tokenizer.json -> Tokenizer, refused as a BundleError if it does not load, names
    pathological rewrite rules, or fails on a probe text."""
    try:
        spec = json.loads(raw.decode("utf-8"))
        _check_rules(spec, name)
        tok = Tokenizer.from_str(raw.decode("utf-8"))
        enc = tok.encode(_PROBE, add_special_tokens=True)
        tok.decode(enc.ids, skip_special_tokens=True)
    except BundleError:
        raise
    except RecursionError:
        raise BundleError(f"tokenizer {name!r} nests too deeply") from None
    except Exception as e:  # tokenizers raises plain Exception (e.g. a WordLevel model without its unk token)
        raise BundleError(f"tokenizer {name!r} does not load or encode: {str(e)[:300]}") from None
    return tok


def _check_rules(spec, name: str, depth: int = 0) -> None:
    if depth > 32:
        raise BundleError(f"tokenizer {name!r} nests too deeply")
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key in ("model", "added_tokens"):
                continue  # the vocabulary: long strings there are only entries
            if key in _SMALL_STRINGS and isinstance(value, str) and len(value) > 256:
                raise BundleError(f"tokenizer {name!r}: a {key!r} rewrite of {len(value)} characters")
            if key in ("pattern", "Regex", "String") and isinstance(value, str) and len(value) > 4096:
                raise BundleError(f"tokenizer {name!r}: a pattern of {len(value)} characters")
            _check_rules(value, name, depth + 1)
    elif isinstance(spec, list):
        for value in spec:
            _check_rules(value, name, depth + 1)


def texts_of(messages: list[dict]) -> list[str]:
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return out


def _marked(messages: list[dict]) -> list[dict]:
    """A copy of the messages with text i replaced by MARK.format(i), in texts_of's order."""
    out, i = [], 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            content, i = MARK.format(i), i + 1
        elif isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    p, i = {**p, "text": MARK.format(i)}, i + 1
                parts.append(p)
            content = parts
        out.append({**msg, "content": content})
    return out


class Prompter:
    """The prompt side of a bundle: its template, tokenizer, reserved strings and the text limit."""

    def __init__(self, tok: Tokenizer, raw: str, manifest, limits):
        m = manifest
        self.tok, self.raw, self._literal, self.limits = tok, raw, None, limits
        self.source, self.variables, self.image_token = m.chat_template, dict(m.special_tokens), m.image_token
        self.markers = [m.image_token] + ([m.video.marker] if m.video else [])
        self.bos, self.max_chars = m.special_tokens.get("bos_token"), limits.prompt_chars
        added = {a.content: i for i, a in tok.get_added_tokens_decoder().items() if a.content}
        words = set(added) | {w for w in [*self.markers, *m.special_tokens.values()] if w}
        self.reserved = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
        self.reserved_ids = set(added.values()) | {m.image_token_id} | ({m.video.token_id} if m.video else set())

    def literal(self) -> Tokenizer:
        """A copy of the tokenizer that reads special tokens in its input as plain text (made on first use)."""
        if self._literal is None:
            lit = Tokenizer.from_str(self.raw)
            lit.encode_special_tokens = True
            self._literal = lit
        return self._literal

    def ids(self, messages: list[dict], fills: list[tuple[str, str]], order: list | None = None) -> np.ndarray:
        """Token ids of the rendered prompt: fills are (marker, text) in the messages' order; the k-th marker of a
        kind the template wrote takes the k-th fill of that kind. `order`, if given, receives the fills' indices in
        the order the template placed them."""
        order = [] if order is None else order
        texts = texts_of(messages)
        if sum(map(len, texts)) > self.max_chars:
            raise ContextOverflowError(f"the messages hold {sum(map(len, texts))} characters; the limit is "
                                       f"{self.max_chars}")
        if not any(self.reserved.search(t) for t in texts):
            text = _fill(self._render(messages), fills, order, self.markers)
            add_special = not (self.bos and text.startswith(self.bos))  # as HF's apply_chat_template decides
            return np.asarray(self.tok.encode(text, add_special_tokens=add_special).ids, np.int64)
        pieces = _MARKS.split(self._render(_marked(messages)))
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(texts))):
            word = next(self.reserved.search(t).group() for t in texts if self.reserved.search(t))
            raise ArgumentError(f"a message contains {word!r}, which this model reserves for its own markup, and "
                                "its chat template does not keep messages whole: remove it from the message")
        own = _fill("\ue002".join(pieces[0::2]), fills, order, self.markers).split("\ue002")  # markers: template's only
        encs = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                if own[k // 2]:
                    encs.append(self.tok.encode(own[k // 2], add_special_tokens=False))
                continue
            enc = self.literal().encode(texts[int(piece)], add_special_tokens=False)
            if self.reserved_ids & set(enc.ids):  # an added token that is not "special" still matches as one
                word = self.tok.decode([next(i for i in enc.ids if i in self.reserved_ids)], skip_special_tokens=False)
                raise ArgumentError(f"a message contains {word!r}, which this model reserves: remove it")
            encs.append(enc)
        add_special = not (self.bos and own[0].startswith(self.bos))
        merged = Encoding.merge(encs, growing_offsets=True) if encs else self.tok.encode("", add_special_tokens=False)
        return np.asarray(self.tok.post_process(merged, add_special_tokens=add_special).ids, np.int64)

    def _render(self, messages: list[dict]) -> str:
        return template.render(self.source, messages, add_generation_prompt=True, limits=self.limits,
                               **self.variables)


def _fill(text: str, fills: list[tuple[str, str]], order: list, known: list[str]) -> str:
    """Each marker the template wrote replaced by the next fill of its kind; order gets the fills' indices."""
    markers = sorted({m for m, _ in fills} | set(known), key=len, reverse=True)
    queues = {m: [i for i, (k, _) in enumerate(fills) if k == m] for m in markers}
    parts = re.split("(" + "|".join(map(re.escape, markers)) + ")", text) if markers else [text]
    placed = {m: parts[1::2].count(m) for m in markers}
    if any(placed[m] != len(q) for m, q in queues.items()):
        said = ", ".join(f"{placed[m]} {m} markers for {len(q)}" for m, q in queues.items() if placed[m] != len(q))
        raise EdgeVLMError(f"the chat template placed {said} (images or videos)")
    out = [parts[0]]
    for marker, after in zip(parts[1::2], parts[2::2]):
        i = queues[marker].pop(0)
        order.append(i)
        out += [fills[i][1], after]
    return "".join(out)
