"""The image cache and the prefix KV cache: RAM LRUs bounded in bytes, with an optional disk tier.

Image cache: key = sha256(preprocessed pixels + preprocess config + vision component sha256); value = all
that depends only on the image ("rows": the embeds that replace its placeholders [image_tokens, D]; for
pre-fusion bundles also "kv": the pre-fusion KV of the image prefix).

Prefix KV cache: an entry is (keys, kv) — the positions a decoder KV holds, as cache keys (token ids, or
(image key, row) at image positions, or ("fused", image key, id) where pre-fusion made text depend on the
image), and the KV arrays. A lookup returns the entry sharing the longest common prefix with a prompt's
keys and that prefix's length: only the rest of the prompt is prefilled. On disk, entries are namespaced by
the bundle's sha256 (a directory per bundle) and carry it in their header (edgevlm/diskcache.py).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .diskcache import DiskStore
from .decoders.base import common_prefix

KV = list[tuple[np.ndarray, np.ndarray]]


# an image state's arrays besides rows and kv: a tiled image's [tile rows, tile cols, rows per tile]; a video frame's
# row-end row (edgevlm.media)
_EXTRA = ("layout", "row_end")


def nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return 128  # an image key
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class LRU:
    """An ordered map bounded in bytes (numpy arrays counted); the least recently used entries go first.
    Thread-safe: a server's worker threads share one VLM."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._d: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def get(self, key, default=None):
        with self._lock:
            item = self._d.get(key)
            if item is None:
                return default
            self._d.move_to_end(key)
            return item[0]

    def put(self, key, value) -> bool:
        """Insert (or refresh); False when the value alone exceeds the bound (then it is not kept)."""
        size = nbytes(value)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            self._d[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, s) = self._d.popitem(last=False)
                self.bytes -= s
            return True

    def pop(self, key) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key) -> None:
        item = self._d.pop(key, None)
        if item is not None:
            self.bytes -= item[1]

    def items(self):
        with self._lock:
            return [(k, v) for k, (v, _) in self._d.items()]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0


# ---- cache keys as JSON (entry headers): ints stay ints, (image, row) -> ["i", image, row], fused -> ["f", ...]


def keys_to_json(keys: Sequence) -> list:
    out = []
    for k in keys:
        if isinstance(k, tuple):
            out.append(["f", k[1], k[2]] if len(k) == 3 else ["i", k[0], k[1]])
        else:
            out.append(int(k))
    return out


def _meta(header: dict) -> dict:
    """An entry header's metadata; headers read for lookups are not verified yet, so anything may be there."""
    meta = header.get("meta")
    return meta if isinstance(meta, dict) else {}


def keys_from_json(raw: Any) -> list | None:
    if not isinstance(raw, list):
        return None
    out = []
    for k in raw:
        if isinstance(k, int) and not isinstance(k, bool):
            out.append(k)
        elif (isinstance(k, list) and len(k) == 3 and k[0] in ("i", "f") and isinstance(k[1], str)
              and isinstance(k[2], int)):
            out.append(("fused", k[1], k[2]) if k[0] == "f" else (k[1], k[2]))
        else:
            return None
    return out


def keys_digest(keys: Sequence) -> str:
    return hashlib.sha256(json.dumps(keys_to_json(keys), separators=(",", ":")).encode()).hexdigest()


def kv_arrays(kv: KV) -> dict[str, np.ndarray]:
    return {f"{t}.{i}": a for i, pair in enumerate(kv) for t, a in zip("kv", pair)}


def kv_from_arrays(arrays: dict[str, np.ndarray]) -> KV | None:
    n = len(arrays) // 2
    if set(arrays) != {f"{t}.{i}" for i in range(n) for t in "kv"}:
        return None
    return [(arrays[f"k.{i}"], arrays[f"v.{i}"]) for i in range(n)]


