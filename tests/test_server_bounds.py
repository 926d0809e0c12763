"""`edgevlm serve` against hostile clients: deep JSON, disguised media types, huge headers, out-of-range numbers,
held connections, hostile images, clients that hang up or stop reading. A real server in a subprocess, raw
sockets and the official openai client; after each assault the server must still answer a real question."""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import selectors
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from conftest import LONG, long_answer
from test_server import ASSETS, STAR, ask, data_url, health, raw, wait_for

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
import make_images  # noqa: E402

sys.path.pop(0)

JSON = {"Content-Type": "application/json"}
SHAPES = ASSETS / "examples" / "shapes-1.png"
VOCAB = 408  # the demo bundle's vocabulary


@pytest.fixture(scope="module")
def default(serve):
    """The demo bundle with every default: what `edgevlm serve` ships with."""
    return serve()


@pytest.fixture(scope="module")
def capped(serve):
    """64 connections, 1 MB bodies (so 4 MB of bodies in flight at most)."""
    return serve("--max-connections", "64", "--max-body-bytes", "1000000")


@pytest.fixture(scope="module")
def impatient(serve):
    """Short header and request timeouts, so that their behaviour shows within a test."""
    return serve("--client-timeout", "1", "--timeout", "4")


def post(url: str, body: bytes | str, headers: dict | None = None):
    body = body.encode() if isinstance(body, str) else body
    return raw(url, "POST", "/v1/chat/completions", body, {**JSON, **(headers or {})})


def answers_blue(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="m", messages=ask(STAR, data_url(SHAPES)))
    assert r.choices[0].message.content == "blue"


def refused(data, *words: str) -> None:
    assert set(data["error"]) >= {"message", "type", "code"}, data
    assert all(w in data["error"]["message"] for w in words), (words, data)


