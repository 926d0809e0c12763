"""Caches: image cache and prefix KV cache (RAM LRU + disk tier), forged and torn entries, byte bounds,
an unusable cache directory, and a writer killed with SIGKILL many times.

Uses the embedded demo bundles (no export needed: each test takes about a second)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm import diskcache
from edgevlm.cache import LRU, keys_digest
from edgevlm.diskcache import DiskStore, encode_entry
from edgevlm.model import DEFAULT_BUNDLE
from edgevlm.decoders import common_prefix

IMAGE = str(Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png")
OTHER = str(Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-2.png")
Q1, Q2 = "What color is the star?", "How many objects are there?"


@pytest.fixture(scope="module")
def vlm():
    return edgevlm.load()


@pytest.fixture
def fresh(vlm, tmp_path):
    """fresh(cache_dir=None, **bounds) -> the module's VLM with new, empty caches (as a new process has)."""
    saved = vlm.caches

    def make(cache_dir=None, **bounds):
        vlm.caches = vlm.new_caches(cache_dir, **bounds)
        return vlm

    yield make
    vlm.caches = saved


def ask(vlm, question, image=IMAGE, n=6):
    return list(vlm.stream(image, question, max_tokens=n))


def reference(vlm, question, image=IMAGE, n=6) -> list[int]:
    """Tokens with every cache empty."""
    saved, vlm.caches = vlm.caches, vlm.new_caches()
    try:
        return [r.token for r in ask(vlm, question, image, n)]
    finally:
        vlm.caches = saved


def shared_prefix(vlm, a: str, b: str) -> int:
    ids = [vlm.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], None, 1)
           for q in (a, b)]
    return common_prefix(ids[0].tolist(), ids[1].tolist())


def test_same_image_new_question_prefills_only_the_suffix(fresh):
    vlm = fresh()
    cold = ask(vlm, Q1)[-1]
    assert not cold.warm and cold.prefilled_tokens == cold.prompt_tokens and "encode" in cold.stages
    warm = ask(vlm, Q2)
    r, shared = warm[-1], shared_prefix(vlm, Q1, Q2)
    print(f"prompt {r.prompt_tokens} tokens, shared prefix {shared}, prefilled {r.prefilled_tokens}")
    assert shared > vlm.manifest.image_tokens  # the image is inside the shared part
    assert r.prefix_cache_source == "ram" and r.prefix_cache_hit_tokens == shared
    assert r.prefilled_tokens == r.prompt_tokens - shared
    assert r.image_cache_source == "ram" and "encode" not in r.stages and r.warm
    assert [x.token for x in warm] == reference(vlm, Q2)
    again = ask(vlm, Q1)[-1]  # the same question again: only the last prompt position runs
    assert again.prefilled_tokens == 1 and [x.token for x in ask(vlm, Q1)] == reference(vlm, Q1)


def test_profile_has_every_stage_and_the_cache_figures(fresh):
    vlm = fresh()
    r = ask(vlm, Q1)[-1]
    p = r.profile
    for s in edgevlm.profile.STAGES:
        assert isinstance(p[f"{s}_s"], float)
    assert p["encode_s"] > 0 and p["prefill_s"] > 0 and p["compress_s"] == 0.0 and p["backend"] == "onnx"
    assert p["peak_rss_bytes"] > 10 << 20 and p["cache_image_entries"] == 1 and p["warm"] is False
    json.dumps(p)  # JSON-ready


def test_prepare_pre_encodes_and_prefusion_image_work_is_cached(fresh, tmp_path):
    vlm = fresh()
    key = vlm.prepare(OTHER)
    r = ask(vlm, Q1, OTHER)[-1]
    assert r.image_cache_source == "ram" and r.image_cache_hits == 1 and "encode" not in r.stages
    assert len(key) == 64
    mini = edgevlm.load(DEFAULT_BUNDLE.parent / "shapes-fastvlm-mini", cache_dir=tmp_path)
    cold = ask(mini, Q1)
    assert {"encode", "compress", "prefusion"} <= set(cold[-1].stages)
    mini.caches = mini.new_caches(tmp_path)  # a new process: RAM empty, the disk tier shared
    warm = ask(mini, Q1)
    assert warm[-1].image_cache_source == "disk" and warm[-1].prefix_cache_source == "disk"
    assert not {"encode", "compress"} & set(warm[-1].stages) and warm[-1].prefilled_tokens == 1
    assert [r.token for r in warm] == [r.token for r in cold]
    other = ask(mini, Q2)[-1]  # new question: its text is re-fused after the cached image prefix
    assert other.prefix_cache_hit_tokens > 0 and other.prefilled_tokens < other.prompt_tokens
    assert [r.token for r in ask(mini, Q2)] == reference(mini, Q2)


