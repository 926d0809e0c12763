"""Connections: what uvicorn's h11 protocol lacks for a server that any local process (and, through the browser,
any web page) can reach. Used as uvicorn's `http=` protocol class; the limits are class attributes.

- At most `max_connections` are open. A new connection beyond that closes the one that has waited longest for
  its client (an idle keep-alive, a half-sent head, a body still arriving); a connection whose request is being
  answered is never closed for another, and when every one is, the newcomer gets 503. uvicorn's own
  `limit_concurrency` is left off: it counts idle connections too, so a few hundred sockets that never send a
  byte turned every real request into a 503 for as long as they stayed open.
- A request head must be complete within `client_timeout` seconds of the connection opening or of the previous
  response; then 408 (or a plain close if not a byte came). uvicorn's keep-alive timer covers only the time
  after a response until the first byte, so a never-finished head held its connection forever.
- A client that stops reading its reply for `client_timeout` seconds, while more than the transport's high-water
  mark (64 KB) waits for it, is cut off: the reply would otherwise hold the connection (and the stream) forever.
- A head still incomplete past MAX_HEAD_BYTES gets 431 (a complete one is measured by the Guard). h11's own
  bound answers 400 and only for heads that arrive in pieces, so it is set above this one as a backstop.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import MAX_HEAD_BYTES

H11_MAX_INCOMPLETE = 1 << 20  # h11's backstop: above MAX_HEAD_BYTES plus one socket read (asyncio reads 256 KB)


def bounded_h11(max_connections: int, client_timeout: float) -> type:
    """The protocol class for uvicorn.Config(http=...), with these bounds."""
    return type("BoundedH11", (BoundedH11,), {"max_connections": max_connections, "client_timeout": client_timeout})


class BoundedH11(H11Protocol):
    max_connections = 256
    client_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.last_read = time.monotonic()
        self._head_timer = self._stall_timer = None
        self._head_bytes = 0
        self._await_head()
        self._make_room()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        self._stop_stall_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        if self._head_timer is not None and self.conn.their_state is h11.IDLE:  # (the start of) a head
            self._head_bytes += len(data)
        super().data_received(data)  # a complete head stops the timer (handle_events)
        if self._head_timer is not None and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(431, f"the request headers exceed {MAX_HEAD_BYTES} bytes", "headers_too_large")

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request began: its head is complete and the app has it
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        self._await_head()  # first: super() may start a pipelined request at once, which stops the timer again
        super().on_response_complete()

    def pause_writing(self) -> None:  # more than the high-water mark waits for this client
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.client_timeout, self.transport.abort)  # close() would wait

    def resume_writing(self) -> None:
        self._stop_stall_timer()
        super().resume_writing()

    def waiting_for_client(self) -> bool:
        """No request of this connection is being answered: it waits for a head, or for a body still arriving."""
        return self.conn.our_state is h11.IDLE and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.client_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, f"the request headers did not arrive within {self.client_timeout:g} s", "request_timeout")
        else:
            self.transport.close()

    def _make_room(self) -> None:
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) <= self.max_connections:
            return
        idle = [c for c in live if c is not self and isinstance(c, BoundedH11) and c.waiting_for_client()]
        if idle:
            min(idle, key=lambda c: c.last_read).transport.close()
        else:
            self._refuse(503, f"all {self.max_connections} connections are busy; retry later", "too_many_connections",
                         "server_busy")

    def _refuse(self, status: int, message: str, code: str, kind: str = "invalid_request_error") -> None:
        """Answer with an OpenAI-style error and close; only while no response of this connection has begun."""
        self._stop_head_timer()
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\nx-content-type-options: nosniff\r\n"
                "cache-control: no-store\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()
