"""The OpenAI-compatible HTTP server (Starlette on uvicorn) around one loaded VLM.

Requests run on apps/engine.py's worker threads; a client that disconnects or a request past its deadline sets
the request's Stop, which the worker reads between tokens, so generation stops. The VLM (and its image /
prefix caches) is shared by every request. Connections are bounded in apps/connections.py, headers in
apps/guard.py, bodies here and in apps/body.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .body import is_json_media_type
from .engine import Engine, Stop
from .guard import Guard
from .openai_api import ApiError, Limits, parse_request

log = logging.getLogger("edgevlm.serve")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def chunk(cid: str, created: int, model: str, delta: dict, finish=None, logprobs=None, **extra) -> bytes:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def token_logprobs(r, text_of) -> dict | None:
    """OpenAI's logprobs entry of one Response (None without logprobs): the token's text and bytes, its log
    probability, and the top alternatives'."""
    if r.logprob is None:
        return None

    def entry(token: int, lp: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top_logprobs]}


class EventStream:
    """A text/event-stream response fed from the worker's event queue; stops the worker if the client leaves."""

    def __init__(self, first, events: asyncio.Queue, stop: Stop, deadline: float, model: str,
                 include_usage: bool, on_close, text_of):
        self.first, self.events, self.stop, self.deadline = first, events, stop, deadline
        self.model, self.include_usage, self.on_close, self.text_of = model, include_usage, on_close, text_of

    async def __call__(self, scope, receive, send) -> None:
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send_body(send, chunk(cid, created, self.model, {"role": "assistant", "content": ""}))
            kind, item, n = self.first[0], self.first[1], 0
            while True:
                if kind == "token":
                    r, n = item, n + 1
                    extra = {"edgevlm": r.figures()} if n == 1 or r.finish_reason else {}
                    lp = token_logprobs(r, self.text_of)
                    if r.text or n == 1 or lp:
                        lp = {"content": [lp]} if lp else None
                        await send_body(send, chunk(cid, created, self.model, {"content": r.text}, None, lp, **extra))
                    if r.finish_reason:
                        await send_body(send, chunk(cid, created, self.model, {}, r.finish_reason, **extra))
                        if self.include_usage:
                            usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated_tokens,
                                     "total_tokens": r.prompt_tokens + r.generated_tokens}
                            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model, "choices": [], "usage": usage}
                            await send_body(send, b"data: " + json.dumps(body).encode() + b"\n\n")
                elif kind == "error":
                    await send_body(send, b"data: " + json.dumps(item.body()).encode() + b"\n\n")
                    break
                elif kind in ("done", "gone"):
                    break
                kind, item = await next_event(self.events, self.deadline, self.stop)
            if kind == "done":
                await send_body(send, b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            self.stop.set("client")
        finally:
            self.on_close()


async def send_body(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def next_event(events: asyncio.Queue, deadline: float, stop: Stop):
    try:
        return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()) + 1.0)
    except asyncio.TimeoutError:  # the worker checks the deadline between tokens; this covers a stuck step
        stop.set("deadline")
        return "error", ApiError(504, "the request ran past its deadline", type="server_error", code="timeout")


