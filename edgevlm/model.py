"""`load()` and the VLM object: a verified bundle with its graphs open and warmed up."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from . import cpu, pipeline
from . import limits as limits_mod
from .limits import DEFAULT as DEFAULT_LIMITS, Limits
from .pipeline import common_prefix
from .backends.onnx import OnnxGraph, ProviderSpec
from .bundle import Bundle, open_bundle
from .cache import Caches, kv_arrays, kv_from_arrays
from .contract import check_graphs
from .errors import ArgumentError, BundleError, EdgeVLMError
from .generate import Chat, Response
from .image_side import ImageSide
from .prompt import Prompter, load_tokenizer
from .image import load_image
from .sampling import make_sampler

DEFAULT_BUNDLE = Path(__file__).parent / "assets" / "shapes-fastvlm"
GGUF_MAX_CONTEXT = 8192  # llama.cpp allocates the whole KV cache up front: cap what a long-context model asks


class VLM(ImageSide):
    def __init__(self, bundle: Bundle, providers: Sequence[ProviderSpec] | None = None, threads: int = 0,
                 warmup: bool = True, cache_dir: str | os.PathLike | None = None, cache_bytes: dict | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self.bundle = bundle
        self.threads = threads
        self.manifest = m = bundle.manifest
        self.limits = limits
        limits_mod.check_bundle(m, limits)  # before any graph or array is sized by the manifest
        cpu.check_int8(m, bundle.sha256)
        self.graphs: dict[str, OnnxGraph] = {}
        self.lm = None  # a GgufDecoder when the manifest places the decoder in llama.cpp
        for name, comp in m.components.items():
            if comp.backend == "gguf":
                if name != "decoder":
                    raise BundleError(f"component {name!r}: only the decoder can run on the gguf backend")
                from .backends.gguf import GgufDecoder

                self.lm = GgufDecoder(name, bundle.read(comp.file), str(bundle.path(comp.file)),
                                      n_ctx=min(m.generation.context_length, GGUF_MAX_CONTEXT), threads=threads, kv_f32=comp.precision == "fp32")
                continue
            if comp.backend == "coreml":
                from .backends.coreml import CoremlGraph

                self.graphs[name] = CoremlGraph(name, bundle, comp)  # the decoder becomes self.lm below
                continue
            if comp.data_files:  # weights outside the graph file: ONNX Runtime reads them by path
                for f in [comp.file] + [r.file for r in comp.data_files]:
                    bundle.read(f)  # verified already; drop the in-memory copy
                source = str(bundle.path(comp.file))
            else:
                source = bundle.read(comp.file)
            # only the decoder, run step after step, keeps its threads spinning between runs (see OnnxGraph)
            self.graphs[name] = OnnxGraph(name, source, providers, threads, spin=name == "decoder",
                                          base_dir=str(bundle.path(comp.file).parent))
        raw = bundle.read(m.tokenizer.file)
        self.tokenizer = load_tokenizer(raw, m.tokenizer.file)
        self.prompter = Prompter(self.tokenizer, raw.decode("utf-8"), m, limits.prompt_chars)
        check_graphs(m, {k: g for k, g in self.graphs.items() if isinstance(g, OnnxGraph)})
        self.vision, self.embedder = self.graphs["vision"], self.graphs.get("embed")
        if m.components["decoder"].backend == "coreml":  # stateful program: the KV cache lives in CoreML state
            from .backends.coreml import CoremlDecoder

            self.lm = CoremlDecoder(self.graphs.pop("decoder"), lambda ids: pipeline.embed(self.embedder, ids),
                                    m.generation.context_length, int(m.components["decoder"].outputs["logits"][-1]))
        self.decoder = self.lm or self.graphs["decoder"]
        self.kv_spec = m.components["decoder"].kv
        self.num_layers = m.components["decoder"].num_layers
        if m.fusion == "prefusion":
            self.compressor, self.prefusion = self.graphs["compressor"], self.graphs["prefusion"]
            self.prefusion_kv = m.components["prefusion"].kv
            self.prefusion_layers = m.components["prefusion"].num_layers
        if m.is_static:  # NPU-ready bundle: fixed-shape graphs, the decoder over a fixed-capacity KV cache
            from .backends.static_kv import bind

            bind(self)
        self._pre_key = json.dumps(dataclasses.asdict(m.preprocess), sort_keys=True) + m.components["vision"].sha256
        if m.image_layout is not None:
            self._pre_key += json.dumps(dataclasses.asdict(m.image_layout), sort_keys=True)
        self.budget_method = "hybrid"  # how max_image_tokens picks rows (edgevlm.budget.METHODS)
        self.caches = self.new_caches(cache_dir, **(cache_bytes or {}))
        self._row_shape: tuple | None = None  # of an image's rows, once one was encoded (checks disk entries)
        self.kv_inplace = self.lm is None and self._kv_inplace_works()
        if warmup:
            self._warmup()

    # ---- public API --------------------------------------------------------------------------------

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers each graph actually runs on."""
        return {name: g.providers for name, g in self.graphs.items()}

    def chat(self, system: str | None = None) -> Chat:
        return Chat(self, system=system)

    def stream(self, image, prompt: str, **kwargs) -> Iterator[Response]:
        """One answer about one image (or none), a Response per token."""
        return self.chat().stream(prompt, image=image, **kwargs)

    def generate(self, image, prompt: str, **kwargs) -> str:
        return "".join(r.text for r in self.stream(image, prompt, **kwargs))

    def prepare(self, image) -> str:
        """Pre-encode an image (e.g. while the user types): everything that depends only on the image is
        computed and cached (RAM, and disk with cache_dir). Returns its cache key."""
        key = self._image_embeds(image)[0]
        self.caches.flush()
        return key

    def new_caches(self, cache_dir: str | os.PathLike | None = None, **bounds) -> Caches:
        """Empty caches for this model (RAM LRUs; a disk tier under cache_dir). Bounds in bytes:
        image_bytes, prefix_bytes, disk_bytes."""
        return Caches(self.bundle.sha256, cache_dir, variant=self._prefix_variant(), check_prefix=self._prefix_fits,
                      check_image=self._image_fits, **bounds)

    # ---- stages used by Chat (the image side, an image -> its cached state, is in edgevlm/image_side.py) ----

    # ---- the prefix KV cache: ONNX KV arrays, or a llama.cpp sequence state (GGUF); CoreML keeps none -----

    def _prefix_variant(self) -> str:
        if self.lm is None:
            return "onnx-kv"
        return getattr(self.lm, "state_variant", "none")

    def _prefix_fits(self, arrays: dict, length: int) -> bool:
        if self.lm is None:
            kv = kv_from_arrays(arrays)
            return kv is not None and len(kv) == self.num_layers and pipeline.kv_ok(kv, self.kv_spec, length)
        state = arrays.get("state")
        return len(arrays) == 1 and state is not None and state.dtype == np.uint8 and state.ndim == 1

    def _find_prefix(self, keys: list, own_keys: list, own_kv) -> tuple[int, object, str]:
        """Where the prompt's KV can start: (positions reused, kv, from where: "chat" (this chat's own KV),
        "ram"/"disk" (the prefix cache), or "" (nothing)). A GGUF decoder's context may hold a longer
        prefix still (another chat's): _prefill checks that."""
        reuse = min(common_prefix(own_keys, keys), len(keys) - 1)
        if own_kv is not None:  # a run that failed midway left its KVBuffer valid only up to where it started
            reuse = min(reuse, pipeline.kv_length(own_kv))
        if self.lm is None:
            n, arrays, where, _ = self.caches.lookup_prefix(keys, at_least=reuse)
            if arrays is not None:
                return n, kv_from_arrays(arrays), where  # _prefill keeps its first n positions
        elif hasattr(self.lm, "state_variant"):
            held = min(self.lm.common_prefix(keys), len(keys) - 1)
            n, arrays, where, stored = self.caches.lookup_prefix(keys, at_least=max(reuse, held))
            if arrays is not None and self.lm.restore(arrays["state"], stored):
                self.lm.trim(n)
                return n, None, where
        return reuse, own_kv, "chat" if reuse else ""

    def _remember(self, keys: list, kv) -> None:
        """Offer a decoder KV (the positions `keys`) to the prefix cache, then write pending disk entries."""
        if keys and self.lm is None:  # a KVBuffer runs on: the cache gets a copy
            self.caches.put_prefix(keys, kv_arrays(kv.copy() if isinstance(kv, pipeline.KVBuffer) else kv))
        elif keys and hasattr(self.lm, "state_variant") and self.lm.keys == keys:  # GGUF (CoreML keeps none)
            self.caches.put_prefix(keys, {"state": self.lm.state()})
        self.caches.flush()

    def _prompt_embeds(self, ids: np.ndarray, keys: list, states: dict[str, dict], start: int,
                       stages: dict | None = None) -> np.ndarray:
        """Embeds [S - start, D] of the prompt from position start on: text, fused text, image rows."""
        m = self.manifest
        image_keys = list(dict.fromkeys(k[0] for k in keys if isinstance(k, tuple) and len(k) == 2))
        if m.fusion == "prefusion" and image_keys:
            text, state = pipeline.embed(self.embedder, ids), states[image_keys[0]]
            t = time.perf_counter()  # the text attends (causally) after the image's cached pre-fusion prefix
            x = pipeline.prefuse(self.prefusion, self.prefusion_kv, text, state["kv"])[start:]
            if stages is not None:
                stages["prefusion"] = stages.get("prefusion", 0.0) + time.perf_counter() - t
        else:
            x = pipeline.embed(self.embedder, ids[start:])
        rows = np.nonzero(ids[start:] == m.image_token_id)[0]
        if rows.size:
            picked = [states[keys[start + r][0]]["rows"][keys[start + r][1]] for r in rows]
            x = pipeline.splice(x, rows, np.stack(picked))
        return x

    def _prompt_ids(self, messages: list[dict], n_images: int, states: list[dict] | None = None) -> np.ndarray:
        """Token ids of the rendered prompt, each image marker expanded to its image's placeholder text
        (from states[i]; without states, image_tokens placeholders)."""
        m = self.manifest
        fills = [self._placeholder(s) for s in states] if states else [m.image_token * m.image_tokens] * n_images
        ids = self.prompter.ids(messages, fills)
        rows = sum(s["rows"].shape[0] for s in states) if states else n_images * m.image_tokens
        if int((ids == m.image_token_id).sum()) != rows:
            raise BundleError("the tokenizer does not map the image token to image_token_id")
        return ids

    def _keys_for(self, ids: np.ndarray, images: list[str], states: list[dict] | None = None) -> list:
        # image placeholders become (image key, row): two images never share a cached prefix; with pre-fusion
        # the text depends on the image too, so its positions become ("fused", image key, id)
        m = self.manifest
        if m.fusion == "prefusion" and len(images) > 1:
            raise EdgeVLMError("a pre-fusion (LLaVA-Mini) bundle takes one image per conversation: start a new chat")
        keys, rows = ids.tolist(), np.nonzero(ids == m.image_token_id)[0]
        if m.fusion == "prefusion" and images:
            keys = [("fused", images[0], k) for k in keys]
        counts = [s["rows"].shape[0] for s in states] if states else [m.image_tokens] * len(images)
        owner = np.repeat(np.arange(len(images)), counts)  # placeholder j belongs to image owner[j]
        starts = np.cumsum([0] + counts[:-1])
        for j, r in enumerate(rows):
            keys[r] = (images[owner[j]], int(j - starts[owner[j]]))
        return keys

    def _embed_one(self, token: int) -> np.ndarray:
        return pipeline.embed(self.embedder, np.asarray([token], np.int64))

    # ---- the language model, on ONNX Runtime (kv: arrays) or llama.cpp (kv: None, the cache is in there) ----

    @property
    def context_length(self) -> int:
        """Positions a prompt and its answer may take: the manifest's, cut to what the KV memory cap allows
        (llama.cpp: the context it allocated)."""
        if self.lm:
            return self.lm.n_ctx
        return limits_mod.context_for_memory(self.manifest, self.manifest.generation.context_length, self.limits)

    def _empty_kv(self):
        return None if self.lm else pipeline.empty_kv(self.kv_spec, self.num_layers)

    def _kv_inplace_works(self) -> bool:
        """Whether the decoder graph extends a KVBuffer in place (GroupQueryAttention: export/gqa.py's graphs)
        and answers as with plain past/present arrays: two prompt positions, then one step, each way (which
        also warms the decoder up; it runs at every load)."""
        x = pipeline.embed(self.embedder, np.asarray([1, 2, 3], np.int64))
        buf = pipeline.KVBuffer(self.kv_spec, self.num_layers, 4, self.context_length)
        try:
            got = [pipeline.forward(self.decoder, self.kv_spec, x[:2], buf, quiet=True)[0]]
            got.append(pipeline.forward(self.decoder, self.kv_spec, x[2:], buf, quiet=True)[0])
        except EdgeVLMError:
            return False  # e.g. a torch.onnx graph's present is past + new: it refuses the bound buffer
        want, kv = pipeline.forward(self.decoder, self.kv_spec, x[:2], pipeline.empty_kv(self.kv_spec, self.num_layers))
        want = [want, pipeline.forward(self.decoder, self.kv_spec, x[2:], kv)[0]]
        return all(np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want))

    @staticmethod
    def _cut_kv(kv, reuse: int):
        """The KV with its first `reuse` positions kept: a chat's own KVBuffer is cut back in place (it is that
        chat's alone); plain arrays (a prefix-cache hit, a new chat) are sliced, and the prompt runs on them as
        before — the KV moves into a buffer at the first decode step, after the first token."""
        if isinstance(kv, pipeline.KVBuffer):
            kv.length = min(kv.length, reuse)
            return kv
        return pipeline.trim_kv(kv, reuse)

    def _as_buffer(self, kv):
        """Plain KV arrays -> a KVBuffer holding them, with room to grow (the decoder extends it in place)."""
        if not self.kv_inplace or isinstance(kv, pipeline.KVBuffer):
            return kv
        n = pipeline.kv_length(kv)
        buf = pipeline.KVBuffer(self.kv_spec, self.num_layers, max(256, n * 3 // 2), self.context_length)
        buf.load(kv, n)
        return buf

    def _prefill(self, ids: np.ndarray, keys: list, states: dict, reuse: int, kv, stages: dict):
        """Run the prompt after its first `reuse` positions -> (logits [V], kv, positions actually reused)."""
        t, fused = time.perf_counter(), stages.get("prefusion", 0.0)
        if self.lm is None:
            x = self._prompt_embeds(ids, keys, states, reuse, stages)
            stages["embed"] = time.perf_counter() - t - (stages.get("prefusion", 0.0) - fused)
            t = time.perf_counter()
            logits, kv = pipeline.forward(self.decoder, self.kv_spec, x, self._cut_kv(kv, reuse))
            stages["prefill"] = time.perf_counter() - t
            return logits, kv, reuse
        # llama.cpp: the decoder's own record of its cache decides the reuse (another chat may have used it)
        lm = self.lm
        reuse = min(lm.common_prefix(keys), len(keys) - 1)
        lm.trim(reuse)
        if self.manifest.fusion == "prefusion" or getattr(lm, "takes_embeds", False):
            x = self._prompt_embeds(ids, keys, states, reuse, stages)
            stages["embed"] = time.perf_counter() - t - (stages.get("prefusion", 0.0) - fused)
            t = time.perf_counter()
            lm.eval_embeds(x, keys[reuse:])
        else:
            stages["embed"] = time.perf_counter() - t
            t = time.perf_counter()
            is_img = ids == self.manifest.image_token_id
            edges = [reuse] + [i for i in range(reuse + 1, len(ids)) if is_img[i] != is_img[i - 1]] + [len(ids)]
            for a, b in zip(edges, edges[1:]):  # text runs as tokens, image runs as embedding rows
                if is_img[a]:
                    lm.eval_embeds(np.stack([states[k[0]]["rows"][k[1]] for k in keys[a:b]]), keys[a:b])
                else:
                    lm.eval_tokens(ids[a:b], keys[a:b])
        stages["prefill"] = time.perf_counter() - t
        return lm.logits(), None, reuse

    def _decode(self, token: int, kv, keys: list, states: dict):
        """One generated token after the cached `keys` -> (logits [V], kv)."""
        if self.lm is None:
            return pipeline.forward(self.decoder, self.kv_spec, self._embed_one(token), self._as_buffer(kv))
        if self.lm.keys != keys:  # another chat used the llama context meanwhile: rebuild this one's cache
            ids = np.asarray([k if isinstance(k, int) else (k[2] if len(k) == 3 else self.manifest.image_token_id)
                              for k in keys + [token]], np.int64)
            return self._prefill(ids, keys + [token], states, len(keys), None, {})[:2]
        self.lm.eval_tokens(np.asarray([token]), [token])
        return self.lm.logits(), None

    def prompt_logits(self, image, prompt: str, max_image_tokens: int | None = None) -> np.ndarray:
        """Logits [V] after a fresh one-turn prompt (parity checks)."""
        images, states = [], {}
        if image is not None:
            key, state, _, _ = self._image_embeds(image, max_image_tokens)
            images, states = [key], {key: state}
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        ids = self._prompt_ids([{"role": "user", "content": content}], len(images), list(states.values()))
        keys = self._keys_for(ids, images, list(states.values()))
        if self.lm:
            self.lm.trim(0)
        return self._prefill(ids, keys, states, 0, self._empty_kv(), {})[0]

    def _warmup(self) -> None:
        """Run every graph once (ONNX Runtime and llama.cpp allocate on a graph's first run), caching nothing."""
        self._encode(self._blank_pixels(), {})  # vision (+ compressor and pre-fusion prefix)
        make_sampler(temperature=1.0, seed=0)  # host-side first calls: numpy.random's import, Pillow's format
        png = io.BytesIO()  # plugins, the chat template's compilation
        Image.new("RGB", (8, 8)).save(png, "PNG")
        load_image(png.getvalue())
        try:
            self._prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], 1)
        except EdgeVLMError:
            pass  # a template without images: its first real call says so
        if self.lm is None:  # an ONNX decoder ran its prompt and a step in both KV forms at load (the probe)
            self._embed_one(0)
        else:
            self.lm.trim(0)
            self.lm.eval_tokens(np.asarray([0]), [None])  # key None: never reused
            if getattr(self.lm, "takes_embeds", False):  # a static decoder's prefill graph is another session
                self.lm.eval_tokens(np.asarray([0, 0]), [None, None])
            self.lm.trim(0)


