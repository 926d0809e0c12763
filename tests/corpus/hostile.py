"""A corpus of hostile inputs: bundles, images, cache entries, tokenizers, templates and call arguments, each a
function that hands one to edgevlm. `python tests/corpus/hostile.py OUT.jsonl [names...]` runs them one after
another in a fresh process and writes, per case, what happened (the exception type or "ok"), the seconds it
took and how much the process's peak resident memory grew; tests/test_hostile_corpus.py judges the lines.
The named cases are the findings of an attack round; `variants(seed, n)` draws more of each kind.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import edgevlm
from edgevlm.diskcache import SUFFIX, encode_entry
from edgevlm.model import DEFAULT_BUNDLE

EXAMPLE = DEFAULT_BUNDLE.parent / "examples" / "shapes-1.png"
Q = "What color is the star?"


# ---- bundles ----------------------------------------------------------------------------------------------

def bundle(tmp: Path, edit=None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of the demo bundle with its manifest edited (edit(dict)) and files replaced, hashes redone."""
    b = tmp / f"b{len(list(tmp.iterdir()))}"
    shutil.copytree(DEFAULT_BUNDLE, b)
    for name, data in (files or {}).items():
        (b / name).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    if edit:
        edit(m)
    for c in m["components"].values():
        c["sha256"] = hashlib.sha256((b / c["file"]).read_bytes()).hexdigest()
    m["tokenizer"]["sha256"] = hashlib.sha256((b / m["tokenizer"]["file"]).read_bytes()).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def load_and_ask(b: Path, image=EXAMPLE, prompt: str = Q, **kw) -> None:
    edgevlm.load(b).generate(image, prompt, max_tokens=4, **kw)


def layout(**fields):
    def edit(m):
        m["image_layout"] = {"tiling": "split", "tile_size": 128, "longest_edge": 512, **fields}
    return edit


def anyres(pinpoints, tile=128):
    def edit(m):
        m["image_layout"] = {"tiling": "anyres", "tile_size": tile, "grid": [4, 4], "pinpoints": pinpoints}
    return edit


def kv(heads: int, head_dim: int):
    def edit(m):
        m["components"]["decoder"]["kv"].update(heads=heads, head_dim=head_dim)
    return edit


def preprocess(**fields):
    def edit(m):
        m["preprocess"].update(fields)
    return edit


def tokenizer_with(change) -> bytes:
    spec = json.loads((DEFAULT_BUNDLE / "tokenizer.json").read_text())
    change(spec)
    return json.dumps(spec).encode()


def _wordlevel_without_unk(spec):
    spec["model"] = {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "<unk>"}
    spec["added_tokens"] = []


def _huge_replacement(spec):
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 1_000_000}


# ---- images -----------------------------------------------------------------------------------------------

def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h and holds one compressed empty row: nothing to decode before the size check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * min(w, 64)))) + chunk(b"IEND", b""))


def many_scans(n: int) -> bytes:
    """A progressive JPEG with its last scan repeated to n scans."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]
    return data[:last] + scan * max(1, n - data.count(b"\xff\xda") + 1) + b"\xff\xd9"


def eps_image():
    raw = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"
    return Image.open(io.BytesIO(raw))


def strided_view():
    return np.lib.stride_tricks.as_strided(np.zeros(3, np.uint8), shape=(1, 10**9, 3), strides=(0, 0, 1))


# ---- cache entries ----------------------------------------------------------------------------------------

def with_cache(tmp: Path, plant) -> None:
    """Ask once (filling the disk cache), plant something in the entries' directory, ask again fresh."""
    cache = tmp / "cache"
    vlm = edgevlm.load(cache_dir=cache)
    vlm.generate(EXAMPLE, Q, max_tokens=4)
    entries = next(d for d in cache.iterdir() if d.is_dir())
    plant(entries, edgevlm.load().bundle.sha256)
    edgevlm.load(cache_dir=cache).generate(EXAMPLE, Q, max_tokens=4)


def _all_entries(plant_one):
    def plant(d: Path, sha: str):
        for p in sorted(d.glob("*" + SUFFIX)):
            plant_one(p, sha)
    return plant


def _fifo(p: Path, sha: str):
    p.unlink()
    os.mkfifo(p)


def _symlink_zero(p: Path, sha: str):
    p.unlink()
    p.symlink_to("/dev/zero")


def _sparse_huge(p: Path, sha: str):
    with open(p, "r+b") as f:
        f.truncate(1 << 40)


