"""The OpenAI chat-completions wire format: a request body -> a checked ChatRequest; OpenAI-style errors.

Only `data:` image URLs are accepted (the server never fetches anything). Every limit is checked here, before
any pixel is decoded: body size by the caller, JSON depth (apps/body.py), then every number the runtime
computes with (a 400 naming the field), image count, image bytes and the size and shape from the image header.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass, field

from PIL import Image

from edgevlm.image import ACCEPTED_FORMATS, MAX_SIDE_RATIO
from edgevlm.sampling import MAX_BIAS

from .body import BodyError, load_json


class ApiError(Exception):
    """An error the client sees as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_tokens: int = 1024


@dataclass
class Turn:
    parts: list  # the user's message in order: text (str) and images (bytes); adjacent texts joined by newlines
    answer: str = ""  # the assistant's reply (history turns)

    @property
    def text(self) -> str:
        return "\n".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[bytes]:
        return [p for p in self.parts if not isinstance(p, str)]


@dataclass
class ChatRequest:
    system: str | None
    history: list[Turn]
    turn: Turn  # the question to answer
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # keyword arguments of Chat.stream


DATA_URL = re.compile(r"data:image/([a-z0-9.+-]+);base64,(.*)", re.S | re.I)
DATA_TYPE = re.compile(r"data:([^;,]*)[;,]", re.I)  # the media type of any data: URL


def parse_request(body: bytes, limits: Limits, default_max_tokens: int, vocab: int) -> ChatRequest:
    """A request body -> a ChatRequest whose every field the runtime can take (vocab: the model's vocabulary
    size, which bounds logit_bias and top_k); ApiError (4xx) otherwise."""
    try:
        req = load_json(body)
    except BodyError as e:
        raise ApiError(400, str(e), code="invalid_json") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(req.get("model", ""), str):
        raise ApiError(400, "model must be a string", param="model")
    for name in req:  # every field is honoured or refused by name: none is dropped silently
        if name not in HONOURED:
            raise ApiError(400, f"{name} is not supported by this server", code="unsupported_parameter", param=name)
    # one model per server: any `model` name is answered by it (apps hard-code names), and replies name it
    if req.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", code="unsupported_parameter", param="n")
    for p in ("frequency_penalty", "presence_penalty"):
        if req.get(p) not in (None, 0, 0.0):
            raise ApiError(400, f"{p} is not supported (leave it 0)", code="unsupported_parameter", param=p)
    system, history, turn = _conversation(req.get("messages"), limits)
    stream = _typed(req, "stream", bool, False)
    opts = req.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(system, history, turn, stream=stream, include_usage=bool(opts.get("include_usage")),
                       sampling=_sampling(req, limits, default_max_tokens, vocab))


def _typed(req: dict, name: str, kind, default):
    v = req.get(name)
    if v is None:
        return default
    if kind is bool:
        ok = isinstance(v, bool)
    else:
        ok = isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)
    if not ok:
        raise ApiError(400, f"{name} must be of type {kind.__name__}", param=name)
    return v


# The chat-completions fields this server honours (n, frequency_penalty and presence_penalty at their no-op values
# only); top_k, repetition_penalty and max_image_tokens are ours. Any other field is refused by name.
HONOURED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "logit_bias", "logprobs", "top_logprobs", "response_format", "n", "frequency_penalty",
    "presence_penalty", "top_k", "repetition_penalty", "max_image_tokens"})
MIN_TEMPERATURE = 1e-6  # below it, logits / temperature can overflow to inf in the sampler; 0 is greedy
MAX_SEED = 2**63 - 1
TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _number(req: dict, name: str, default, lo, hi, integer: bool = False, what: str | None = None):
    """req[name] (default when absent): a number in [lo, hi], an integer with integer=True; 400 naming the
    field otherwise. The range is checked before any conversion: Python compares a 400-digit integer with a
    float exactly, where float() would raise."""
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        what = what or f"{'an integer' if integer else 'a number'} between {lo} and {hi}"
        raise ApiError(400, f"{name} must be {what}", param=name)
    return v


def _sampling(req: dict, limits: Limits, default_max_tokens: int, vocab: int) -> dict:
    cap = limits.max_tokens
    max_tokens = _number(req, "max_completion_tokens", None, 1, cap, integer=True)
    max_tokens = _number(req, "max_tokens", max_tokens, 1, cap, integer=True)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, cap)
    temperature = float(_number(req, "temperature", 0.0, 0, 2))
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and 2", param="temperature")
    top_p = float(_number(req, "top_p", 1.0, 0, 1, what="a number in (0, 1]"))
    if top_p == 0:
        raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
    top_k = _number(req, "top_k", 0, 0, vocab, integer=True,
                    what=f"an integer between 0 (off) and {vocab} (the vocabulary size)")
    seed = _number(req, "seed", None, 0, MAX_SEED, integer=True)
    stop = req.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    logprobs = _typed(req, "logprobs", bool, False)
    top_logprobs = _number(req, "top_logprobs", 0, 0, 20, integer=True)
    if top_logprobs and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                logit_bias=_logit_bias(req.get("logit_bias"), vocab), logprobs=logprobs, top_logprobs=top_logprobs,
                repetition_penalty=float(_number(req, "repetition_penalty", 1.0, 0.01, 10)),
                max_image_tokens=_number(req, "max_image_tokens", None, 1, 1 << 16, integer=True),
                response_format=_response_format(req.get("response_format")))


