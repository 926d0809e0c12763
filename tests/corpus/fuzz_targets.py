"""Hypothesis strategies and fuzz targets for edgevlm's parsers of untrusted input: the manifest (JSON bytes
and decoded values), chat templates (source and message contents) and disk-cache entry headers.

A target returns the name of its outcome ("ok" or the edgevlm error type) and lets any other exception
escape: that is a finding. tests/test_fuzz_parsers.py runs a seeded sample in CI;
benchmarks/fuzz_parsers.py runs >= 100,000 cases and commits the counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hypothesis import strategies as st

from edgevlm.bundle import read_manifest
from edgevlm.errors import EdgeVLMError
from edgevlm.manifest import parse_manifest
from edgevlm.model import DEFAULT_BUNDLE
from edgevlm.template import render

DEMO_MANIFEST = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
DEMO_RAW = (DEFAULT_BUNDLE / "manifest.json").read_bytes()


def outcome(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
        return "ok"
    except EdgeVLMError as e:
        return type(e).__name__


# ---- JSON values and manifests --------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=False) | st.text(max_size=20)
           | st.sampled_from(["", "..", "/etc/passwd", "a/../../b", "%s%s%s", "%d", "onnx", "gguf", "splice",
                              "prefusion", "bicubic", "pil", "0" * 64, "vision.onnx", "\x00", "<image>"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


DEMO_PATHS = list(_paths(DEMO_MANIFEST))[1:]


@st.composite
def manifest_edits(draw):
    """The demo manifest with 1-3 edits: a value replaced (by a nearby number, a string, any JSON), a key
    deleted or an unknown key added, at any depth."""
    m = copy.deepcopy(DEMO_MANIFEST)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(DEMO_PATHS))
        parent = m
        try:
            for key in path[:-1]:
                parent = parent[key]
            old = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
        op = draw(st.sampled_from(["number", "value", "delete", "add"]))
        if op == "number":
            new = draw(st.sampled_from([0, -1, 1, 2, 3, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -0.0, 1e308, True]))
            parent[path[-1]] = new if not isinstance(old, int) or isinstance(new, float) else old + new
        elif op == "value":
            parent[path[-1]] = draw(json_values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return m


def target_manifest_value(data) -> str:
    return outcome(parse_manifest, data)


def target_manifest_bytes(raw: bytes) -> str:
    return outcome(read_manifest, raw)


@st.composite
def manifest_bytes(draw):
    """manifest.json bytes: the demo's with flipped/inserted/deleted bytes, deep nesting, or random bytes."""
    kind = draw(st.sampled_from(["flip", "splice", "nest", "random", "edit"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "nest":
        n = draw(st.integers(1, 200_000))
        return b"[" * n + b"]" * draw(st.integers(0, n))
    if kind == "edit":
        return json.dumps(draw(manifest_edits())).encode()
    raw = bytearray(DEMO_RAW)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        else:
            raw[i:i + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
    return bytes(raw)


# ---- chat templates ------------------------------------------------------------------------------------

INJECTIONS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[-1].__subclasses__()[40]('/etc/passwd').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages|attr('__class__') }}",
    "{{ (messages|first)|attr('__class__')|attr('__mro__') }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "{{ '%s'.__mod__.__self__ }}",
    "{{ tojson.__globals__ }}",
    "{% set x = messages.append({'role': 'system', 'content': 'pwned'}) %}",
    "{% set x = messages[0].update({'content': 'pwned'}) %}",
    "{% set x = messages.pop() %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% set ns = namespace(_x=1) %}",
    "{{ 'a' * 100000000 }}",
    "{{ [1] * 100000000 }}",
    "{{ 2 ** 100000000 }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "{{ lipsum(100000) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ _exc(" + "(" * 400 + "x }}",  # found by benchmarks/fuzz_atheris.py: a RecursionError in jinja's parser
    "{{ " + "[" * 400 + " }}",
]

FRAGMENTS = ["{{ ", " }}", "{% ", " %}", "{%- ", " -%}", "for m in messages", "endfor", "if ", "else", "endif",
             "m['content']", "m['role']", "messages[0]", "add_generation_prompt", "bos_token", "|tojson", "|length",
             "|attr('__class__')", ".__class__", ".__globals__", "__subclasses__()", "range(9)", "range(99999)",
             "namespace(a=1)", "set ns = namespace(a=0)", "ns.a", "raise_exception('x')", "loop.index", " + ",
             " * ", " ** ", "'x'", "1", "(", ")", "[", "]", ",", "|join", "|safe", "|e", "macro f()", "endmacro",
             "f()", "strftime_now('%Y')", "is defined", "not ", " ~ ", "|selectattr('role')", "|map('upper')",
             "break", "continue", "<image>", "\n"]


@st.composite
def templates(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(INJECTIONS))
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=60))
    return "".join(draw(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=24)))


contents = st.text(max_size=40) | st.sampled_from(INJECTIONS + ["{{ 7*7 }}", "<image>", "{% raw %}", "\x00"])
message_lists = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=6),
    "content": contents | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": contents}), max_size=2),
}), max_size=4)


