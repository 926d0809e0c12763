"""The OpenAI-compatible HTTP server (Starlette on uvicorn) around one loaded VLM.

Generation is synchronous ONNX Runtime work: each request runs in a worker thread (at most `parallel` at once,
`queue` more waiting, the rest get 429). The thread hands one Response per token to the event loop; a client
that disconnects or a request past its deadline sets a flag the thread checks between tokens, so generation
stops. The VLM (and its image / prefix caches) is shared by every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgevlm.errors import ArgumentError, ContextOverflowError, EdgeVLMError, ImageError, TemplateError

from .guard import Guard
from .openai_api import ApiError, ChatRequest, Limits, parse_request

log = logging.getLogger("edgevlm.serve")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def stats(r) -> dict:
    """The Response's timing fields (and any the runtime adds later), for the `edgevlm` key of a reply."""
    d = dataclasses.asdict(r)
    return {**{k: v for k, v in d.items() if k not in ("text", "token", "finish_reason")}, "warm": r.warm}


class Engine:
    """Runs requests on worker threads with a concurrency limit and a bounded queue; keeps counters."""

    def __init__(self, vlm, parallel: int = 1, queue: int = 16, timeout: float = 120.0):
        self.vlm, self.parallel, self.queue_size, self.timeout = vlm, parallel, queue, timeout
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="edgevlm-gen")
        self.slots: asyncio.Semaphore | None = None  # made on the server's loop
        self.waiting = self.active = 0
        self.counts = dict(completed=0, cancelled=0, timed_out=0, rejected=0, failed=0)
        self._lock = threading.Lock()  # counts are bumped from worker threads too
        self.live: set[threading.Event] = set()  # cancel flags of running requests (stop() sets them)
        self.stopping = False

    async def acquire(self, gone: asyncio.Event, deadline: float) -> None:
        """Wait for a worker slot: 429 when the queue is full, 503 when the deadline passes while waiting."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.parallel)
        if self.slots.locked() and self.waiting >= self.queue_size:
            self.counts["rejected"] += 1
            raise ApiError(429, f"the server is busy ({self.parallel} running, {self.waiting} waiting); retry later",
                           type="server_busy", code="queue_full", headers={"retry-after": "1"})
        self.waiting += 1
        take, leave = asyncio.ensure_future(self.slots.acquire()), asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({take, leave}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            leave.cancel()
            if not take.done():
                take.cancel()
        if take.done() and not take.cancelled():
            if not gone.is_set():
                return
            self.slots.release()
        if gone.is_set():
            self.counts["cancelled"] += 1
            raise ClientDisconnect()
        self.counts["timed_out"] += 1
        raise ApiError(503, f"the request waited {self.timeout:g} s for a free worker", type="server_busy",
                       code="timeout")

    def start(self, req: ChatRequest, cancel: threading.Event, deadline: float, events: asyncio.Queue) -> None:
        """Run the request on a worker thread (the caller holds a slot; it is released when the thread ends)."""
        loop = asyncio.get_running_loop()

        def emit(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.active += 1
        self.live.add(cancel)
        fut = loop.run_in_executor(self.pool, self._run, req, cancel, deadline, emit)
        fut.add_done_callback(lambda _: self._release(cancel))

    def _release(self, cancel: threading.Event) -> None:
        self.active -= 1
        self.live.discard(cancel)
        self.slots.release()

    def stop(self) -> None:
        """Server shutdown: running generations stop at their next token; queued work is dropped."""
        self.stopping = True
        for cancel in list(self.live):
            cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, req: ChatRequest, cancel: threading.Event, deadline: float, emit) -> None:
        outcome, last = "failed", None  # last: the final event, sent after the counters are updated
        chat = None
        try:
            chat = self.vlm.chat(system=req.system)
            for t in req.history:
                chat.add_turn(t.text, t.answer, image=t.image)
            gen = chat.stream(req.turn.text, image=req.turn.image, **req.sampling)
            try:
                for r in gen:
                    if r.finish_reason:
                        outcome, last = "completed", ("token", r)
                        break
                    emit(("token", r))
                    if cancel.is_set():
                        outcome, last = "cancelled", ("done", None)
                        if self.stopping:
                            last = ("error", ApiError(503, "the server is shutting down", type="server_error",
                                                      code="shutting_down"))
                        break
                    if time.monotonic() > deadline:
                        outcome, last = "timed_out", ("error", ApiError(
                            504, f"the request ran past its deadline of {self.timeout:g} s", type="server_error",
                            code="timeout"))
                        break
            finally:
                gen.close()
        except EdgeVLMError as e:
            last = ("error", runtime_error(e))
        except Exception:
            log.exception("generation failed")
            last = ("error", ApiError(500, "the model failed on this request", type="server_error"))
        finally:
            with self._lock:
                self.counts[outcome] += 1
            if last is not None:
                emit(last)
            emit(("done", None))
            if outcome == "completed":  # the reply is out; the slot is held a few ms longer
                self._prepare_next_turn(chat)

    def _prepare_next_turn(self, chat) -> None:
        """A client that continues the conversation sends it all again plus its next message: prefill the
        turn separator and user header now and offer the KV to the prefix cache, so that request prefills only
        the new message (what `edgevlm chat` gets from chat.prepare() between turns)."""
        try:
            chat.prepare(share=True)
        except Exception:  # an optimisation: never the request's failure
            log.exception("preparing the next turn failed")


def runtime_error(e: EdgeVLMError) -> ApiError:
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, (ImageError, ArgumentError, TemplateError)):
        return ApiError(400, str(e), code="invalid_image" if isinstance(e, ImageError) else None)
    log.error("runtime error: %s", e)
    return ApiError(500, "the model failed on this request", type="server_error")


def chunk(cid: str, created: int, model: str, delta: dict, finish=None, **extra) -> bytes:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class EventStream:
    """A text/event-stream response fed from the worker's event queue; stops the worker if the client leaves."""

    def __init__(self, first, events: asyncio.Queue, cancel: threading.Event, deadline: float, model: str,
                 include_usage: bool, on_close):
        self.first, self.events, self.cancel, self.deadline = first, events, cancel, deadline
        self.model, self.include_usage, self.on_close = model, include_usage, on_close

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
                    extra = {"edgevlm": stats(r)} if n == 1 or r.finish_reason else {}
                    if r.text or n == 1:
                        await send_body(send, chunk(cid, created, self.model, {"content": r.text}, **extra))
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
                kind, item = await next_event(self.events, self.deadline, self.cancel)
            if kind == "done":
                await send_body(send, b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            self.cancel.set()
        finally:
            self.on_close()


async def send_body(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def next_event(events: asyncio.Queue, deadline: float, cancel: threading.Event):
    try:
        return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()) + 1.0)
    except asyncio.TimeoutError:  # the worker checks the deadline between tokens; this covers a stuck step
        cancel.set()
        return "error", ApiError(504, "the request ran past its deadline", type="server_error", code="timeout")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or by counting a chunked body)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def create_app(vlm, model_id: str, limits: Limits = Limits(), parallel: int = 1, queue: int = 16,
               timeout: float = 120.0, api_key: str | None = None, allow_origins: tuple[str, ...] = (),
               allow_hosts: tuple[str, ...] = ()):
    """The ASGI application: routes, error handlers and the Guard (Host, Origin/CORS, API key, headers)."""
    engine = Engine(vlm, parallel=parallel, queue=queue, timeout=timeout)
    default_max_tokens = vlm.manifest.generation.max_new_tokens
    web = resources.files("edgevlm.apps") / "web"
    pages = {name: (web / name).read_bytes() for name in ("index.html", "app.js", "style.css")}
    types = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css"}

    async def completions(request: Request):
        if "application/json" not in request.headers.get("content-type", ""):
            raise ApiError(415, "send the request as Content-Type: application/json", code="unsupported_media_type")
        body = await read_body(request, limits.max_body_bytes)
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(None, parse_request, body, limits, default_max_tokens)
        deadline = time.monotonic() + timeout
        cancel, gone, events = threading.Event(), asyncio.Event(), asyncio.Queue()

        async def watch():  # the body is read: the next message is http.disconnect, whenever the client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel.set()
            gone.set()
            events.put_nowait(("gone", None))

        watcher = asyncio.ensure_future(watch())
        try:
            await engine.acquire(gone, deadline)
            engine.start(req, cancel, deadline, events)
            first = await next_event(events, deadline, cancel)
            if first[0] == "error":
                raise first[1]
            if first[0] == "gone":
                raise ClientDisconnect()
        except BaseException:
            watcher.cancel()
            raise
        if req.stream:
            return EventStream(first, events, cancel, deadline, model_id, req.include_usage, watcher.cancel)
        try:
            return await collect(first, events, cancel, deadline, model_id)
        finally:
            watcher.cancel()

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "edgevlm"}]})

    async def health(request: Request):
        caches = await asyncio.get_running_loop().run_in_executor(None, vlm.caches.stats)  # may list the disk tier
        return JSONResponse({"status": "ok", "model": model_id, "running": engine.active, "waiting": engine.waiting,
                             "parallel": parallel, "queue": queue, **engine.counts, "auth": api_key is not None,
                             "caches": caches})

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


async def collect(first, events, cancel, deadline, model_id) -> JSONResponse:
    """A non-streaming reply: every token's text, then the last Response's figures."""
    kind, item, text, last = first[0], first[1], [], None
    while kind == "token":
        text.append(item.text)
        last = item
        if item.finish_reason:
            break
        kind, item = await next_event(events, deadline, cancel)
    if kind == "error":
        raise item
    if last is None or not last.finish_reason:
        raise ClientDisconnect()
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generated_tokens,
             "total_tokens": last.prompt_tokens + last.generated_tokens}
    return JSONResponse({
        "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
        "model": model_id, "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                        "finish_reason": last.finish_reason, "logprobs": None}],
        "usage": usage, "edgevlm": stats(last)})