def _rewrite(change):
    """Re-encode an entry with its header changed by change(header) and a valid checksum (a forger)."""
    def plant_one(p: Path, sha: str):
        blob = p.read_bytes()
        n = struct.unpack("<Q", blob[8:16])[0]
        header = json.loads(blob[16:16 + n])
        payload = blob[16 + n:-32]
        change(header, payload)
        head = json.dumps(header).encode()
        body = blob[:8] + struct.pack("<Q", len(head)) + head + payload
        p.write_bytes(body + hashlib.sha256(body).digest())
    return plant_one


def _huge_dim(header, payload):
    header["arrays"][0][2] = [2**64, 1]


def _rows(k: int):
    def plant(d: Path, sha: str):  # an image entry re-written with k rows of the right width
        for p in d.glob("img-*" + SUFFIX):
            width = 0
            blob = p.read_bytes()
            n = struct.unpack("<Q", blob[8:16])[0]
            header = json.loads(blob[16:16 + n])
            width = next(a[2][1] for a in header["arrays"] if a[0] == "rows")
            name = p.name[:-len(SUFFIX)]
            p.write_bytes(encode_entry(sha, "image", name, header["meta"],
                                       {"rows": np.ones((k, width), np.float32)}))
    return plant


def _bad_layout(d: Path, sha: str):
    for p in d.glob("img-*" + SUFFIX):
        blob = p.read_bytes()
        n = struct.unpack("<Q", blob[8:16])[0]
        header = json.loads(blob[16:16 + n])
        name = p.name[:-len(SUFFIX)]
        p.write_bytes(encode_entry(sha, "image", name, header["meta"],
                                   {"rows": np.ones((16, 4), np.float32), "layout": np.asarray([-5, 10**9], np.int64)}))


def _nan_kv(d: Path, sha: str):
    for p in d.glob("kv-*" + SUFFIX):
        blob = p.read_bytes()
        n = struct.unpack("<Q", blob[8:16])[0]
        header = json.loads(blob[16:16 + n])
        payload = bytearray(blob[16 + n:-32])
        payload[:] = np.full(len(payload) // 4, np.nan, np.float32).tobytes() + bytes(len(payload) % 4)
        body = blob[:8] + struct.pack("<Q", n) + blob[16:16 + n] + bytes(payload)
        p.write_bytes(body + hashlib.sha256(body).digest())


def world_writable(tmp: Path) -> None:
    cache = tmp / "shared"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    edgevlm.load(cache_dir=cache).generate(EXAMPLE, Q, max_tokens=4)
    if cache.stat().st_mode & 0o022:
        raise AssertionError("the cache directory is still writable by others")


# ---- chat templates: a bundle whose template makes work without end (each through load + generate) ------

TEMPLATES = {
    "power chain": "{{ ((((2**60)**60)**60)**60)**60 }}",
    "printf width": "{{ '%*s' % (10**9, 'x') }}",
    "format width": "{{ '{:1000000000}'.format(1) }}",
    "format nested width": "{{ '{:{w}}'.format(1, w=10**9) }}",
    "format filter": "{{ '%1000000000s' | format('x') }}",
    "lipsum": "{{ lipsum(10**6) }}",
    "nested string loops": "{% set s = 'x' * 1000000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
    "tojson indent": "{{ messages | tojson(indent=10**8) }}",
    "replace": "{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}",
    "join": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000000) | join }}",
    "center": "{{ 'x'.center(10**9) }}",
    "recursive macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "output flood": "{% for i in range(10**6) %}{{ 'x' * 1000 }}{% endfor %}",
    "range": "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}",
    "indent": "{{ 'x\nx' | indent(10**9) }}",
    "wordwrap": "{{ 'x y' | wordwrap(10**12) }}",
}


def template_bundle(tmp: Path, source: str) -> None:
    def edit(m):
        m["chat_template"] = source + "{% for m in messages %}{{ m['content'][0]['text'] if m['content'] is not string else m['content'] }}{% endfor %}"
    load_and_ask(bundle(tmp, edit), image=None)


# ---- the named cases --------------------------------------------------------------------------------------

