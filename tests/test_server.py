"""`edgevlm serve` in a subprocess on a free loopback port, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
from PIL import Image
from tokenizers import Tokenizer

import edgevlm
from conftest import LONG, long_answer

ASSETS = Path(edgevlm.__file__).parent / "assets"
STAR = "What color is the star?"
KEY = "test-key-1234"


def data_url(img: Image.Image | Path, fmt: str = "PNG") -> str:
    if isinstance(img, Path):
        return "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(question: str, image: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One HTTP request with exactly these headers (Host included) -> (status, headers, parsed JSON or bytes)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    hdrs = {"Host": u.netloc, **(headers or {})}
    if body is not None and "Transfer-Encoding" in hdrs:
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                        for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    elif body is not None:
        hdrs.setdefault("Content-Length", str(len(body)))
    for k, v in hdrs.items():
        conn.putheader(k, v)
    conn.endheaders()
    try:
        if body:
            conn.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (413) without reading the whole body
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def health(url: str) -> dict:
    return raw(url, "GET", "/health")[2]


@pytest.fixture(scope="module")
def demo(serve):
    """The demo bundle, with an API key and small caps for the security cases."""
    return serve("--api-key", KEY, "--max-image-pixels", "1000000", "--max-body-bytes", "2000000",
                 "--max-images", "2", "--max-tokens", "64", "--allow-origin", "http://localhost:3000")


@pytest.fixture(scope="module")
def client(demo):
    return openai.OpenAI(base_url=demo + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def slow(serve, long_bundle):
    """Long answers (longer than any deadline) with 1 worker, a queue of 1 and a 3 s deadline."""
    return serve("--bundle", str(long_bundle), "--parallel", "1", "--queue", "1",
                 "--timeout", "3", "--max-tokens", str(LONG))


def test_openai_client_image_question(client):
    image = data_url(ASSETS / "examples" / "shapes-1.png")
    r = client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image))
    print("answer:", repr(r.choices[0].message.content), "stats:", r.model_extra["edgevlm"])
    assert r.choices[0].message.content == "blue" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 16 and r.usage.completion_tokens >= 1
    again = client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image))
    assert again.choices[0].message.content == "blue"
    assert again.model_extra["edgevlm"]["image_cache_hits"] == 1  # shared across requests: encoded once
    assert "encode" not in again.model_extra["edgevlm"]["stages"]


def test_openai_client_streaming(client):
    image = data_url(ASSETS / "examples" / "shapes-1.png")
    chunks = list(client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image), stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "blue"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    firsts = [c.model_extra["edgevlm"] for c in chunks if c.model_extra.get("edgevlm")]
    assert firsts and firsts[0]["ttft_s"] > 0 and "prefill" in firsts[0]["stages"]


def test_history_matches_an_in_process_chat(client):
    """A request carrying earlier turns answers what a Chat with those turns answers."""
    image_path = ASSETS / "examples" / "shapes-2.png"
    chat = edgevlm.load().chat()
    first = chat.send(STAR, image=str(image_path))
    expected = chat.send("How many objects are there?")
    messages = ask(STAR, data_url(image_path)) + [{"role": "assistant", "content": first},
                                                  {"role": "user", "content": "How many objects are there?"}]
    r = client.chat.completions.create(model="shapes-fastvlm", messages=messages)
    print("history turn:", repr(first), "->", repr(expected))
    assert r.choices[0].message.content == expected


def test_sampling_parameters(client):
    image = data_url(ASSETS / "examples" / "shapes-1.png")
    cut = client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image), stop=["ue"])
    assert cut.choices[0].message.content == "bl" and cut.choices[0].finish_reason == "stop"
    kw = dict(model="shapes-fastvlm", messages=ask("Describe the image.", image), temperature=1.5, top_p=0.9, seed=7,
              max_tokens=12)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b  # seeded
    one = client.chat.completions.create(model="shapes-fastvlm", messages=ask("Describe the image.", image),
                                         max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    blue = Tokenizer.from_file(str(ASSETS / "shapes-fastvlm" / "tokenizer.json")).encode("blue").ids[0]
    banned = client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image),
                                            logit_bias={str(blue): -100}, max_tokens=4)
    print("with 'blue' banned:", repr(banned.choices[0].message.content))
    assert not banned.choices[0].message.content.startswith("blue")
    for bad in ({"1000000": -100}, {"x": 1}, {"3": 101}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="shapes-fastvlm", messages=ask(STAR, image), logit_bias=bad)


def test_models_and_health(client, demo):
    assert [m.id for m in client.models.list().data] == ["shapes-fastvlm"]
    other = client.chat.completions.create(model="gpt-4o-mini", messages=ask("hi"), max_tokens=2)
    assert other.model == "shapes-fastvlm"  # one model per server: any name is answered by it, and named
    wait_for(lambda: health(demo)["running"] == 0)  # the worker thread hands its slot back just after the reply
    h = health(demo)
    assert h["status"] == "ok" and h["auth"] is True and h["model"] == "shapes-fastvlm"
    assert h["caches"]["image_entries"] >= 1 and h["caches"]["prefix_entries"] >= 1  # shared by every request


def test_security_refusals(demo):
    failed_before = health(demo)["failed"]
    ok_body = json.dumps({"model": "shapes-fastvlm", "messages": ask("hi")}).encode()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = Image.new("RGB", (1200, 1000), (200, 30, 30))  # 1.2 MP > the 1 MP cap, 4 KB as PNG
    cases = {
        "foreign host": (403, "GET", "/health", None, {"Host": "evil.example"}),
        "foreign host with port": (403, "POST", "/v1/chat/completions", ok_body, {**auth, "Host": "evil.example:80"}),
        "rebinding to a loopback-looking name": (403, "GET", "/", None, {"Host": "127.0.0.1.evil.example"}),
        "oversize body": (413, "POST", "/v1/chat/completions", b"x" * 2_000_001, auth),
        "oversize chunked body": (413, "POST", "/v1/chat/completions", b"x" * 2_000_001,
                                  {**auth, "Transfer-Encoding": "chunked"}),
        "too many pixels": (413, "POST", "/v1/chat/completions", json.dumps(
            {"model": "shapes-fastvlm", "messages": ask("hi", data_url(big))}).encode(), auth),
        "bad API key": (401, "POST", "/v1/chat/completions", ok_body, {**auth, "Authorization": "Bearer nope"}),
        "no API key": (401, "GET", "/v1/models", None, {}),
        "malformed JSON": (400, "POST", "/v1/chat/completions", b'{"model": "shapes-fastvlm", "messages": [', auth),
        "not JSON content type": (415, "POST", "/v1/chat/completions", ok_body, {**auth, "Content-Type": "text/plain"}),
        "foreign origin": (403, "POST", "/v1/chat/completions", ok_body, {**auth, "Origin": "http://evil.example"}),
        "remote image URL": (400, "POST", "/v1/chat/completions", json.dumps(
            {"messages": ask("hi", "http://127.0.0.1:1/x.png")}).encode(), auth),
        "too many images": (400, "POST", "/v1/chat/completions", json.dumps(
            {"messages": ask("a", data_url(big.resize((8, 8)))) * 3}).encode(), auth),
        "max_tokens over the cap": (400, "POST", "/v1/chat/completions", json.dumps(
            {"messages": ask("hi"), "max_tokens": 65}).encode(), auth),
        "model not a string": (400, "POST", "/v1/chat/completions", json.dumps(
            {"model": 4, "messages": ask("hi")}).encode(), auth),
        "not an image": (400, "POST", "/v1/chat/completions", json.dumps(
            {"messages": ask("hi", "data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode())}).encode(),
            auth),
        "unknown path": (404, "GET", "/etc/passwd", None, {}),
        "wrong method": (405, "DELETE", "/v1/models", None, auth),
    }
    for name, (status, method, path, body, headers) in cases.items():
        got, hdrs, data = raw(demo, method, path, body, headers)
        print(f"{name}: {got} {data}")
        assert got == status, name
        assert set(data["error"]) >= {"message", "type", "code"}, name
        text = json.dumps(data)
        assert "Traceback" not in text and str(Path(__file__).parent.parent) not in text and "site-packages" not in text
        assert hdrs["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in hdrs
    assert health(demo)["failed"] == failed_before  # every refusal came before the runtime


def test_runtime_refusal_is_a_400(client, demo):
    """An error the runtime raises (here: a prompt longer than the context) is a 400 with OpenAI's code."""
    before = health(demo)["failed"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="shapes-fastvlm", messages=ask("star " * 600))
    print("overflow:", e.value.body)
    assert e.value.body["code"] == "context_length_exceeded" and "context" in e.value.body["message"]
    assert health(demo)["failed"] == before + 1


