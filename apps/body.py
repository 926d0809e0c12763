"""A request body -> a JSON value, bounded before the parser runs: the media type and the nesting depth.

Python's json module recurses once per level of nesting: a 1 MB body of `[[[[...` ends in RecursionError deep
inside it. So the depth is measured on the bytes first, in linear time and bounded memory, and the parser only
ever sees bodies it can finish.
"""

from __future__ import annotations

import json

import numpy as np

MAX_JSON_DEPTH = 32  # an OpenAI chat request nests 6 deep (messages > message > content > part > image_url)

_KEEP = b'"[]{}'  # all the depth scan needs, once escapes are gone
_DROP = bytes(sorted(set(range(256)) - set(_KEEP)))
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_CHUNK = 1 << 20


def is_json_media_type(value: str | None) -> bool:
    """`application/json`, optionally with `charset=utf-8`, and nothing else. (A substring test would take
    `text/plain; x=application/json`, a type browsers send cross-origin without asking first.)"""
    if value is None:
        return False
    kind, *params = (p.strip() for p in value.split(";"))
    if kind.lower() != "application/json" or len(params) > 1:
        return False
    for p in params:
        name, _, v = p.partition("=")
        if name.strip().lower() != "charset" or v.strip().strip('"').lower() != "utf-8":
            return False
    return True


def json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep arrays and objects nest in `body`, brackets inside strings not counted; counting stops a little
    past `limit`. For a body that is not valid JSON it is an upper bound of the depth a parser reaches before it
    finds the error (up to there the body is valid, and there the count is exact)."""
    # drop escaped backslashes, then escaped quotes (bytes.replace pairs them left to right, as a JSON reader
    # does); the quotes left delimit strings
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DROP)
    depth = deepest = inside = 0
    for i in range(0, len(text), _CHUNK):  # 1M bytes a step: a few MB of temporaries per step
        part = np.frombuffer(text, np.uint8, min(_CHUNK, len(text) - i), i)
        within = np.bitwise_xor.accumulate((part == ord('"')).view(np.uint8)) ^ inside  # 1: inside a string
        run = np.cumsum(np.where(within == 1, 0, _STEP[part]), dtype=np.int32) + depth
        deepest, depth, inside = max(deepest, int(run.max())), int(run[-1]), int(within[-1])
        if deepest > limit:
            break
    return deepest


class BodyError(ValueError):
    """The body is not the JSON this server reads; the message says why."""


def load_json(body: bytes, max_depth: int = MAX_JSON_DEPTH):
    """UTF-8 JSON -> its value; BodyError when it is not UTF-8, not JSON or nested deeper than max_depth.
    NaN, Infinity and numbers past the float range (1e400) load as nan / inf, as Python's json reads them, so
    that the check of each field can refuse them naming the field (openai_api._number)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the request body is not UTF-8: {e}") from None
    if json_depth(body, max_depth) > max_depth:
        raise BodyError(f"the request body nests arrays and objects more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError cannot happen below the depth cap; kept as a net
        raise BodyError(f"the request body is not valid JSON: {e}") from None