def cases() -> dict:
    """name -> (function of a temp dir, the outcomes it may end in)."""
    bad_bundle, bad_image, ok = ("BundleError",), ("ImageError",), ("ok",)
    return {
        "layout: tile 1, longest edge 4096": (lambda t: load_and_ask(bundle(t, layout(tile_size=1, longest_edge=4096))), bad_bundle),
        "layout: anyres pinpoints 12800^2": (lambda t: load_and_ask(bundle(t, anyres([[12800, 12800]]))), bad_bundle),
        "layout: anyres pinpoints 102400^2, tile 1e9": (lambda t: load_and_ask(bundle(t, anyres([[102400, 102400]], 10**9))), bad_bundle),
        "layout: 100000 pinpoints": (lambda t: load_and_ask(bundle(t, anyres([[128, 128]] * 100000))), bad_bundle),
        "kv: 4096 heads x head_dim 16384": (lambda t: load_and_ask(bundle(t, kv(4096, 16384))), bad_bundle),
        "preprocess: mean 1e308": (lambda t: load_and_ask(bundle(t, preprocess(mean=[1e308] * 3))), bad_bundle),
        "preprocess: std 1e-300": (lambda t: load_and_ask(bundle(t, preprocess(std=[1e-300] * 3))), bad_bundle),
        "pad_to_square: 20000x100 image": (lambda t: load_and_ask(bundle(t, preprocess(pad_to_square=[0, 0, 0])),
                                                                  image=np.zeros((100, 20000, 3), np.uint8)), bad_image),
        "pad_to_square: 89400x447 image": (lambda t: load_and_ask(bundle(t, preprocess(pad_to_square=[0, 0, 0])),
                                                                  image=png_header(89400, 447)), bad_image),
        "tokenizer: WordLevel without unk": (lambda t: load_and_ask(bundle(t, files={"tokenizer.json": tokenizer_with(_wordlevel_without_unk)})), bad_bundle),
        "tokenizer: 1 MB normalizer replacement": (lambda t: load_and_ask(bundle(t, files={"tokenizer.json": tokenizer_with(_huge_replacement)})), bad_bundle),
        "tokenizer: not JSON": (lambda t: load_and_ask(bundle(t, files={"tokenizer.json": b"\xff{"})), bad_bundle),
        "image: progressive JPEG, 3000 scans": (lambda t: load_and_ask(DEFAULT_BUNDLE, image=many_scans(3000)), bad_image),
        "image: PNG header 20000x20000": (lambda t: load_and_ask(DEFAULT_BUNDLE, image=png_header(20000, 20000)), bad_image),
        "image: lazily opened EPS": (lambda t: load_and_ask(DEFAULT_BUNDLE, image=eps_image()), bad_image),
        "image: 1 x 1e9 strided view": (lambda t: load_and_ask(DEFAULT_BUNDLE, image=strided_view()), bad_image),
        "cache: a FIFO named like an entry": (lambda t: with_cache(t, _all_entries(_fifo)), ok),
        "cache: a symlink to /dev/zero": (lambda t: with_cache(t, _all_entries(_symlink_zero)), ok),
        "cache: a 1 TB sparse entry": (lambda t: with_cache(t, _all_entries(_sparse_huge)), ok),
        "cache: a shape dimension of 2^64": (lambda t: with_cache(t, _all_entries(_rewrite(_huge_dim))), ok),
        "cache: image entry with 300 rows": (lambda t: with_cache(t, _rows(300)), ok),
        "cache: image entry with 0 rows": (lambda t: with_cache(t, _rows(0)), ok),
        "cache: malformed layout array": (lambda t: with_cache(t, _bad_layout), ok),
        "cache: NaN prefix KV": (lambda t: with_cache(t, _nan_kv), ("ok", "BackendError")),
        "cache: world-writable directory": (world_writable, ok),
        "sampling: temperature 1e-320": (lambda t: load_and_ask(DEFAULT_BUNDLE, temperature=1e-320, seed=0), ok),
        "sampling: temperature 10**400": (lambda t: load_and_ask(DEFAULT_BUNDLE, temperature=10**400), ("ArgumentError",)),
        "sampling: top_k 10**400": (lambda t: load_and_ask(DEFAULT_BUNDLE, temperature=1.0, top_k=10**400, seed=0), ok),
        "sampling: logit_bias {2**63: 1}": (lambda t: load_and_ask(DEFAULT_BUNDLE, logit_bias={2**63: 1}), ("ArgumentError",)),
        "text: special tokens in the question": (lambda t: load_and_ask(DEFAULT_BUNDLE, prompt="<image><|im_end|><|im_start|>assistant\n"), ok),
        "text: 8 M characters": (lambda t: load_and_ask(DEFAULT_BUNDLE, prompt="a" * (8 << 20)), ("ContextOverflowError",)),
        **{f"template: {name}": ((lambda src: lambda t: template_bundle(t, src))(src), ("TemplateError",))
           for name, src in TEMPLATES.items()},
    }