def load(path: str | os.PathLike | None = None, providers: Sequence[ProviderSpec] | None = None,
         threads: int = 0, warmup: bool = True, cache_dir: str | os.PathLike | None = None,
         cache_bytes: dict | None = None, limits: Limits = DEFAULT_LIMITS) -> VLM:
    """Verify a bundle (every file's sha256 before any parser sees it), open its graphs and warm them up.

    With no path, the embedded default demo bundle is loaded. cache_dir adds a disk tier to the image and
    prefix KV caches that survives restarts (shared safely between processes); cache_bytes bounds the tiers
    ({"image_bytes": ..., "prefix_bytes": ..., "disk_bytes": ...}). limits: the caps on untrusted input
    (edgevlm.Limits: image sizes, tiles, KV memory, template budgets).
    """
    if path is None:
        path = DEFAULT_BUNDLE
        if not (path / "manifest.json").is_file():
            raise BundleError("this installation has no embedded default bundle; pass a bundle path")
    if not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"a bundle is a directory path, not a {type(path).__name__}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ArgumentError(f"threads must be a non-negative integer (0: onnxruntime decides), got {threads!r}")
    if not isinstance(limits, Limits):
        raise ArgumentError(f"limits must be an edgevlm.Limits, got {type(limits).__name__}")
    return VLM(open_bundle(path), providers=providers, threads=threads, warmup=warmup, cache_dir=cache_dir,
               cache_bytes=cache_bytes, limits=limits)