class BodyBudget:
    """The bytes of request bodies being read or parsed, across all requests, at most `limit`: what a burst of
    large bodies can take before the queue admits or refuses their requests (each is capped on its own, but
    --max-connections of them at once would not be). Past it: 503, retry."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise ApiError(503, f"the server holds {self.limit} bytes of request bodies already; retry later",
                           type="server_busy", code="server_busy", headers={"retry-after": "1", "connection": "close"})
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


async def read_body(request: Request, limit: int, deadline: float, budget: BodyBudget) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or by counting a chunked body), with 408
    when it has not all arrived by the deadline (a body sent a byte at a time would hold the request), and with
    503 while the budget of all bodies in flight is spent. The caller gives its len() back to the budget."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")

    async def read() -> bytes:
        parts, size = [], 0
        try:
            async for part in request.stream():
                if size + len(part) > limit:
                    raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
                budget.take(len(part))
                parts.append(part)
                size += len(part)
        except BaseException:  # refused, timed out or gone: its bytes are dropped here
            budget.release(size)
            raise
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise ApiError(408, "the request body did not arrive in time", code="request_timeout",
                       headers={"connection": "close"}) from None


def completions_route(engine: Engine, budget: BodyBudget, limits: Limits, model_id: str, timeout: float, vlm):
    """POST /v1/chat/completions: media type, body, parse (every bound checked), queue, then the answer streamed
    or collected; the client's disconnect stops the worker."""
    manifest = vlm.manifest
    default_max_tokens = manifest.generation.max_new_tokens

    def text_of(token: int) -> str:  # a token's text, as OpenAI's logprobs show it
        return vlm.tokenizer.decode([token], skip_special_tokens=False)
    vocab = manifest.vocab_size  # bounds logit_bias ids and top_k

    async def completions(request: Request):
        if not is_json_media_type(request.headers.get("content-type")):
            raise ApiError(415, "send the request as Content-Type: application/json (charset=utf-8 is the only "
                                "parameter accepted)", code="unsupported_media_type")
        deadline = time.monotonic() + timeout
        try:
            body = await read_body(request, limits.max_body_bytes, deadline, budget)
        except ClientDisconnect:
            engine.count("cancelled")  # it left before its question was even read
            raise
        try:
            req = await asyncio.get_running_loop().run_in_executor(None, parse_request, body, limits,
                                                                   default_max_tokens, vocab)
        finally:
            budget.release(len(body))
        stop, gone, events = Stop(), asyncio.Event(), asyncio.Queue()

        async def watch():  # the body is read: the next message is http.disconnect, whenever the client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            stop.set("client")
            gone.set()
            events.put_nowait(("gone", None))

        watcher = asyncio.ensure_future(watch())
        try:
            await engine.acquire(gone, deadline)
            engine.start(req, stop, deadline, events)
            first = await next_event(events, deadline, stop)
            if first[0] == "error":
                raise first[1]
            if first[0] == "gone":
                raise ClientDisconnect()
        except BaseException:
            watcher.cancel()
            raise
        if req.stream:
            return EventStream(first, events, stop, deadline, model_id, req.include_usage, watcher.cancel, text_of)
        try:
            return await collect(first, events, stop, deadline, model_id, text_of)
        finally:
            watcher.cancel()

    return completions


def create_app(vlm, model_id: str, limits: Limits = Limits(), parallel: int = 1, queue: int = 16,
               timeout: float = 120.0, api_key: str | None = None, allow_origins: tuple[str, ...] = (),
               allow_hosts: tuple[str, ...] = ()):
    """The ASGI application: routes, error handlers and the Guard (Host, Origin/CORS, API key, headers)."""
    engine = Engine(vlm, parallel=parallel, queue=queue, timeout=timeout)
    budget = BodyBudget(4 * limits.max_body_bytes)  # four of the largest bodies at once
    web = resources.files("edgevlm.apps") / "web"
    pages = {name: (web / name).read_bytes() for name in ("index.html", "app.js", "style.css")}
    types = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css"}

    completions = completions_route(engine, budget, limits, model_id, timeout, vlm)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "edgevlm"}]})

    async def health(request: Request):
        caches = await asyncio.get_running_loop().run_in_executor(None, vlm.caches.stats)  # may list the disk tier
        return JSONResponse({"status": "ok", "model": model_id, "running": engine.active, "waiting": engine.waiting,
                             "parallel": parallel, "queue": queue, **engine.counts, "auth": api_key is not None,
                             "body_bytes": budget.used, "caches": caches})

    def static(name: str):
        async def page(request: Request):
            return Response(pages[name], media_type=types[name.rsplit(".", 1)[1]])
        return page

    async def api_error(request, e: ApiError):
        return error_response(e)

    async def http_error(request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(ApiError(e.status_code, str(e.detail), type=kind, headers=e.headers))

    async def disconnected(request, e):
        return Response(status_code=499)  # nobody reads it

    async def crash(request, e: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, e)
        return error_response(ApiError(500, "internal server error", type="server_error"))

    routes = [Route("/v1/chat/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/", static("index.html"), methods=["GET"])]
    routes += [Route("/" + n, static(n), methods=["GET"]) for n in ("app.js", "style.css")]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: api_error, HTTPException: http_error, ClientDisconnect: disconnected, Exception: crash})
    app.state.engine = engine
    return Guard(app, api_key=api_key, allow_origins=allow_origins, allow_hosts=allow_hosts)


async def collect(first, events, stop: Stop, deadline, model_id, text_of) -> JSONResponse:
    """A non-streaming reply: every token's text, then the last Response's figures."""
    kind, item, text, last, lps = first[0], first[1], [], None, []
    while kind == "token":
        text.append(item.text)
        lps.append(token_logprobs(item, text_of))
        last = item
        if item.finish_reason:
            break
        kind, item = await next_event(events, deadline, stop)
    if kind == "error":
        raise item
    if last is None or not last.finish_reason:
        raise ClientDisconnect()
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generated_tokens,
             "total_tokens": last.prompt_tokens + last.generated_tokens}
    return JSONResponse({
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
        "model": model_id, "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                        "finish_reason": last.finish_reason,
                                        "logprobs": {"content": lps} if lps and lps[0] else None}],
        "usage": usage, "edgevlm": last.figures()})