def test_a_fresh_process_shares_the_disk_cache(vlm, tmp_path):
    code = ("import json, sys, edgevlm\n"
            "vlm = edgevlm.load(cache_dir=sys.argv[1])\n"
            "rs = list(vlm.stream(sys.argv[2], sys.argv[3], max_tokens=6))\n"
            "print(json.dumps({'tokens': [r.token for r in rs], **rs[-1].profile}))\n")

    def run(question):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path), IMAGE, question], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    cold, warm = run(Q1), run(Q2)
    print(f"cold TTFT {cold['ttft_s'] * 1e3:.1f} ms, fresh process warm {warm['ttft_s'] * 1e3:.1f} ms")
    assert cold["prefix_cache_source"] == "" and cold["image_cache_source"] == ""
    assert warm["image_cache_source"] == "disk" and warm["prefix_cache_source"] == "disk"
    assert warm["prefilled_tokens"] == warm["prompt_tokens"] - shared_prefix(vlm, Q1, Q2)
    assert warm["tokens"] == reference(vlm, Q2) and warm["encode_s"] == 0.0


def _entries(root: Path, prefix: str) -> list[Path]:
    return sorted(p for p in root.rglob(prefix + "*" + diskcache.SUFFIX))


def _resign(body: bytes) -> bytes:
    import hashlib

    return body + hashlib.sha256(body).digest()


def _forgeries(vlm, path: Path) -> dict[str, bytes]:
    """Ways to forge or damage one entry file that keep its name."""
    blob = path.read_bytes()
    name = path.name[:-len(diskcache.SUFFIX)]
    kind = "image" if name.startswith("img-") else "prefix"
    meta, arrays = diskcache.decode_entry(blob, vlm.bundle.sha256, kind, name)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    moved = {k: np.roll(a, 1, axis=-1) for k, a in arrays.items()}
    out = {
        "garbage": os.urandom(len(blob)),
        "truncated (torn)": blob[: len(blob) * 2 // 3],
        "one byte flipped": bytes(flipped),
        "foreign bundle sha": encode_entry("f" * 64, kind, name, meta, arrays),
        "stale format": _resign(blob[:-32].replace(b'"format":1', b'"format":0', 1)),
        "arrays of another shape": encode_entry(vlm.bundle.sha256, kind, name, meta,
                                                {k: a[..., :-1] for k, a in arrays.items()}),
    }
    if kind == "prefix":  # a consistent entry whose keys are not the ones its name stands for
        keys = list(meta["keys"])
        keys[-1] = keys[-1] + 1 if isinstance(keys[-1], int) else keys[-1]
        out["keys not matching the name"] = encode_entry(vlm.bundle.sha256, kind, name, {"keys": keys}, moved)
    return out


def test_forged_torn_foreign_and_stale_entries_are_never_served(fresh, tmp_path, caplog):
    vlm = fresh(tmp_path)
    ask(vlm, Q1)
    want = reference(vlm, Q2)
    (img,), (kv,) = _entries(tmp_path, "img-"), _entries(tmp_path, "kv-")
    for target in (kv, img):
        for how, blob in _forgeries(vlm, target).items():
            target.write_bytes(blob)
            vlm = fresh(tmp_path)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="edgevlm"):
                r = ask(vlm, Q2)
            served = r[-1].image_cache_source if target.name.startswith("img-") else r[-1].prefix_cache_source
            print(f"{target.name[:6]} {how}: source {served!r}, rejected {vlm.caches.disk.rejected}")
            assert served != "disk", how
            assert vlm.caches.disk.rejected == 1 and "not served" in caplog.text, how
            assert [x.token for x in r] == want, how
            # restore a valid entry for the next forgery
            vlm.caches.clear(disk=True)
            vlm = fresh(tmp_path)
            ask(vlm, Q1)
            (img,), (kv,) = _entries(tmp_path, "img-"), _entries(tmp_path, "kv-")
            target = img if target.name.startswith("img-") else kv


