"""The disk tier of the caches: one file per entry, written atomically, verified before it is served.

An entry file (little-endian; raw arrays as safetensors lays them out, no pickle anywhere):

    b"EVLMCACH" | u64 header length | header (JSON) | payload (arrays back to back) | sha256 of all before

The header names the format version, the bundle (sha256 of its manifest), the entry's kind and name, the
caller's metadata, and each array's dtype, shape and byte range in the payload. An entry is served only if
its checksum holds, its version and bundle are ours, its name matches its file name and every array lies
inside the payload; anything else (torn by a crash, truncated, forged, from another bundle or an older
format) is removed and reported as a miss. The checksum detects damage, not a forger who can write the
directory: keep the cache directory private (it is created 0700).

Writes go through edgevlm.atomic.write_atomic (a temp file in the same directory, fsynced, `os.replace`d),
so a reader sees the old entry, no entry, or the whole new one; temp files of killed writers are swept. A directory that cannot be written (read-only, full, gone)
turns the disk tier off for the process with one warning; answers are computed as without a cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
from pathlib import Path

import numpy as np

from .atomic import alive, write_atomic  # temp file in the same directory, fsync, os.replace, fsync the directory

log = logging.getLogger("edgevlm")

MAGIC = b"EVLMCACH"
FORMAT_VERSION = 1
SUFFIX = ".evc"
MAX_HEADER = 64 << 20
DTYPES = {"<f4", "<f2", "<i8", "<i4", "|u1"}  # what entries may hold (no object arrays: nothing to unpickle)
NAME = re.compile(r"^[a-z]+-[0-9a-f]{16,64}$")
TEMP = re.compile(r"^\.[a-z]+-[0-9a-f]+\.evc\.partial-(\d+)-")  # edgevlm.atomic's temp files for our entries
STALE_TMP_S = 600.0  # a temp file this old is a stalled writer's


def encode_entry(bundle: str, kind: str, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of one entry file."""
    specs, parts, offset = [], [], 0
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt.str not in DTYPES:
            raise TypeError(f"cache array {key!r} has dtype {a.dtype}, not one of {sorted(DTYPES)}")
        raw = a.astype(dt, copy=False).tobytes()
        specs.append([key, dt.str, list(a.shape), offset, len(raw)])
        parts.append(raw)
        offset += len(raw)
    header = json.dumps({"format": FORMAT_VERSION, "bundle": bundle, "kind": kind, "name": name, "meta": meta,
                         "arrays": specs}, separators=(",", ":")).encode()
    body = b"".join([MAGIC, struct.pack("<Q", len(header)), header, *parts])
    return body + hashlib.sha256(body).digest()


class EntryError(Exception):
    """An entry file that must not be served (torn, forged, foreign or stale); it says why."""


def read_header(blob: bytes) -> dict:
    if len(blob) < 16 or blob[:8] != MAGIC:
        raise EntryError("not an entry file (bad magic or too short)")
    (n,) = struct.unpack("<Q", blob[8:16])
    if n > MAX_HEADER or 16 + n > len(blob):
        raise EntryError("header length out of range")
    try:
        header = json.loads(blob[16:16 + n])
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, ints over 4300 digits
        raise EntryError("header is not JSON") from None
    if not isinstance(header, dict):
        raise EntryError("header is not an object")
    return header


