"""The OpenAI chat-completions wire format: a request body -> a checked ChatRequest; OpenAI-style errors.

Only `data:` image URLs are accepted (the server never fetches anything). Every limit is checked here, before
any pixel is decoded: body size by the caller, then image count, image bytes and the pixel count from the
image header.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import dataclass, field

from PIL import Image

from edgevlm.image import ACCEPTED_FORMATS


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
    text: str
    image: bytes | None = None
    answer: str = ""  # the assistant's reply (history turns)


@dataclass
class ChatRequest:
    system: str | None
    history: list[Turn]
    turn: Turn  # the question to answer
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # keyword arguments of Chat.stream


DATA_URL = re.compile(r"data:image/([a-z0-9.+-]+);base64,(.*)", re.S | re.I)


def parse_request(body: bytes, limits: Limits, default_max_tokens: int) -> ChatRequest:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(req.get("model", ""), str):
        raise ApiError(400, "model must be a string", param="model")
    # one model per server: any `model` name is answered by it (apps hard-code names), and replies name it
    if req.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    if req.get("tools") or req.get("functions"):
        raise ApiError(400, "tool calls are not supported", param="tools")
    for p in ("frequency_penalty", "presence_penalty"):
        if req.get(p) not in (None, 0, 0.0):
            raise ApiError(400, f"{p} is not supported (leave it 0)", param=p)
    system, history, turn = _conversation(req.get("messages"), limits)
    stream = _typed(req, "stream", bool, False)
    opts = req.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(system, history, turn, stream=stream, include_usage=bool(opts.get("include_usage")),
                       sampling=_sampling(req, limits, default_max_tokens))


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


def _sampling(req: dict, limits: Limits, default_max_tokens: int) -> dict:
    max_tokens = _typed(req, "max_completion_tokens", int, None)
    max_tokens = _typed(req, "max_tokens", int, max_tokens)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}", param="max_tokens")
    temperature = float(_typed(req, "temperature", float, 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    top_p = float(_typed(req, "top_p", float, 1.0))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    top_k = _typed(req, "top_k", int, 0)
    if top_k < 0:
        raise ApiError(400, "top_k must be >= 0", param="top_k")
    seed = _typed(req, "seed", int, None)
    stop = req.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    bias = _typed(req, "logit_bias", dict, None)
    if bias is not None:  # OpenAI's form: {"token id": number in [-100, 100]}
        try:
            bias = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        if len(bias) > 300 or not all(k >= 0 and isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and -100 <= v <= 100 for k, v in bias.items()):
            raise ApiError(400, "logit_bias maps up to 300 token ids to numbers in [-100, 100]", param="logit_bias")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                logit_bias=bias)


def _conversation(messages, limits: Limits) -> tuple[str | None, list[Turn], Turn]:
    """OpenAI messages -> (system prompt, past turns, the question). Consecutive messages of one role merge."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[tuple[str, list[str], list[bytes]]] = []  # (role, texts, images)
    n_images = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           param=f"messages[{i}].role")
        role = msg["role"]
        texts, images = _content(msg.get("content"), i, allow_images=role == "user")
        n_images += len(images)
        if n_images > limits.max_images:
            raise ApiError(400, f"at most {limits.max_images} images per request", code="too_many_images",
                           param="messages")
        for img in images:
            _check_pixels(img, limits.max_image_pixels)
        if role in ("system", "developer"):
            system += texts
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
            turns[-1][2].extend(images)
        else:
            turns.append((role, texts, images))
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "messages must start and end with a user message", param="messages")
    out: list[Turn] = []
    for role, texts, images in turns:
        if role == "user":
            if len(images) > 1:
                raise ApiError(400, "one image per user message: send further images in later messages",
                               code="too_many_images", param="messages")
            out.append(Turn("\n".join(texts), images[0] if images else None))
        else:
            out[-1].answer = "\n".join(texts)
    return ("\n".join(system) or None), out[:-1], out[-1]


def _content(content, i: int, allow_images: bool) -> tuple[list[str], list[bytes]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[{i}].content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_data_url(url, where))
        else:
            allowed = "text or image_url" if allow_images else "text"
            raise ApiError(400, f"{where} must be a part of type {allowed}", param=where)
    return texts, images


def _data_url(url, where: str) -> bytes:
    m = DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if not m:
        raise ApiError(400, f"{where}: images must be data: URLs (data:image/png;base64,...); "
                            "this server fetches nothing", code="invalid_image_url", param=where)
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group(2)), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", code="invalid_image_url", param=where) from None


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Read the size from the image header (nothing decoded) and refuse large images before the runtime sees them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        w, h = max_pixels + 1, 1
    except Exception:
        raise ApiError(400, f"an image is not of an accepted format ({', '.join(ACCEPTED_FORMATS)}) or is corrupt",
                       code="invalid_image") from None
    if w * h > max_pixels:
        raise ApiError(413, f"an image has {w}x{h} pixels; this server accepts at most {max_pixels} pixels per image",
                       type="invalid_request_error", code="image_too_large")