def test_lru_bounds_are_respected(fresh, tmp_path):
    lru = LRU(100)
    for i in range(5):
        lru.put(i, np.zeros(10, np.float32))  # 40 bytes each
    assert lru.bytes == 80 and list(k for k, _ in lru.items()) == [3, 4]
    lru.get(3)
    lru.put(5, np.zeros(10, np.float32))
    assert [k for k, _ in lru.items()] == [3, 5]  # 4 was the least recently used
    assert not lru.put(6, np.zeros(100, np.float32)) and 6 not in lru and lru.bytes <= 100
    first = fresh()
    ask(first, Q1, n=3)
    one = first.caches.stats()  # one image entry and one prompt-prefix entry, sized by the model
    assert one["image_entries"] == 1 and one["prefix_entries"] == 1
    prefix_bound = int(2.5 * one["prefix_ram_bytes"])  # room for two prompts of this length, not three
    vlm = fresh(tmp_path, image_bytes=2 * one["image_ram_bytes"], prefix_bytes=prefix_bound, disk_bytes=200_000)
    from conftest import scene

    for k in range(6):
        ask(vlm, Q1, np.asarray(scene(k)), n=3)
        s = vlm.caches.stats()
        assert s["image_ram_bytes"] <= 2 * one["image_ram_bytes"] and s["prefix_ram_bytes"] <= prefix_bound
        assert s["disk_bytes"] <= 200_000
    assert s["image_entries"] == 2 and s["prefix_entries"] == 2 and s["disk_writes"] >= 6


def test_an_unusable_cache_dir_warns_once_and_answers_still_come(fresh, tmp_path, caplog, monkeypatch):
    want = reference(fresh(), Q1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="edgevlm"):
        vlm = fresh(blocker / "cache")  # cannot be created
        got = [[r.token for r in ask(vlm, Q1)] for _ in range(3)]
    assert got == [want] * 3 and not vlm.caches.disk.enabled
    assert caplog.text.count("disk cache") == 1
    caplog.clear()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger="edgevlm"):
        vlm = fresh(tmp_path / "full")
        got = [[r.token for r in ask(vlm, q)] for q in (Q1, Q2, Q1)]
    assert got[0] == want and got[2] == want and "No space left" in vlm.caches.disk.disabled
    assert caplog.text.count("disk cache") == 1
    assert vlm.caches.stats()["disk_enabled"] == 0 and ask(vlm, Q2)[-1].prefix_cache_source == "ram"


# ---- crash safety: a writer killed with SIGKILL at random points ----------------------------------------

BUNDLE = "ab" * 32


def _content(k: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * (k + 1) % 251).astype(np.uint8)


def _writer(root: Path, seed: int, atomic: bool) -> None:  # runs in the child, forever, until killed
    store, rng = DiskStore(root, BUNDLE), np.random.default_rng(seed)
    while True:
        k, n = int(rng.integers(0, 24)), int(rng.integers(1, 48)) << 14
        name, meta = f"kv-{k:032x}", {"k": k, "n": n}
        if atomic:
            store.put("prefix", name, meta, {"a": _content(k, n)})
        else:  # no temp file, no rename: what a careless writer or a power cut leaves, chunk by chunk
            blob = encode_entry(BUNDLE, "prefix", name, meta, {"a": _content(k, n)})
            with open(store.path(name), "wb") as f:
                for a in range(0, len(blob), 1 << 16):
                    f.write(blob[a:a + (1 << 16)])
                    f.flush()
                    time.sleep(0.0005)