def decode_entry(blob: bytes, bundle: str, kind: str, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (meta, arrays) of a verified entry; EntryError if it must not be served."""
    if len(blob) < 48 or hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
        raise EntryError("checksum mismatch (torn or altered)")
    header = read_header(blob[:-32])
    if header.get("format") != FORMAT_VERSION:
        raise EntryError(f"format version {header.get('format')!r}, this runtime reads {FORMAT_VERSION} (stale)")
    if header.get("bundle") != bundle:
        raise EntryError("written for another bundle (foreign)")
    if header.get("kind") != kind or header.get("name") != name:
        raise EntryError("its header names another entry (misplaced or forged)")
    start = 16 + struct.unpack("<Q", blob[8:16])[0]
    payload = memoryview(blob)[start:-32]
    arrays = {}
    try:
        for key, dt, shape, offset, nbytes in header["arrays"]:
            if (not isinstance(key, str) or dt not in DTYPES or not isinstance(shape, list) or len(shape) > 8
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= len(payload)
                               for d in shape)):
                raise EntryError(f"array {key!r}: bad name, dtype or shape")
            count = 1
            for d in shape:  # in Python ints, stopping at the payload's size: no overflow, no huge product
                count = min(count * d, len(payload) + 1)
            if (not isinstance(offset, int) or not isinstance(nbytes, int) or nbytes != count * np.dtype(dt).itemsize
                    or offset < 0 or offset + nbytes > len(payload)):
                raise EntryError(f"array {key!r} does not fit the payload")
            arrays[key] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise EntryError("malformed array table") from None
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise EntryError("malformed metadata")
    return meta, arrays


class DiskStore:
    """Entry files of one bundle in one directory, bounded in bytes (oldest use evicted first)."""

    def __init__(self, root: str | os.PathLike, bundle: str, max_bytes: int = 2 << 30):
        self.root = Path(root)
        self.bundle, self.max_bytes = bundle, int(max_bytes)
        self.disabled: str | None = None  # why the tier is off, once it is
        self.hits = self.misses = self.rejected = self.writes = 0
        self._lock = threading.Lock()
        self._headers: dict[str, tuple[float, int, dict]] = {}  # name -> (mtime, size, header) read so far
        self._size: int | None = None  # bytes of the entries, None: to be counted
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not readable and writable", str(self.root))
            for d, own in ((self.root.parent, False), (self.root, True)):
                if (why := _private(d, own)) is not None:
                    self.disable(why)
                    return
            self._sweep_temps()
        except OSError as e:
            self.disable(e)

    @property
    def enabled(self) -> bool:
        return self.disabled is None

    def disable(self, err: BaseException | str) -> None:
        """Turn the disk tier off for this process (one warning); RAM caches and answers are unaffected."""
        if self.disabled is None:
            self.disabled = err if isinstance(err, str) else (getattr(err, "strerror", None) or str(err))
            log.warning("the disk cache in %s is off for this run (%s); answers are computed without it",
                        self.root, self.disabled)

    def path(self, name: str) -> Path:
        return self.root / (name + SUFFIX)

    # ---- reading ------------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """A verified entry, or None (absent, unreadable, or bad: then removed)."""
        if self.disabled or not NAME.match(name):
            return None
        p = self.path(name)
        try:
            blob = _read_regular(p, self.max_bytes)
        except FileNotFoundError:
            self.misses += 1
            return None
        except EntryError as e:  # a FIFO, a device, a symlink or a file larger than the whole tier
            self.reject(name, str(e))
            return None
        except OSError as e:
            log.debug("cache entry %s unreadable: %s", p.name, e)
            self.misses += 1
            return None
        try:
            meta, arrays = decode_entry(blob, self.bundle, kind, name)
        except EntryError as e:
            self.reject(name, str(e))
            return None
        self.hits += 1
        try:
            os.utime(p)  # the eviction order is least recently used
        except OSError:
            pass
        return meta, arrays

    def reject(self, name: str, why: str) -> None:
        log.warning("cache entry %s not served: %s; removed", name + SUFFIX, why)
        self.rejected += 1
        self.remove(name)

    def headers(self, prefix: str) -> dict[str, dict]:
        """Unverified headers of the entries whose names start with prefix (a hint for lookups: an entry
        is verified when it is read with `get`)."""
        if self.disabled:
            return {}
        out = {}
        with self._lock:
            try:
                listing = list(os.scandir(self.root))
            except OSError:
                return {}
            seen = set()
            for d in listing:
                name = d.name[:-len(SUFFIX)]
                if not d.name.endswith(SUFFIX) or not name.startswith(prefix) or not NAME.match(name):
                    continue
                seen.add(name)
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                cached = self._headers.get(name)
                if cached is None or cached[:2] != (st.st_mtime, st.st_size):
                    try:
                        header = read_header(_read_regular(d.path, self.max_bytes, header_only=True))
                    except OSError:
                        continue
                    except EntryError as e:  # only whole files get an entry's name (rename): this one is junk
                        self.reject(name, str(e))
                        continue
                    cached = self._headers[name] = (st.st_mtime, st.st_size, header)
                out[name] = cached[2]
            for name in set(self._headers) - seen:
                if name.startswith(prefix):
                    del self._headers[name]
        return out

    # ---- writing ------------------------------------------------------------------------------------

    def put(self, kind: str, name: str, meta: dict, arrays: dict[str, np.ndarray]) -> bool:
        """Write one entry atomically; False (and the tier off) if the directory cannot take it."""
        if self.disabled or not NAME.match(name):
            return False
        blob = encode_entry(self.bundle, kind, name, meta, arrays)
        try:
            write_atomic(self.path(name), blob)
        except OSError as e:
            self.disable(e)
            return False
        self.writes += 1
        self._evict()
        return True

    def remove(self, name: str) -> None:
        self._headers.pop(name, None)
        self._size = None
        try:
            self.path(name).unlink()
        except OSError:
            pass

    def size_bytes(self) -> int:
        """Bytes of this bundle's entries (as of the last write or removal here; other processes may add)."""
        if self.disabled:
            return 0
        if self._size is None:
            try:
                self._size = sum(d.stat(follow_symlinks=False).st_size for d in os.scandir(self.root) if d.name.endswith(SUFFIX))
            except OSError:
                return 0
        return self._size

    def _evict(self) -> None:
        try:
            files = [(d.stat(follow_symlinks=False).st_mtime, d.stat(follow_symlinks=False).st_size, d.path) for d in os.scandir(self.root)
                     if d.name.endswith(SUFFIX)]
        except OSError:
            return
        total = sum(f[1] for f in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            total -= size
        self._size = total

    def _sweep_temps(self) -> None:
        """Remove the temp files of writers that were killed (their pid is gone) or stalled for long."""
        now = time.time()
        for d in os.scandir(self.root):
            m = TEMP.match(d.name)
            if m is None:
                continue
            try:
                if not alive(int(m.group(1))) or now - d.stat(follow_symlinks=False).st_mtime > STALE_TMP_S:
                    os.unlink(d.path)
            except OSError:
                pass


def _private(d: Path, own: bool) -> str | None:
    """None if no other user can plant files in directory d, else why the disk tier must stay off. A directory
    of ours that others could write is made private (one warning). own: d must be ours (the bundle's entry
    directory); else (the cache directory given) a shared sticky directory such as /tmp is fine, since the entry
    directory inside it is ours and others cannot rename it there."""
    if os.name != "posix":
        return None
    st = d.stat()
    mine = st.st_uid == os.getuid()
    if own and not mine:
        return f"{d} belongs to another user"
    if not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    if mine:
        os.chmod(d, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        log.warning("cache directory %s was writable by other users (mode %o); made it private", d,
                    stat.S_IMODE(st.st_mode))
        return None
    if st.st_mode & stat.S_ISVTX:
        return None
    return f"{d} is writable by other users"


def _read_regular(path, limit: int, header_only: bool = False) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (only its magic + header with header_only).
    Opened without following a symlink and without blocking on a FIFO; anything else is an EntryError."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EntryError("a symlink, not an entry file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EntryError("not a regular file")
        if st.st_size > limit:
            raise EntryError(f"{st.st_size} bytes, more than the whole disk tier holds")
        if not header_only:
            return f.read(st.st_size)
        head = f.read(16)
        n = struct.unpack("<Q", head[8:16])[0] if len(head) == 16 else 0
        return head + f.read(min(n, MAX_HEADER, st.st_size))