def test_deep_json_is_a_400_before_parsing(default):
    before = health(default)
    deep = {"arrays": b"[" * 100_000 + b"]" * 100_000,
            "objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            "inside a field": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "never closed": b"[" * 1_000_000}
    for name, body in deep.items():
        status, _, data = post(default, body)
        print(f"{name} ({len(body)} bytes): {status} {data['error']['message']}")
        assert status == 400, name
        refused(data, "32 levels deep")
    ok = {"model": "m", "messages": ask('say "[{' * 20 + "\\" * 3), "max_tokens": 1}  # brackets in strings don't count
    status, _, data = post(default, json.dumps(ok))
    assert status == 200, data

    def nested(levels: int) -> str:  # a JSON Schema of arrays of arrays takes the body to `levels` deep
        schema = {"type": "integer"}
        for _ in range(levels - 4):  # the body, response_format, json_schema and the outermost schema: 4 levels
            schema = {"type": "array", "items": schema}
        fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
        return json.dumps({**ok, "messages": ask("hi"), "response_format": fmt})
    assert post(default, nested(32))[0] == 200
    assert post(default, nested(33))[0] == 400
    after = health(default)
    assert after["failed"] == before["failed"]


def test_media_type_is_parsed_exactly(default):
    body = json.dumps({"messages": ask("hi"), "max_tokens": 1})
    for bad in ("text/plain; x=application/json", "multipart/form-data; boundary=application/json",
                "application/x-www-form-urlencoded; a=application/json", "text/plain", "application/jsonx",
                "application/json-patch+json", "application/json, text/plain", "application/json; charset=latin-1",
                "application/json; charset=utf-8; x=1", "application/json;", ""):
        status, _, data = post(default, body, {"Content-Type": bad})
        assert status == 415, bad
        refused(data, "application/json")
    status, _, data = raw(default, "POST", "/v1/chat/completions", body.encode(), {})  # no Content-Type at all
    assert status == 415
    for good in ("application/json", "application/json; charset=utf-8", 'Application/JSON;charset="UTF-8"'):
        assert post(default, body, {"Content-Type": good})[0] == 200, good


def test_header_size_and_count_are_capped(default):
    status, _, data = raw(default, "GET", "/health", None, {"X-Big": "a" * 100_000})
    assert status == 431
    refused(data, "32768 bytes")
    status, _, data = raw(default, "GET", "/health", None, {f"X-H{i}": "1" for i in range(101)})
    assert status == 431
    assert raw(default, "GET", "/health", None, {"Cookie": "c=" + "a" * 20_000})[0] == 200  # big, within the cap
    # a head that never ends: cut off once past the cap, with the same answer
    u = urlparse(default)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: " + u.netloc.encode() + b"\r\n")
        try:
            for _ in range(100):
                s.sendall(b"X-More: " + b"a" * 1000 + b"\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        reply = read_until_closed(s)
    print("unfinished head:", reply[:60])
    assert reply.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in reply
    answers_blue(default)


NUMBERS = [  # (field, its value as JSON text)
    ("temperature", "1e-320"), ("temperature", "1e400"), ("temperature", "1" + "0" * 400), ("temperature", "-0.5"),
    ("temperature", "2.5"), ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", '"1"'),
    ("top_p", "0"), ("top_p", "1e-400"), ("top_p", "1.5"), ("top_p", "NaN"), ("top_p", "1" + "0" * 400),
    ("top_k", "1" + "0" * 400), ("top_k", "1" + "0" * 30), ("top_k", "-1"), ("top_k", str(VOCAB + 1)),
    ("top_k", "1.5"), ("max_tokens", "1" + "0" * 400), ("max_tokens", "1e400"), ("max_tokens", "0"),
    ("max_tokens", "1025"), ("max_tokens", "-Infinity"), ("max_completion_tokens", "1" + "0" * 30),
    ("seed", "1" + "0" * 30), ("seed", "-1"), ("seed", "1.5"), ("n", "1" + "0" * 400),
    ("logit_bias", '{"1%s": 1}' % ("0" * 30)), ("logit_bias", '{"%d": 1}' % VOCAB), ("logit_bias", '{"-1": 1}'),
    ("logit_bias", '{"1e3": 1}'), ("logit_bias", '{"1_0": 1}'), ("logit_bias", '{" 1": 1}'),
    ("logit_bias", '{"1": 101}'), ("logit_bias", '{"1": -1e400}'), ("logit_bias", '{"1": NaN}'),
    ("logit_bias", '{"1": "5"}'), ("logit_bias", "[1]"),
]


def test_out_of_range_numbers_are_a_400_naming_the_field(default):
    before = health(default)
    base = json.dumps({"model": "m", "messages": ask(STAR, data_url(SHAPES)), "max_tokens": 2})[:-1]
    for field, value in NUMBERS:
        status, _, data = post(default, base + f', "{field}": {value}}}')
        print(f"{field}={value[:24]}: {status} {data['error']['message'][:90]}")
        assert status == 400, (field, value)
        assert data["error"]["param"] == field and field in data["error"]["message"], (field, value, data)
    edges = {"temperature": 1e-6, "top_p": 1e-300, "top_k": VOCAB, "seed": 2**63 - 1, "max_tokens": 1024,
             "logit_bias": {str(VOCAB - 1): 100, "0": -100}}
    for field, value in edges.items():
        assert post(default, base + f', "{field}": {json.dumps(value)}}}')[0] == 200, field
    after = health(default)
    assert after["failed"] == before["failed"]  # every refusal came before the runtime
    answers_blue(default)


def hold(url: str, n: int) -> list[socket.socket]:
    """n connections that never finish a request: even ones send nothing, odd ones half a request head."""
    u = urlparse(url)
    socks = []
    for i in range(n):
        s = socket.create_connection((u.hostname, u.port), timeout=60)
        if i % 2:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + u.netloc.encode() + b"\r\nX-Slow: ")
        socks.append(s)
    return socks


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def closed_by_server(socks: list[socket.socket], at_least: int, ceiling: float = 120.0) -> dict:
    """Wait (at most `ceiling` s, a generous bound) until at least `at_least` of `socks` have been answered or
    closed by the server -> {socket: what it sent before closing}."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    done, end = {}, time.monotonic() + ceiling
    while len(done) < at_least and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            sel.unregister(key.fileobj)
            done[key.fileobj] = read_until_closed(key.fileobj)
    sel.close()
    return done


def test_held_connections_do_not_lock_clients_out(default):
    """200 connections held by one client (idle, or with half a head) with the shipped settings: a real client
    is still answered (uvicorn's limit_concurrency used to answer it 503 until they closed)."""
    socks = hold(default, 200)
    try:
        answers_blue(default)
        status, _, h = raw(default, "GET", "/health", None, {})
        assert status == 200 and h["status"] == "ok"
    finally:
        for s in socks:
            s.close()


def test_connection_cap_closes_the_longest_idle(capped):
    """Past --max-connections, each new connection closes one that waits for its client, so held sockets can
    never fill the server: with a cap of 64 and 200 held, the server closes at least 136 and still answers."""
    socks = hold(capped, 200)
    try:
        gone = closed_by_server(socks, 200 - 64)
        print(f"closed by the server: {len(gone)} of 200")
        assert len(gone) >= 200 - 64
        answers_blue(capped)
    finally:
        for s in socks:
            s.close()


def test_bodies_in_flight_are_capped_together(capped):
    """Each body is capped (1 MB here) and so is their sum while they are read or parsed (4 MB): four bodies held
    one byte short of complete fill it, a fifth gets 503; once they are gone the server answers again."""
    u = urlparse(capped)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000\r\n\r\n").encode()
    held = [socket.create_connection((u.hostname, u.port), timeout=60) for _ in range(4)]
    try:
        for s in held:
            s.sendall(head + b" " * 999_999)
        wait_for(lambda: health(capped)["body_bytes"] == 4 * 999_999, timeout=60)
        status, hdrs, data = post(capped, b" " * 999_999)
        assert status == 503 and data["error"]["code"] == "server_busy" and hdrs["retry-after"] == "1"
    finally:
        for s in held:
            s.close()
    wait_for(lambda: health(capped)["body_bytes"] == 0, timeout=60)
    answers_blue(capped)


def test_header_and_body_timeouts_close_held_connections(impatient):
    """With --client-timeout 1: idle connections are closed, half-sent heads get 408; a body that stops
    arriving gets 408 at the request's deadline (--timeout 4). Then a real request is answered."""
    socks = hold(impatient, 40)
    u = urlparse(impatient)
    slow = socket.create_connection((u.hostname, u.port), timeout=60)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + u.netloc.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": ")
    try:
        replies = closed_by_server(socks + [slow], len(socks) + 1)
        assert len(replies) == len(socks) + 1
        idle, half = socks[0::2], socks[1::2]
        assert all(replies[s] == b"" for s in idle)
        assert all(replies[s].startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in replies[s] for s in half)
        print("slow body:", replies[slow][:40], replies[slow].rsplit(b"\r\n", 1)[-1][:120])
        assert replies[slow].startswith(b"HTTP/1.1 408 ") and b"did not arrive in time" in replies[slow]
        answers_blue(impatient)
    finally:
        for s in socks + [slow]:
            s.close()


def animated_screen(frames: int, w: int, h: int) -> bytes:
    """The corpus's animation of 1x1 frames on a logical screen declared w x h."""
    data = bytearray(make_images.animated_gif(frames))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def hostile_images() -> dict[str, tuple[bytes, dict]]:
    """The corpus (tests/corpus/make_images.py) and a few more made here: name -> (bytes, expectation)."""
    cases = make_images.cases()
    rng = random.Random(23)
    cases.update({
        "bomb-20000x20000.png": (make_images.png_declaring(20000, 20000), {"error": "limit"}),
        "bomb-20000x20000-animated.gif": (animated_screen(3000, 20000, 20000), {"error": "limit"}),
        "animated-20000-frames.gif": (make_images.animated_gif(20000), {"ok": [8, 8]}),
        "random-bytes.png": (bytes(rng.randrange(256) for _ in range(4096)), {"error": "not an image"}),
        "png-signature-then-junk.png": (b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(512)),
                                        {"error": "not an image"}),
    })
    return cases


def test_hostile_images_get_4xx_and_the_server_answers_after(default):
    for name, (data, expect) in sorted(hostile_images().items()):
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        status, _, reply = post(default, json.dumps({"model": "m", "messages": ask(STAR, url), "max_tokens": 1}))
        message = reply["error"]["message"] if isinstance(reply, dict) and "error" in reply else ""
        print(f"{name} ({len(data)} bytes): {status} {message[:100]}")
        if "ok" in expect:  # valid images (odd modes, EXIF, an animation whose frames are never walked)
            assert status == 200, name
            continue
        assert 400 <= status < 500, name
        refused(reply)
        if expect["error"] == "limit":  # the real size from the header, e.g. bomb-65535x65535.png
            assert status == 413 and re.search(r"\d+x\d+", name)[0] + " pixels" in message, name
    assert default.proc.poll() is None
    answers_blue(default)


def test_every_disconnect_is_counted_as_cancelled(serve, long_bundle):
    """50 clients hang up mid-stream, after their first token (every other one with a TCP reset), and 10 as soon as
    their request is sent, all at once: /health counts every one as cancelled, none as failed or completed."""
    url = serve("--bundle", str(long_bundle), "--queue", "64", "--max-tokens", str(LONG))
    before = health(url)
    body = json.dumps({"model": "bundle", "messages": ask("go on"), "stream": True, **long_answer(long_bundle)})
    u = urlparse(url)
    tokens = []

    def mid_stream(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        while not (line := r.readline().decode()).startswith("data: ") or not json.loads(
                line[6:])["choices"][0]["delta"].get("content"):
            assert line, "the stream ended before its first token"
        tokens.append(i)
        if i % 2:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
        conn.close()

    def at_once(i: int) -> None:
        with socket.create_connection((u.hostname, u.port), timeout=120) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}".encode())

    threads = [threading.Thread(target=mid_stream, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=at_once, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(tokens) == 50
    wait_for(lambda: (h := health(url))["cancelled"] - before["cancelled"] >= 60 and h["running"] == h["waiting"] == 0,
             timeout=300)
    after = health(url)
    delta = {k: after[k] - before[k] for k in ("cancelled", "failed", "completed", "timed_out", "rejected")}
    print("counters after 60 disconnects:", delta)
    assert delta == {"cancelled": 60, "failed": 0, "completed": 0, "timed_out": 0, "rejected": 0}


def test_a_client_that_stops_reading_is_cut_off(serve, long_bundle):
    """A client that asks for a long streamed answer and reads none of it: once more than the server's buffers
    wait for it for --client-timeout, the connection is cut and the generation stops (counted as cancelled). The
    deadline is far off, so that however slow the machine, the buffers fill first."""
    url = serve("--bundle", str(long_bundle), "--max-tokens", str(LONG), "--client-timeout", "1", "--timeout", "900")
    before = health(url)
    u = urlparse(url)
    body = json.dumps({"model": "bundle", "messages": ask("go on"), "stream": True, **long_answer(long_bundle)})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's side fills up first
    s.connect((u.hostname, u.port))
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    wait_for(lambda: health(url)["cancelled"] > before["cancelled"], timeout=900)
    s.settimeout(60)
    got = b""
    try:
        while chunk := s.recv(1 << 20):
            got += chunk
    except ConnectionResetError:
        pass
    s.close()
    after = health(url)
    print(f"cut off after {got.count(b'data: ')} events ({len(got)} bytes) had been buffered; health {after}")
    assert b"[DONE]" not in got and after["running"] == 0
    assert after["completed"] == before["completed"] and after["timed_out"] == before["timed_out"]
