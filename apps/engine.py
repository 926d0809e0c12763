"""The server's generation engine: worker threads, a bounded queue, a stop flag per request, and the counters.

Generation is synchronous ONNX Runtime work: each request runs in a worker thread (at most `parallel` at once,
`queue` more waiting, the rest get 429). The thread hands one Response per token to the event loop through
`emit`; between tokens it reads the request's Stop, which the event loop sets when the client leaves, when a
stuck step passes the deadline, or when the server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import ClientDisconnect

from edgevlm.errors import ArgumentError, ContextOverflowError, EdgeVLMError, ImageError, TemplateError

from .openai_api import ApiError, ChatRequest

log = logging.getLogger("edgevlm.serve")

OUTCOMES = ("completed", "cancelled", "timed_out", "rejected", "failed")


class Stop:
    """Why a request's generation must stop: "client" (it left), "deadline" (a step ran past it) or "shutdown".
    Set on the event loop, read by the worker between tokens; the first reason given stays."""

    def __init__(self):
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def is_set(self) -> bool:
        return self.reason is not None


class Engine:
    """Runs requests on worker threads with a concurrency limit and a bounded queue; keeps counters."""

    def __init__(self, vlm, parallel: int = 1, queue: int = 16, timeout: float = 120.0):
        self.vlm, self.parallel, self.queue_size, self.timeout = vlm, parallel, queue, timeout
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="edgevlm-gen")
        self.slots: asyncio.Semaphore | None = None  # made on the server's loop
        self.waiting = self.active = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()  # the loop and the worker threads both count: `+=` is not atomic
        self.live: set[Stop] = set()  # stop flags of running requests (stop() sets them)
        self.stopping = False

    def count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    async def acquire(self, gone: asyncio.Event, deadline: float) -> None:
        """Wait for a worker slot: 429 when the queue is full, 503 when the deadline passes while waiting."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.parallel)
        if self.slots.locked() and self.waiting >= self.queue_size:
            self.count("rejected")
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
            self.count("cancelled")
            raise ClientDisconnect()
        self.count("timed_out")
        raise ApiError(503, f"the request waited {self.timeout:g} s for a free worker", type="server_busy",
                       code="timeout")

    def start(self, req: ChatRequest, stop: Stop, deadline: float, events: asyncio.Queue) -> None:
        """Run the request on a worker thread (the caller holds a slot; it is released when the thread ends)."""
        loop = asyncio.get_running_loop()

        def emit(item):
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.active += 1
        self.live.add(stop)
        fut = loop.run_in_executor(self.pool, self._run, req, stop, deadline, emit)
        fut.add_done_callback(lambda _: self._release(stop))

    def _release(self, stop: Stop) -> None:
        self.active -= 1
        self.live.discard(stop)
        self.slots.release()

    def stop(self) -> None:
        """Server shutdown: running generations stop at their next token; queued work is dropped."""
        self.stopping = True
        for s in list(self.live):
            s.set("shutdown")
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, req: ChatRequest, stop: Stop, deadline: float, emit) -> None:
        outcome, last, chat = "failed", None, None  # last: the final event, sent after the counters are updated
        try:
            chat = self.vlm.chat(system=req.system)
            for t in req.history:
                chat.add_turn(t.parts, t.answer)
            outcome, last = self._generate(chat, req, stop, deadline, emit)
        except EdgeVLMError as e:
            last = ("error", runtime_error(e))
        except Exception:
            log.exception("generation failed")
            last = ("error", ApiError(500, "the model failed on this request", type="server_error"))
        finally:
            if outcome == "failed" and stop.is_set():  # the client had left (or the deadline or the shutdown had
                # come): nobody waits for this answer any more, whatever happened to it after that
                outcome = "timed_out" if stop.reason == "deadline" else "cancelled"
            self.count(outcome)
            if last is not None:
                emit(last)
            emit(("done", None))
            if outcome == "completed":  # the reply is out; the slot is held a few ms longer
                self._prepare_next_turn(chat)

    def _generate(self, chat, req: ChatRequest, stop: Stop, deadline: float, emit) -> tuple[str, tuple | None]:
        """Stream the answer through emit until it ends or must stop -> (outcome, the final event)."""
        gen = chat.stream(req.turn.parts, **req.sampling)
        try:
            for r in gen:
                if r.finish_reason:
                    return "completed", ("token", r)
                emit(("token", r))
                if stop.reason == "shutdown":
                    return "cancelled", ("error", ApiError(503, "the server is shutting down", type="server_error",
                                                           code="shutting_down"))
                if stop.reason == "client":
                    return "cancelled", ("done", None)
                if stop.reason == "deadline" or time.monotonic() > deadline:
                    return "timed_out", ("error", ApiError(
                        504, f"the request ran past its deadline of {self.timeout:g} s", type="server_error",
                        code="timeout"))
        finally:
            gen.close()
        return "failed", ("error", ApiError(500, "the answer ended without a finish reason", type="server_error"))

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