def test_host_names():
    from edgevlm.apps.guard import host_name, is_loopback

    assert [host_name(h) for h in ("127.0.0.1:8080", "[::1]:80", "LocalHost.", "a:b", "[::1]x", "")] == [
        "127.0.0.1", "::1", "localhost", None, None, None]
    assert all(map(is_loopback, ("localhost", "127.0.0.2", "::1", "app.localhost")))
    assert not any(map(is_loopback, ("evil.example", "10.0.0.1", "0.0.0.0", "localhost.evil.example", "::")))


def test_cors_only_for_allowed_origins(demo):
    pre = raw(demo, "OPTIONS", "/v1/chat/completions", None, {
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert pre[0] == 204 and pre[1]["access-control-allow-origin"] == "http://localhost:3000"
    assert raw(demo, "OPTIONS", "/v1/chat/completions", None, {"Origin": "http://localhost:4000"})[0] == 403
    got = raw(demo, "GET", "/v1/models", None, {"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
    assert got[0] == 200 and got[1]["access-control-allow-origin"] == "http://localhost:3000"
    same = raw(demo, "GET", "/", None, {"Origin": demo})  # the page itself is same-origin: no CORS headers needed
    assert same[0] == 200 and "access-control-allow-origin" not in same[1]
    assert "default-src 'none'" in same[1]["content-security-policy"]


def test_queue_limit_deadline_and_429(slow, long_bundle):
    """1 running + 1 waiting fill the server: the next request gets 429 at once. The running one is stopped at its
    deadline mid-stream; the waiting one then runs into its own deadline (in the queue: 503, or mid-stream)."""
    client = openai.OpenAI(base_url=slow + "/v1", api_key="x", max_retries=0, timeout=30)
    before = health(slow)
    results = {}

    def run(name, **kw):
        try:
            stream = client.chat.completions.create(model="bundle", messages=ask("go on"), stream=True,
                                                    **long_answer(long_bundle), **kw)
            results[name] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except openai.APIError as e:
            results[name] = e

    running = threading.Thread(target=run, args=("running",))
    running.start()
    wait_for(lambda: health(slow)["running"] == 1)
    waiting = threading.Thread(target=run, args=("waiting",))
    waiting.start()
    wait_for(lambda: health(slow)["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="bundle", messages=ask("hi"), max_tokens=4)
    assert e.value.status_code == 429
    busy = health(slow)  # refused at once, not after waiting for a slot: both others are still where they were
    assert busy["running"] == 1 and busy["waiting"] == 1, busy
    running.join(60)
    waiting.join(60)
    print("results:", results)
    assert isinstance(results["running"], openai.APIError) and "deadline" in str(results["running"])
    waited = results["waiting"]
    assert isinstance(waited, openai.APIError) and ("deadline" in str(waited) or waited.status_code == 503)
    wait_for(lambda: health(slow)["running"] == 0)
    after = health(slow)
    assert after["rejected"] - before["rejected"] == 1 and after["timed_out"] - before["timed_out"] == 2
    assert after["running"] == 0 and after["waiting"] == 0


def test_client_disconnect_stops_generation(slow, long_bundle):
    before = health(slow)
    body = json.dumps({"model": "bundle", "messages": ask("go on"), "stream": True, **long_answer(long_bundle)})
    u = urlparse(slow)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    while True:
        line = r.readline().decode()
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break  # a token arrived: hang up
    conn.sock.close()
    conn.close()
    t = time.monotonic()
    wait_for(lambda: health(slow)["cancelled"] > before["cancelled"])
    after = health(slow)
    print(f"generation stopped {time.monotonic() - t:.3f} s after the client left; health {after}")
    assert after["timed_out"] == before["timed_out"] and after["completed"] == before["completed"]
    assert after["running"] == 0


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_shutdown_stops_running_generation(serve, long_bundle):
    """Ctrl-C (SIGINT) while a long answer streams: the server stops its generation and exits promptly."""
    url = serve("--bundle", str(long_bundle), "--max-tokens", str(LONG))
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": ask("go on"), "stream": True,
                                                              **long_answer(long_bundle)}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    t = time.monotonic()
    url.proc.send_signal(signal.SIGINT)
    rest = r.read().decode()  # the stream ends early with an error event, not a silently cut answer
    assert '"code": "shutting_down"' in rest and "[DONE]" not in rest
    code = url.proc.wait(60)
    took = time.monotonic() - t
    tokens = 1 + sum(1 for line in rest.splitlines() if '"content"' in line)
    print(f"exited with {code} {took:.2f} s after SIGINT, {tokens} of {LONG} tokens streamed")
    assert code == 130 and tokens < LONG  # stopped mid-answer: it did not run the answer to its end
    conn.close()


def test_a_continued_conversation_prefills_only_the_new_message(client):
    """After a reply the server prefills the turn separator and user header and caches them: the request that
    continues the conversation prefills as few positions as an in-process chat after chat.prepare()."""
    image_path = ASSETS / "examples" / "shapes-1.png"
    question, follow_up = "What shape is the red object?", "And what color is the circle?"
    chat = edgevlm.load().chat()
    first = chat.send(question, image=str(image_path), max_tokens=8)
    ran = chat.prepare()
    want = next(iter(chat.stream(follow_up, max_tokens=8)))
    one = client.chat.completions.create(model="shapes-fastvlm", messages=ask(question, data_url(image_path)),
                                         max_tokens=8)
    assert one.choices[0].message.content == first
    messages = ask(question, data_url(image_path)) + [{"role": "assistant", "content": first},
                                                      {"role": "user", "content": follow_up}]
    two = client.chat.completions.create(model="shapes-fastvlm", messages=messages, max_tokens=8)
    got = two.model_extra["edgevlm"]
    print(f"continued request: prefilled {got['prefilled_tokens']} of {got['prompt_tokens']} "
          f"(in-process after prepare(): {want.prefilled_tokens}; prepare ran {ran})")
    assert ran > 0 and got["prompt_tokens"] == want.prompt_tokens
    assert got["prefilled_tokens"] == want.prefilled_tokens and got["prefix_cache_source"] == "ram"


def test_a_data_url_of_something_else_says_what_it_holds(client):
    """A text file picked in a browser arrives as data:text/plain: the reply names that, not "fetches nothing"."""
    for url, says in [("data:text/plain;base64,aGVsbG8=", "the data: URL holds text/plain, not an image"),
                      ("data:image/png,abc", "an image's data: URL must be base64"),
                      ("https://example.com/x.png", "images must be data: URLs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="shapes-fastvlm", messages=ask("hi", url))
        print(e.value.body["message"])
        assert says in e.value.body["message"] and e.value.body["code"] == "invalid_image_url"


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_one_line(port):
    p = subprocess.run([sys.executable, "-m", "edgevlm.apps.cli", "serve", "--port", port], capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == f"error: --port must be between 0 and 65535 (0 picks a free one), not {port}\n"
