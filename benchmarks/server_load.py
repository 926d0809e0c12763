"""Bounded load test of `edgevlm serve` on loopback: N requests at concurrency C, then an overload burst.

    python benchmarks/server_load.py [--n 2000] [--concurrency 8] [--time-limit 600] [--out benchmarks/results/server_load]

Starts `edgevlm serve --port 0` on the demo bundle (127.0.0.1 only), sends image questions from the held-out
shapes split (24 distinct pictures, so the shared image cache both hits and misses; every other request streams)
over keep-alive connections, samples the server's RSS every 0.5 s, then sends a burst at 4x the queue to show
429s instead of failures. Stops by itself at --time-limit. Writes JSON + PNG + a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests(n_images: int):
    from edgevlm.data.shapes import examples, normalize_answer

    out = []
    for ex in examples(seed=2_000_003, n=n_images):
        buf = io.BytesIO()
        ex.image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append((url, ex.question, normalize_answer(ex.answer)))
    return out


def one(conn: http.client.HTTPConnection, item, stream: bool) -> tuple[int, float, float | None, str]:
    """-> (status, seconds, server TTFT or None, answer text)."""
    url, question, _ = item
    body = json.dumps({"model": "shapes-fastvlm", "stream": stream, "max_tokens": 24, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]})
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read().decode()
    dt = time.perf_counter() - t
    if r.status != 200:
        return r.status, dt, None, ""
    if not stream:
        d = json.loads(data)
        return 200, dt, d["edgevlm"]["ttft_s"], d["choices"][0]["message"]["content"]
    text, ttft = [], None
    for line in data.split("\n\n"):
        if line.startswith("data: {"):
            d = json.loads(line[6:])
            if "error" in d:
                return 599, dt, None, ""  # an error event inside a 200 stream
            if d.get("choices"):
                text.append(d["choices"][0]["delta"].get("content") or "")
            if ttft is None and "edgevlm" in d:
                ttft = d["edgevlm"]["ttft_s"]
    return 200, dt, ttft, "".join(text)


def phase(host, port, items, n, concurrency, stop_at, results, offset=0):
    lock, counter = threading.Lock(), iter(range(n))

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            item = items[(i + offset) % len(items)]
            try:
                status, dt, ttft, text = one(conn, item, stream=i % 2 == 1)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                status, dt, ttft, text = -1, 0.0, None, ""
            with lock:
                results.append({"i": i, "t": time.monotonic(), "status": status, "s": dt, "ttft_s": ttft,
                                "correct": text.strip().lower() == item[2]})
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=200, help="requests before the RSS baseline is taken")
    ap.add_argument("--burst", type=int, default=400, help="requests of the overload burst (0: none)")
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--out", default="benchmarks/results/server_load")
    args = ap.parse_args(argv)
    start = time.monotonic()
    stop_at = start + args.time_limit
    items = requests(24)
    server = subprocess.Popen([sys.executable, "-m", "edgevlm.apps.cli", "serve", "--port", "0", "--queue",
                               str(args.queue)], stdout=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://(127\.0\.0\.1):(\d+)/", server.stdout.readline())
        host, port = m.group(1), int(m.group(2))
        rss, sampling = [], threading.Event()

        def sample():
            while not sampling.wait(0.5):
                rss.append((time.monotonic() - start, rss_mb(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rss_start = rss_mb(server.pid)
        warm: list = []
        phase(host, port, items, args.warmup, args.concurrency, stop_at, warm)
        rss_warm = rss_mb(server.pid)
        t0 = time.monotonic()
        main_results: list = []
        phase(host, port, items, args.n, args.concurrency, stop_at, main_results, offset=args.warmup)
        wall = time.monotonic() - t0
        rss_end = rss_mb(server.pid)
        burst: list = []
        if args.burst:
            phase(host, port, items, args.burst, args.queue * 4, stop_at, burst)
        sampling.set()
        health = json.loads(_get(host, port, "/health"))
    finally:
        server.terminate()
        server.wait(30)

    ok = [r for r in main_results if r["status"] == 200]
    lat = sorted(r["s"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")

    report = {
        "requests": len(main_results), "asked": args.n, "concurrency": args.concurrency,
        "statuses": dict(Counter(str(r["status"]) for r in main_results)),
        "server_errors": sum(1 for r in main_results if r["status"] >= 500 or r["status"] < 0),
        "accuracy": sum(r["correct"] for r in ok) / max(len(ok), 1),
        "wall_s": round(wall, 2), "req_per_s": round(len(main_results) / wall, 2),
        "latency_ms": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99), "max": pct(lat, 1.0)},
        "ttft_ms": {"p50": pct(ttft, 0.5), "p95": pct(ttft, 0.95)},
        "rss_mb": {"start": round(rss_start, 1), "after_warmup": round(rss_warm, 1), "end": round(rss_end, 1),
                   "growth_after_warmup": round(rss_end - rss_warm, 1), "max": round(max(v for _, v in rss), 1)},
        "burst": {"requests": len(burst), "concurrency": args.queue * 4, "queue": args.queue,
                  "statuses": dict(Counter(str(r["status"]) for r in burst)),
                  "server_errors": sum(1 for r in burst if r["status"] >= 500 or r["status"] < 0)},
        "server_counters": health, "warmup": args.warmup, "time_limit_s": args.time_limit,
        "setup": "demo bundle (embedded, fp32 ONNX), edgevlm serve defaults (1 worker, queue 16), loopback, "
                 "24 distinct held-out pictures, every other request streamed, max_tokens 24",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**report, "rss_series": rss}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot(rss, main_results, start, out.with_suffix(".png"))
    print(markdown(report))
    return 0 if report["server_errors"] == 0 and report["burst"]["server_errors"] == 0 else 1


def _get(host, port, path) -> str:
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", path)
    body = c.getresponse().read().decode()
    c.close()
    return body


def _caches(r: dict) -> str:
    c = r["server_counters"].get("caches", {})
    return (f"{c.get('image_entries')} images ({c.get('image_ram_bytes', 0) / 2**20:.2f} MB) and "
            f"{c.get('prefix_entries')} prefix KV entries ({c.get('prefix_ram_bytes', 0) / 2**20:.2f} MB), both "
            "LRUs bounded in bytes")


def markdown(r: dict) -> str:
    lat, rss, b = r["latency_ms"], r["rss_mb"], r["burst"]
    return (
        f"# `edgevlm serve` load test (loopback)\n\n{r['setup']}.\n\n"
        "| requests | concurrency | statuses | server errors | req/s | latency p50 / p95 / p99 ms | TTFT p50 / p95 ms "
        "| accuracy | RSS after warm-up → end (MB) | RSS growth |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['requests']} | {r['concurrency']} | {r['statuses']} | **{r['server_errors']}** | {r['req_per_s']} "
        f"| {lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | {r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p95']:.1f} "
        f"| {r['accuracy']:.3f} | {rss['after_warmup']} → {rss['end']} | **{rss['growth_after_warmup']:+.1f} MB** |\n\n"
        f"Overload burst: {b['requests']} requests at concurrency {b['concurrency']} against a queue of {b['queue']}: "
        f"statuses {b['statuses']}, server errors **{b['server_errors']}** (the excess is refused with 429).\n\n"
        f"RSS before any request {rss['start']} MB, after {r['warmup']} warm-up requests {rss['after_warmup']} MB, "
        f"max {rss['max']} MB; at the end the server's caches held {_caches(r)}. Wall time of the main run {r['wall_s']} s on 2 cores shared with other jobs. Latency "
        f"includes the wait in the queue ({r['concurrency']} clients share 1 worker); TTFT is the runtime's own figure "
        "(from the start of generation), accuracy is exact match on the held-out questions.\n")


def plot(rss, results, start, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.plot([t for t, _ in rss], [v for _, v in rss])
    a.set_xlabel("seconds since start")
    a.set_ylabel("server RSS (MB)")
    a.set_title("server memory during the run")
    lat = [r["s"] * 1000 for r in results if r["status"] == 200]
    b.hist(lat, bins=50)
    b.set_xlabel("request latency (ms), concurrency 8")
    b.set_ylabel("requests")
    b.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