class Caches:
    """A VLM's caches. A prefix entry's value is a dict of arrays, opaque here: the KV arrays of an ONNX
    decoder ("k.0", "v.0", ...), or a llama.cpp sequence state ("state"). `variant` names that layout
    (entries of another variant are stale); `check_prefix(arrays, length)` and `check_image(state)` say
    whether arrays read from disk fit this model (shapes, dtypes): entries that do not are removed."""

    def __init__(self, bundle_sha: str, cache_dir=None, *, image_bytes: int = 256 << 20,
                 prefix_bytes: int = 512 << 20, disk_bytes: int = 2 << 30, aliases: int = 4096,
                 variant: str = "kv", check_prefix: Callable[[dict, int], bool] = lambda a, n: True,
                 check_image: Callable[[dict], bool] = lambda s: True):
        self.bundle_sha, self.variant = bundle_sha, variant
        self.images, self.prefixes = LRU(image_bytes), LRU(prefix_bytes)
        self.aliases = LRU(aliases << 7)  # digest of an input as given -> its image key (128 bytes each)
        self.disk = DiskStore(_bundle_dir(cache_dir, bundle_sha), bundle_sha, disk_bytes) if cache_dir else None
        self.check_prefix, self.check_image = check_prefix, check_image
        self._pending: list[tuple] = []  # disk writes kept off the TTFT path until flush()
        self._lock = threading.RLock()

    # ---- images -------------------------------------------------------------------------------------

    def get_image(self, key: str) -> tuple[dict | None, str]:
        """-> (image state, where it came from: "ram", "disk" or "")."""
        with self._lock:
            state = self.images.get(key)
            if state is not None:
                return state, "ram"
            entry = self.disk.get("image", "img-" + key) if self.disk else None
            if entry is None:
                return None, ""
            _, arrays = entry
            extra = {k: arrays.pop(k) for k in _EXTRA if k in arrays}
            state = {"rows": arrays.pop("rows", None), "kv": kv_from_arrays(arrays) if arrays else None, **extra}
            if state["rows"] is None or not self.check_image(state):
                self.disk.reject("img-" + key, "arrays do not fit this model")
                return None, ""
            self.images.put(key, state)
            return state, "disk"

    def put_image(self, key: str, state: dict) -> None:
        with self._lock:
            self.images.put(key, state)
            if self.disk is not None:
                self._pending.append(("image", key, state))

    # ---- prefixes -----------------------------------------------------------------------------------

    def lookup_prefix(self, keys: Sequence, at_least: int = 0) -> tuple[int, dict | None, str, tuple]:
        """The entry sharing the longest prefix with keys: (that length, its arrays, "ram"/"disk", its keys),
        or (0, None, "", ()) when none shares more than at_least positions. The length stops one short of
        len(keys), so the prompt's last position always runs (its logits are needed). The arrays cover the
        entry's whole keys: the caller keeps the first `length` positions."""
        limit = len(keys) - 1
        with self._lock:
            best, best_key = at_least, None
            for stored, _ in self.prefixes.items():
                n = min(common_prefix(stored, keys), limit)
                if n > best:
                    best, best_key = n, stored
            if best_key is not None:
                return best, self.prefixes.get(best_key), "ram", best_key  # get: refreshes its LRU place
            if self.disk is None:
                return 0, None, "", ()
            candidates = []
            for name, header in self.disk.headers("kv-").items():
                stored = keys_from_json(_meta(header).get("keys"))
                if stored is not None:
                    candidates.append((min(common_prefix(stored, keys), limit), name))
            for n, name in sorted(candidates, reverse=True):
                if n <= best:
                    break
                entry = self.disk.get("prefix", name)
                if entry is None:
                    continue
                meta, arrays = entry
                stored = keys_from_json(meta.get("keys"))
                if meta.get("variant") != self.variant:
                    self.disk.reject(name, f"a {meta.get('variant')!r} entry, this decoder reads {self.variant!r} (stale)")
                    continue
                if stored is None or name != "kv-" + keys_digest(stored) or not self.check_prefix(arrays, len(stored)):
                    self.disk.reject(name, "keys or arrays do not fit this model")
                    continue
                n = min(common_prefix(stored, keys), limit)  # from the verified header this time
                if n <= best:
                    continue
                self.prefixes.put(tuple(stored), arrays)
                return n, arrays, "disk", tuple(stored)
        return 0, None, "", ()

    def put_prefix(self, keys: Sequence, arrays: dict[str, np.ndarray]) -> None:
        """Keep (keys, arrays); entries it extends are dropped (it serves every prompt they serve)."""
        keys = tuple(keys)
        if not keys:
            return
        arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
        with self._lock:
            for stored, _ in self.prefixes.items():
                if len(stored) >= len(keys) and stored[:len(keys)] == keys:
                    self.prefixes.get(stored)
                    return  # already covered by a longer entry
                if stored == keys[:len(stored)]:
                    self.prefixes.pop(stored)
            self.prefixes.put(keys, arrays)
            if self.disk is not None:
                self._pending.append(("prefix", keys, arrays))

    # ---- disk writes, stats -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the pending disk entries (called after the first token, never before it)."""
        with self._lock:
            pending, self._pending = self._pending, []
            for kind, key, value in pending:
                if self.disk is None or not self.disk.enabled:
                    return
                try:
                    if kind == "image":
                        arrays = {"rows": value["rows"], **(kv_arrays(value["kv"]) if value.get("kv") else {})}
                        arrays.update({k: value[k] for k in _EXTRA if k in value})
                        self.disk.put("image", "img-" + key, {}, arrays)
                    else:
                        self._put_prefix_disk(key, value)
                except TypeError as e:  # an array the entry format does not hold (dtype): keep it in RAM only
                    self.disk.disable(e)

    def _put_prefix_disk(self, keys: tuple, arrays: dict[str, np.ndarray]) -> None:
        headers = self.disk.headers("kv-")
        for name, header in headers.items():
            stored = keys_from_json(_meta(header).get("keys"))
            if stored is None:
                continue
            if len(stored) >= len(keys) and tuple(stored[:len(keys)]) == keys:
                return  # a longer entry on disk already covers it
        meta = {"keys": keys_to_json(keys), "variant": self.variant}
        if self.disk.put("prefix", "kv-" + keys_digest(keys), meta, arrays):
            for name, header in headers.items():  # drop the entries the new one extends
                stored = keys_from_json(_meta(header).get("keys"))
                if stored is not None and len(stored) < len(keys) and tuple(stored) == keys[:len(stored)]:
                    self.disk.remove(name)

    def stats(self) -> dict[str, int]:
        """Entry counts and bytes of each tier (the disk figures only when a cache_dir is set)."""
        out = {"image_entries": len(self.images), "image_ram_bytes": self.images.bytes,
               "prefix_entries": len(self.prefixes), "prefix_ram_bytes": self.prefixes.bytes}
        if self.disk is not None:
            out.update(disk_bytes=self.disk.size_bytes(), disk_enabled=int(self.disk.enabled),
                       disk_hits=self.disk.hits, disk_rejected=self.disk.rejected, disk_writes=self.disk.writes)
        return out

    def clear(self, disk: bool = False) -> None:
        """Empty the RAM tiers (and the disk tier's entries of this bundle, with disk=True)."""
        with self._lock:
            self.images.clear()
            self.prefixes.clear()
            self.aliases.clear()
            self._pending.clear()
            if disk and self.disk is not None and self.disk.enabled:
                for name in self.disk.headers(""):
                    self.disk.remove(name)


def _bundle_dir(cache_dir, bundle_sha: str) -> Path:
    return Path(cache_dir).expanduser() / bundle_sha[:32]