def _response_format(rf) -> dict | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}; the
    grammar is compiled here, so a schema it cannot take is a 400 before the request is queued."""
    if rf is None:
        return None
    from edgevlm.constrain import grammar_of
    from edgevlm.errors import ArgumentError, DependencyError

    if isinstance(rf, dict) and rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict):
        unknown = set(rf["json_schema"]) - {"name", "schema", "strict", "description"}
        if unknown:
            raise ApiError(400, f"response_format.json_schema: unknown field {sorted(unknown)[0]!r}",
                           param="response_format")
    try:
        grammar_of(rf)
    except ArgumentError as e:
        raise ApiError(400, str(e), param="response_format") from None
    except DependencyError as e:
        raise ApiError(501, str(e), type="server_error", param="response_format") from None
    return rf


def _logit_bias(bias, vocab: int) -> dict[int, float] | None:
    """OpenAI's form, {"token id": a number in [-100, 100]}, up to 300 entries, every id below `vocab`."""
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > 300:
        raise ApiError(400, "logit_bias must map up to 300 token ids to numbers", param="logit_bias")
    out = {}
    for k, v in bias.items():
        if not TOKEN_ID.fullmatch(k) or int(k) >= vocab:
            raise ApiError(400, f"logit_bias keys must be token ids below {vocab} (the vocabulary size), "
                                f"not {k[:20]!r}", param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -MAX_BIAS <= v <= MAX_BIAS:
            raise ApiError(400, f"logit_bias values must be numbers in [-{MAX_BIAS}, {MAX_BIAS}] (token {k})",
                           param="logit_bias")
        out[int(k)] = float(v)
    return out


def _conversation(messages, limits: Limits) -> tuple[str | None, list[Turn], Turn]:
    """OpenAI messages -> (system prompt, past turns, the question). Consecutive messages of one role merge; a user
    message's text and image parts keep their order."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[tuple[str, list]] = []  # (role, parts: text str and image bytes in order)
    n_images = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           param=f"messages[{i}].role")
        role = msg["role"]
        parts = _content(msg.get("content"), i, allow_images=role == "user")
        images = [p for p in parts if not isinstance(p, str)]
        n_images += len(images)
        if n_images > limits.max_images:
            raise ApiError(400, f"at most {limits.max_images} images per request", code="too_many_images",
                           param="messages")
        for img in images:
            _check_pixels(img, limits.max_image_pixels)
        if role in ("system", "developer"):
            system += parts
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend(parts)
        else:
            turns.append((role, parts))
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "messages must start and end with a user message", param="messages")
    out: list[Turn] = []
    for role, parts in turns:
        if role == "user":
            out.append(Turn(_joined(parts)))
        else:
            out[-1].answer = "\n".join(parts)
    return ("\n".join(system) or None), out[:-1], out[-1]


def _joined(parts: list) -> list:
    """Adjacent text parts as one text, joined by newlines; a message without text gets an empty one."""
    out: list = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += "\n" + p
        else:
            out.append(p)
    return out if any(isinstance(p, str) for p in out) else out + [""]


def _content(content, i: int, allow_images: bool) -> list:
    """A message's content -> its parts in order: texts (str) and images (bytes)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[{i}].content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url" and allow_images:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(_data_url(url, where))
        else:
            allowed = "text or image_url" if allow_images else "text"
            raise ApiError(400, f"{where} must be a part of type {allowed}", param=where)
    return parts


def _data_url(url, where: str) -> bytes:
    m = DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if not m:
        raise ApiError(400, f"{where}: {_not_an_image_url(url)}", code="invalid_image_url", param=where)
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group(2)), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", code="invalid_image_url", param=where) from None


def _not_an_image_url(url) -> str:
    kind = DATA_TYPE.match(url) if isinstance(url, str) else None
    if kind is None:
        return "images must be data: URLs (data:image/png;base64,...); this server fetches nothing"
    if kind.group(1).lower().startswith("image/"):
        return "an image's data: URL must be base64 (data:image/png;base64,...)"
    # e.g. a text file picked in a browser: data:text/plain;base64,...
    return (f"the data: URL holds {kind.group(1)[:60] or 'data of no type'}, not an image; send one of "
            f"{', '.join(ACCEPTED_FORMATS)} as data:image/...;base64,...")


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Read the size from the image header (nothing decoded) and refuse large or strip-shaped images before the
    runtime sees them."""
    try:
        w, h = header_size(data)
    except Exception:
        raise ApiError(400, f"an image is not of an accepted format ({', '.join(ACCEPTED_FORMATS)}) or is corrupt",
                       code="invalid_image") from None
    if w * h > max_pixels:
        raise ApiError(413, f"an image has {w}x{h} pixels; this server accepts at most {max_pixels} pixels per image",
                       type="invalid_request_error", code="image_too_large")
    if w < 1 or h < 1 or max(w, h) > MAX_SIDE_RATIO * min(w, h):
        raise ApiError(400, f"an image is {w}x{h} pixels; its sides may differ by at most {MAX_SIDE_RATIO}:1",
                       code="invalid_image")


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the image header declares them, for the accepted formats only; nothing is decoded.
    This is Image.open's own format loop without its decompression-bomb check, which raises on a large image
    without saying its size (the size is all we read here)."""
    Image.init()
    prefix = data[:16]
    for fmt in ACCEPTED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        result = not accept or accept(prefix)
        if not result or isinstance(result, str):  # a str says why not (a codec missing)
            continue
        try:
            with factory(io.BytesIO(data), None) as im:
                return im.size
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # as Image.open: not this format, try the next
    raise ValueError("not an image of an accepted format")