def target_template(source: str, messages: list) -> str:
    return outcome(render, source, messages, bos_token="<s>", eos_token="</s>")


def target_demo_template(messages: list) -> str:
    """The demo bundle's own template over hostile message contents: text is data, never template code."""
    out = []
    result = outcome(lambda: out.append(render(DEMO_MANIFEST["chat_template"], messages,
                                               **DEMO_MANIFEST.get("special_tokens", {}))))
    for m in messages if out else []:
        parts = m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]
        for p in parts:
            assert "{{ 7*7 }}" not in p["text"] or "{{ 7*7 }}" in out[0], "message text was run as template code"
    return result


# ---- disk cache entries ---------------------------------------------------------------------------------

CACHE_BUNDLE = __import__("hashlib").sha256(DEMO_RAW).hexdigest()  # entries as the demo bundle writes them
_VLM = []


def demo_vlm():
    """The demo model, loaded once: its caches check what disk entries hold, as in real use."""
    if not _VLM:
        import edgevlm

        _VLM.append(edgevlm.load(threads=1))
    return _VLM[0]


def _resign(body: bytes) -> bytes:
    import hashlib

    return body + hashlib.sha256(body).digest()


@st.composite
def entry_files(draw):
    """(kind, name, file bytes): a valid entry, then damaged (checksum broken) or forged (changed and
    re-signed, so the header and array-table parsers are reached)."""
    import numpy as np

    from edgevlm.diskcache import encode_entry

    kind = draw(st.sampled_from(["image", "prefix"]))
    name = ("img-" if kind == "image" else "kv-") + draw(st.sampled_from(["0" * 64, "ab" * 32, "1234" * 16]))
    dtype = draw(st.sampled_from(["<f4", "<f2", "<i8", "<i4", "|u1"]))
    arrays = {k: np.zeros(draw(st.lists(st.integers(0, 4), max_size=3)), dtype)
              for k in draw(st.sampled_from([["rows"], ["k.0", "v.0"], ["k.0", "v.0", "k.1", "v.1"], []]))}
    meta = draw(st.sampled_from([{}, {"keys": [1, 2, 3]}, {"keys": [1, 2, 3], "variant": "onnx-kv"},
                                 {"keys": [1, ["i", "x", 0], ["f", "y", 2]], "variant": "onnx-kv"}]))
    blob = encode_entry(CACHE_BUNDLE, kind, name, meta, arrays)
    how = draw(st.sampled_from(["valid", "flip", "truncate", "header", "header-edit", "length", "nest", "bigint"]))
    body = blob[:-32]
    n = int.from_bytes(body[8:16], "little")
    header = json.loads(body[16:16 + n])
    if how == "flip":
        b = bytearray(blob)
        b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return kind, name, bytes(b)
    if how == "truncate":
        return kind, name, blob[:draw(st.integers(0, len(blob) - 1))]
    if how == "length":
        v = draw(st.sampled_from([0, 1, n - 1, n + 1, 2 ** 63, 2 ** 64 - 1, 64 << 20]))
        return kind, name, _resign(body[:8] + v.to_bytes(8, "little") + body[16:])
    if how in ("header", "header-edit", "nest", "bigint"):
        if how == "header":
            new = json.dumps(draw(json_values)).encode()
        elif how == "nest":
            d = draw(st.integers(1, 100_000))
            new = b"[" * d + b"]" * d
        elif how == "bigint":
            new = b'{"format": 1' + b"0" * draw(st.integers(4000, 6000)) + b"}"
        else:
            key = draw(st.sampled_from(sorted(header)))
            if key == "arrays" and header["arrays"] and draw(st.booleans()):
                row = list(header["arrays"][0])
                row[draw(st.integers(0, 4))] = draw(json_values | st.integers(-2 ** 65, 2 ** 65)
                                                     | st.lists(st.integers(-2 ** 40, 2 ** 40), max_size=4))
                header["arrays"][0] = row
            else:
                header[key] = draw(json_values)
            new = json.dumps(header).encode()
        return kind, name, _resign(body[:8] + len(new).to_bytes(8, "little") + new + body[16 + n:])
    return kind, name, blob


def target_cache_entry(kind: str, name: str, blob: bytes, root: Path) -> str:
    """The entry as a file of the demo model's disk tier: headers(), get() and the cache lookups never raise;
    a bad entry is a miss (and removed)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(dir=root))
    try:
        caches = demo_vlm().new_caches(work)
        store = caches.disk
        store.path(name).write_bytes(blob)
        store.headers("kv-")
        got = store.get(kind, name)
        store.path(name).write_bytes(blob)
        if kind == "prefix":
            caches.lookup_prefix([1, 2, 3, 4, ("x", 0), ("fused", "y", 2)])
        else:
            caches.get_image(name[4:])
        return "served" if got is not None else "miss"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def here() -> Path:
    return Path(__file__).parent
