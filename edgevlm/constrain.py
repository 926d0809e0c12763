"""Structured output: the answer is made to follow a JSON Schema, any JSON object, a regular expression or a
grammar, by masking at every step the tokens that could not continue it (llguidance: a Rust Earley parser over
the tokenizer's byte trie; ~tens of microseconds a token). The mask is a logits processor, the last one, so the
sampler never picks a token outside the grammar, whatever the backend computed the logits (ONNX, static ONNX,
llama.cpp). llguidance is an optional dependency: `pip install 'edgevlm[structured]'`.

`response_format` takes OpenAI's forms and two more:
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}   a JSON Schema
    {"type": "json_object"}                                                 any JSON object
    {"type": "regex", "regex": "..."}                                       a regular expression
    {"type": "grammar", "grammar": "..."}                                   a Lark grammar (llguidance's dialect)
    {"type": "text"} or None                                                no constraint
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from .errors import ArgumentError, BackendError, DependencyError

MAX_GRAMMAR_BYTES = 1 << 20  # a schema or grammar: far above any real one


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise DependencyError("structured output needs llguidance: pip install 'edgevlm[structured]'") from None
    return llguidance


def grammar_of(response_format: dict | None) -> str | None:
    """An OpenAI-style response_format (or ours) -> an llguidance grammar string, None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ArgumentError("response_format must be an object with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return None
    ll = _llguidance()
    Matcher = ll.LLMatcher
    if kind == "json_object":
        return Matcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ArgumentError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        _size("json_schema", json.dumps(schema))
        try:
            return Matcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise ArgumentError(f"response_format json_schema: {e}") from None
    if kind in ("regex", "grammar"):
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise ArgumentError(f"response_format {kind} needs a non-empty string under {kind!r}")
        _size(kind, text)
        return Matcher.grammar_from_regex(text) if kind == "regex" else Matcher.grammar_from_lark(text)
    raise ArgumentError(f"response_format type {kind!r} is not one of text, json_object, json_schema, regex, grammar")


def _size(what: str, text: str) -> None:
    if len(text.encode("utf-8", "replace")) > MAX_GRAMMAR_BYTES:
        raise ArgumentError(f"response_format {what} is over {MAX_GRAMMAR_BYTES} bytes")


class TokenTable:
    """llguidance's view of a bundle's tokenizer (built once per model: about a second for 150k tokens)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: Sequence[int]):
        self.vocab_size = vocab_size
        try:
            self.tok = _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos))
        except DependencyError:
            raise
        except Exception as e:  # llguidance raises plain exceptions on tokenizers it cannot read
            raise BackendError(f"structured output cannot use this bundle's tokenizer: {str(e)[:200]}") from None

    def processor(self, grammar: str):
        """A logits processor (logits, history) -> logits that masks every token the grammar does not allow next.
        It feeds the grammar the tokens sampled since its last call (history[-1])."""
        ll = _llguidance()
        limits = ll.LLParserLimits(verbose_errors=False)
        matcher = ll.LLMatcher(self.tok, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise ArgumentError(f"response_format: {matcher.get_error()[:300]}")
        mask = np.zeros((self.vocab_size + 31) // 32, np.int32)
        fed = [0]

        def constrain(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
            for tok in history[fed[0]:]:
                matcher.consume_token(int(tok))
            fed[0] = len(history)
            if matcher.is_error():
                raise BackendError(f"structured output: the grammar refused a token ({matcher.get_error()[:200]})")
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=logits.size).view(bool)
            out = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
            return out

        constrain.matcher = matcher  # (what the tests and the caller may ask: is_accepting, is_stopped)
        return constrain