def test_sigkilled_writers_never_get_a_torn_entry_served(tmp_path):
    root, rng = tmp_path / "cache", np.random.default_rng(0)
    t0, kills, served, rejected, temps = time.monotonic(), 0, 0, 0, set()
    for i in range(30):
        atomic = i % 2 == 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process: the child only writes
            pid = os.fork()
        if pid == 0:
            try:
                _writer(root, i, atomic)
            finally:
                os._exit(0)
        time.sleep(float(rng.uniform(0.02, 0.15)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        temps |= {p.name for p in root.iterdir() if ".partial-" in p.name}
        reader = DiskStore(root, BUNDLE)
        for p in sorted(root.glob("kv-*" + diskcache.SUFFIX)):
            name = p.name[:-len(diskcache.SUFFIX)]
            before = reader.rejected
            entry = reader.get("prefix", name)
            if entry is None:
                assert reader.rejected == before + 1 and not p.exists()  # removed, not served
                rejected += 1
                continue
            meta, arrays = entry
            assert name == f"kv-{meta['k']:032x}" and np.array_equal(arrays["a"], _content(meta["k"], meta["n"]))
            served += 1
    print(f"{kills} kills in {time.monotonic() - t0:.1f} s: {served} entries served intact, {rejected} torn "
          f"entries rejected (non-atomic writers), {len(temps)} temp files left by killed atomic writers")
    assert kills >= 10 and served > 0 and rejected > 0
    store = DiskStore(root, BUNDLE)  # the cache still works
    assert store.put("prefix", "kv-" + "0" * 32, {"k": 99}, {"a": _content(99, 10)})
    assert store.get("prefix", "kv-" + "0" * 32)[0] == {"k": 99}
    assert not [p for p in root.iterdir() if ".partial-" in p.name]  # killed writers' temp files were swept


def test_entry_names_are_content_digests():
    assert keys_digest([1, 2, ("a" * 64, 0)]) != keys_digest([1, 2, ("a" * 64, 1)])
    assert keys_digest([1, ("fused", "b" * 64, 5)]) != keys_digest([1, 5])


def test_bench_command_writes_a_table_json_and_a_plot(tmp_path, capsys):
    from edgevlm.apps.cli import main

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--resolutions", "64,256", "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "| demo | 256 | 128x128 |" in text and "resize" in text and "cache" in text and "turn 2" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["resolution"] for r in rows] == [64, 256] and png.stat().st_size > 10_000
    for r in rows:
        assert r["cold"]["prefilled_tokens"] == r["cold"]["prompt_tokens"] > r["warm"]["prefilled_tokens"]
        assert r["cold"]["stages_s"]["encode"] > 0 and r["warm"]["stages_s"]["encode"] == 0
        assert r["chat_turn2"]["prefilled_tokens"] < r["chat_turn2"]["prompt_tokens"]
    assert main(["bench", "--resolutions", "abc"]) == 1 and "--resolutions" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["shapes-fastvlm", "shapes-fastvlm-mini"])
def test_load_warms_every_graph_once_and_caches_nothing(name, monkeypatch):
    from edgevlm.backends.onnx import OnnxGraph

    runs = []
    real = OnnxGraph.run
    monkeypatch.setattr(OnnxGraph, "run", lambda self, feeds: runs.append(self.name) or real(self, feeds))
    vlm = edgevlm.load(DEFAULT_BUNDLE.parent / name)
    print(name, "warm-up runs:", runs)
    assert set(runs) == set(vlm.graphs) and len(runs) <= 2 * len(vlm.graphs)
    assert vlm.caches.stats()["image_entries"] == 0 == vlm.caches.stats()["prefix_entries"]


def test_caches_are_shared_safely_by_threads(fresh, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from conftest import scene

    vlm = fresh(tmp_path, image_bytes=3 * 12288, prefix_bytes=200_000)
    want = {k: reference(vlm, Q1, np.asarray(scene(k)), n=3) for k in range(4)}
    jobs = [(k % 4, q) for k in range(24) for q in (Q1,)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: [r.token for r in ask(vlm, job[1], np.asarray(scene(job[0])), n=3)], jobs))
    assert got == [want[k] for k, _ in jobs]
    s = vlm.caches.stats()
    assert s["image_ram_bytes"] <= 3 * 12288 and s["prefix_ram_bytes"] <= 200_000 and s["disk_enabled"] == 1


def test_a_process_loaded_without_warm_up_still_reads_the_disk_tier(tmp_path):
    ask(edgevlm.load(cache_dir=tmp_path), Q1)
    cold_start = edgevlm.load(cache_dir=tmp_path, warmup=False)
    r = ask(cold_start, Q2)[-1]
    assert r.image_cache_source == "disk" and r.prefix_cache_source == "disk" and cold_start.caches.disk.rejected == 0