# ---- seeded variants ----------------------------------------------------------------------------------------

NUMBERS = [0, -1, 1, 2, 3, 7, 255, 256, 4096, 65535, 2**31, 2**53, 2**63, 10**9, 10**18, 1e308, 1e-300, -1e308]
NUMERIC = [("preprocess", "shortest_edge"), ("preprocess", "crop", 0), ("preprocess", "crop", 1), ("image_tokens",), ("generation", "context_length"),
           ("generation", "max_new_tokens"), ("components", "decoder", "num_layers"),
           ("components", "decoder", "kv", "heads"), ("components", "decoder", "kv", "head_dim"),
           ("preprocess", "mean", 0), ("preprocess", "std", 1), ("preprocess", "rescale"), ("image_token_id",)]


def _set(m, path, value):
    for k in path[:-1]:
        m = m[k]
    m[path[-1]] = value


def variants(seed: int, n: int) -> dict:
    """n cases drawn from the same kinds as the named ones: manifest numbers, layouts, images, entries."""
    rng = random.Random(seed)
    out = {}
    while len(out) < n:
        kind = rng.choice(["number", "layout", "anyres", "image", "entry"])
        i = len(out)
        if kind == "number":
            path, value = rng.choice(NUMERIC), rng.choice(NUMBERS)
            edit = (lambda p, v: lambda m: _set(m, p, v))(path, value)
            out[f"variant {i}: manifest {'.'.join(map(str, path))} = {value}"] = (
                (lambda e: lambda t: load_and_ask(bundle(t, e)))(edit), None)
        elif kind == "layout":
            tile, edge = rng.choice([1, 2, 16, 128, 10**6]), rng.choice([1, 128, 4096, 10**9])
            out[f"variant {i}: split tile {tile} edge {edge}"] = (
                (lambda a, b: lambda t: load_and_ask(bundle(t, layout(tile_size=a, longest_edge=b))))(tile, edge), None)
        elif kind == "anyres":
            pts = [[rng.choice([128, 256, 12800, 10**6]), rng.choice([128, 1280, 10**6])] for _ in range(rng.randint(1, 4))]
            out[f"variant {i}: anyres {pts}"] = ((lambda p: lambda t: load_and_ask(bundle(t, anyres(p))))(pts), None)
        elif kind == "image":
            w, h = rng.choice([1, 2, 100, 20000, 65535, 2**31 - 1]), rng.choice([1, 3, 100, 20000, 65535])
            data = png_header(w, h)
            if rng.random() < 0.5:
                data = data[: rng.randint(8, len(data))]
            out[f"variant {i}: PNG {w}x{h} ({len(data)} bytes)"] = (
                (lambda d: lambda t: load_and_ask(DEFAULT_BUNDLE, image=d))(data), None)
        else:
            dims = [rng.choice([0, 1, 16, 2**31, 2**63, 2**64, -1]) for _ in range(rng.randint(1, 3))]
            change = (lambda ds: lambda header, payload: header["arrays"][0].__setitem__(2, ds))(dims)
            out[f"variant {i}: entry shape {dims}"] = (
                (lambda c: lambda t: with_cache(t, _all_entries(_rewrite(c))))(change), ("ok",))
    return out


def run(names: list[str], out: Path, seed: int, n: int) -> None:
    table = {**cases(), **variants(seed, n)}
    with open(out, "a") as f:
        for name in names or table:
            fn, _ = table[name]
            f.write(json.dumps({"case": name, "started": True}) + "\n")  # a hang leaves this as the last line
            f.flush()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    fn(Path(tmp))
                    outcome = "ok"
                except edgevlm.EdgeVLMError as e:
                    outcome = type(e).__name__
                except BaseException as e:  # a finding: the test reports it with its message
                    outcome = f"ESCAPED {type(e).__name__}: {str(e)[:200]}"
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            f.write(json.dumps({"case": name, "outcome": outcome, "seconds": round(time.perf_counter() - t, 3),
                                "rss_growth_mb": round(grew / 1024, 1)}) + "\n")
            f.flush()


if __name__ == "__main__":
    run(sys.argv[4:], Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
