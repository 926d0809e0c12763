"""Failure injection on real file systems: a cache directory on a full or a read-only tmpfs (mounted in a
private mount namespace, `unshare -rm`) turns the disk tier off with one warning and answers are unchanged;
corrupt entry files are ignored and removed. (Interrupted export/quant: tests/test_atomic.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.diskcache import SUFFIX, decode_entry

EXAMPLE = Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"
QUESTIONS = ["What color is the star?", "How many objects are there?", "What color is the star?"]

CHILD = textwrap.dedent("""
    import errno, json, logging, os, sys
    import edgevlm
    root, mode = sys.argv[1], sys.argv[2]
    warnings = []
    class H(logging.Handler):
        def emit(self, rec):
            if rec.levelno >= logging.WARNING:
                warnings.append(rec.getMessage())
    logging.getLogger("edgevlm").addHandler(H())
    image, questions = sys.argv[3], json.loads(sys.argv[4])
    def answers(vlm):
        return [[r.token for r in vlm.stream(image, q, max_tokens=6)] for q in questions]
    reference = answers(edgevlm.load(threads=1))
    cache = os.path.join(root, "cache")
    if mode == "full":  # leave a few KB: the first entries may fit, later ones hit ENOSPC for real
        with open(os.path.join(root, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\\0" * 4096)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        os.truncate(os.path.join(root, "filler"), os.path.getsize(os.path.join(root, "filler")) - 16384)
    vlm = edgevlm.load(threads=1, cache_dir=cache)
    got = answers(vlm)
    vlm.caches.flush()
    files = sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)
    print(json.dumps({"reference": reference, "got": got, "warnings": warnings, "files": files,
                      "disabled": vlm.caches.disk.disabled, "writes": vlm.caches.disk.writes}))
""")


def _in_namespace(tmp_path: Path, mode: str, size: str = "256k") -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    setup = f"mount -t tmpfs -o size={size} none {mnt}"
    if mode == "ro":  # fill the cache once, then make the file system read-only
        setup += (f" && {sys.executable} {script} {mnt} fill {EXAMPLE} '{json.dumps(QUESTIONS)}' > /dev/null"
                  f" && mount -o remount,ro {mnt}")
    cmd = ["unshare", "-rm", "sh", "-c", f"{setup} && exec {sys.executable} {script} {mnt} {mode} {EXAMPLE} "
                                          f"'{json.dumps(QUESTIONS)}'"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "mount" in r.stderr and "Operation not permitted" in r.stderr:
        pytest.skip("this machine cannot mount a tmpfs in a user namespace")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_full_cache_directory_disables_the_disk_tier_with_one_warning(tmp_path):
    r = _in_namespace(tmp_path, "full")
    print({k: v for k, v in r.items() if k not in ("reference", "got")})
    assert r["got"] == r["reference"]
    assert r["disabled"] and "No space left" in r["disabled"]
    assert sum("disk cache" in w for w in r["warnings"]) == 1
    assert not any(".partial-" in f for f in r["files"])  # the failed write left no temp file


def test_read_only_cache_directory_disables_the_disk_tier_with_one_warning(tmp_path):
    r = _in_namespace(tmp_path, "ro")
    print({k: v for k, v in r.items() if k not in ("reference", "got")})
    assert r["got"] == r["reference"]
    assert r["disabled"] and r["writes"] == 0
    assert sum("disk cache" in w for w in r["warnings"]) == 1
    assert any(f.endswith(SUFFIX) for f in r["files"])  # the entries written before are still there


def test_corrupt_cache_files_are_ignored_and_removed(tmp_path):
    cache = tmp_path / "cache"
    vlm = edgevlm.load(threads=1, cache_dir=cache)
    reference = [[r.token for r in vlm.stream(EXAMPLE, q, max_tokens=6)] for q in QUESTIONS]
    vlm.caches.flush()
    entries = sorted(cache.rglob("*" + SUFFIX))
    assert entries, "the run wrote no disk entries"
    rng = np.random.default_rng(0)
    damaged = {}
    for k, p in enumerate(entries):
        blob = bytearray(p.read_bytes())
        how = ["truncated", "zeroed", "flipped", "empty", "garbage"][k % 5]
        if how == "truncated":
            blob = blob[: len(blob) // 2]
        elif how == "zeroed":
            blob[16:48] = bytes(32)
        elif how == "flipped":
            blob[int(rng.integers(0, len(blob)))] ^= 0x10
        elif how == "empty":
            blob = bytearray()
        else:
            blob = bytearray(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
        p.write_bytes(bytes(blob))
        damaged[p.name] = how
    vlm = edgevlm.load(threads=1, cache_dir=cache)
    got = [[r.token for r in vlm.stream(EXAMPLE, q, max_tokens=6)] for q in QUESTIONS]
    s = vlm.caches.stats()
    print(damaged, s)
    assert got == reference
    assert vlm.caches.disk.hits == 0 and vlm.caches.disk.rejected >= 1
    vlm.caches.flush()
    for p in entries:  # every damaged file was removed, or replaced by a fresh entry that verifies
        if p.exists():
            kind = "image" if p.name.startswith("img-") else "prefix"
            decode_entry(p.read_bytes(), vlm.bundle.sha256, kind, p.name[: -len(SUFFIX)])
