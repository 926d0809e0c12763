"""A deadline for pure-Python work on the calling thread (a chat template's render): past it, the work is
interrupted with `Expired` at its next bytecode.

One daemon thread watches every deadline; when one passes it raises `Expired` in the thread that set it
(CPython's PyThreadState_SetAsyncExc). That stops loops however they are written (nested loops over a long
string, a recursive macro) but not a single long C call (`'x' * 10**9`); those are capped where they are
made (edgevlm/template.py). A deadline that is cancelled first never fires: setting and cancelling share a
lock, and a pending exception is withdrawn when the work ends.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from contextlib import contextmanager


class Expired(Exception):
    """The work ran past its deadline."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)  # (thread id, exception class or NULL: withdraw)
_lock = threading.Lock()
_wake = threading.Condition(_lock)
_heap: list[tuple[float, int, int]] = []  # (when, ticket, thread id)
_live: dict[int, int] = {}  # ticket -> thread id, while its work runs
_tickets = itertools.count()
_watcher: threading.Thread | None = None


def _watch() -> None:
    with _lock:
        while True:
            now = time.monotonic()
            while _heap and (_heap[0][1] not in _live or _heap[0][0] <= now):
                when, ticket, tid = heapq.heappop(_heap)
                if ticket in _live and when <= now:
                    del _live[ticket]  # fire once; the work's `finally` withdraws it if it ended meanwhile
                    _set_async_exc(tid, id(Expired))  # (a module-level class: alive as long as this module)
            _wake.wait(None if not _heap else _heap[0][0] - now)


@contextmanager
def deadline(seconds: float):
    """Run the body with `Expired` raised in it once `seconds` have passed."""
    global _watcher
    tid = threading.get_ident()
    with _lock:
        if _watcher is None:
            _watcher = threading.Thread(target=_watch, name="edgevlm-deadline", daemon=True)
            _watcher.start()
        ticket = next(_tickets)
        _live[ticket] = tid
        heapq.heappush(_heap, (time.monotonic() + seconds, ticket, tid))
        _wake.notify()
    try:
        yield
    finally:
        with _lock:
            fired = _live.pop(ticket, None) is None
            if fired:  # it fired: make sure the exception is not left pending for the code after the body
                _set_async_exc(tid, None)
