"""`load()` and the VLM object: a verified bundle with its graphs open, its decoder chosen by the manifest, and
warmed up. The stages a Chat runs (edgevlm/generate.py) are public methods here: image_state, prompt_ids,
cache_keys, prompt, and the decoder (edgevlm/decoders) with its reuse / prefill / step."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from . import cpu, media, pipeline
from . import limits as limits_mod
from .backends.onnx import OnnxGraph, ProviderSpec, resolve_providers
from .bundle import Bundle, open_bundle
from .cache import Caches
from .contract import check_graphs
from .decoders import Prompt, State, open_decoder
from .errors import ArgumentError, BundleError, EdgeVLMError
from .generate import Chat, Response
from .image import load_image
from .image_side import ImageSide
from .limits import DEFAULT as DEFAULT_LIMITS, Limits
from .prompt import Prompter, load_tokenizer
from .sampling import make_sampler

DEFAULT_BUNDLE = Path(__file__).parent / "assets" / "shapes-fastvlm"


class VLM(ImageSide):
    def __init__(self, bundle: Bundle, providers: Sequence[ProviderSpec] | None = None, threads: int = 0,
                 warmup: bool = True, cache_dir: str | os.PathLike | None = None, cache_bytes: dict | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self.bundle, self.threads, self.limits = bundle, threads, limits
        self.manifest = m = bundle.manifest
        limits_mod.check_bundle(m, limits)  # before any graph or array is sized by the manifest
        cpu.check_int8(m, bundle.sha256)
        self.graphs = _open_graphs(bundle, providers, threads)
        raw = bundle.read(m.tokenizer.file)
        self.tokenizer = load_tokenizer(raw, m.tokenizer.file)
        self.prompter = Prompter(self.tokenizer, raw.decode("utf-8"), m, limits)
        check_graphs(m, {k: g for k, g in self.graphs.items() if isinstance(g, OnnxGraph)})
        if m.is_static:  # fixed-shape graphs: the embedder pads to whole chunks, pre-fusion runs over a static cache
            from .backends.static_kv import StaticEmbed, StaticKVGraph

            self.graphs["embed"] = StaticEmbed(self.graphs["embed"], m.components["embed"].static.chunk)
            if m.fusion == "prefusion":
                c = m.components["prefusion"]
                self.graphs["prefusion"] = StaticKVGraph(self.graphs["prefusion"], c.kv, c.num_layers, c.static, "fused")
        self.vision, self.embedder = self.graphs["vision"], self.graphs.get("embed")
        if m.fusion == "prefusion":
            self.compressor, self.prefusion = self.graphs["compressor"], self.graphs["prefusion"]
            self.prefusion_kv = m.components["prefusion"].kv
            self.prefusion_layers = m.components["prefusion"].num_layers
        n_ctx = limits_mod.context_for_memory(m, m.generation.context_length, limits)
        self.decoder = open_decoder(m, bundle, self.graphs, self.embed_ids, threads, n_ctx)
        self._pre_key = json.dumps(dataclasses.asdict(m.preprocess), sort_keys=True) + m.components["vision"].sha256
        if m.image_layout is not None:
            self._pre_key += json.dumps(dataclasses.asdict(m.image_layout), sort_keys=True)
        self.budget_method = "hybrid"  # how max_image_tokens picks rows (edgevlm.budget.METHODS)
        self.caches = self.new_caches(cache_dir, **(cache_bytes or {}))
        self.placeholder_ids = np.asarray([m.image_token_id] + ([m.video.token_id] if m.video else []), np.int64)
        self._row_shape: tuple | None = None  # of an image's rows, once one was encoded (checks disk entries)
        self._token_table = None  # structured output's view of the tokenizer, made on first use
        if warmup:
            self._warmup()

    # ---- public API --------------------------------------------------------------------------------

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers each graph actually runs on."""
        return {name: g.providers for name, g in self.graphs.items()}

    @property
    def context_length(self) -> int:
        """Positions a prompt and its answer may take (the manifest's, cut to the KV memory cap; llama.cpp:
        what it allocated; a static bundle: its cache's capacity)."""
        return self.decoder.n_ctx

    def chat(self, system: str | None = None) -> Chat:
        return Chat(self, system=system)

    def stream(self, image, prompt, **kwargs) -> Iterator[Response]:
        """One answer about an image, a list of images (in that order, before the prompt) or none (video=: a
        video), a Response per token. prompt may also be a list of parts: text, images, edgevlm.Video."""
        if isinstance(prompt, str):
            return self.chat().stream(prompt, images=_listed(image), **kwargs)
        if image is not None:
            raise ArgumentError("with a prompt of parts, the images go among the parts (pass image=None)")
        return self.chat().stream(prompt, **kwargs)

    def generate(self, image, prompt, **kwargs) -> str:
        return "".join(r.text for r in self.stream(image, prompt, **kwargs))

    def prepare(self, image) -> str:
        """Pre-encode an image or an edgevlm.Video (e.g. while the user types): everything that depends only on the
        image (each frame) is computed and cached (RAM, and disk with cache_dir). Returns its cache key."""
        from .video import Video

        if isinstance(image, Video):
            key = media.video_item(self, image, None, None, {})[0].key
        else:
            key = self.image_state(image)[0]
        self.caches.flush()
        return key

    def new_caches(self, cache_dir: str | os.PathLike | None = None, **bounds) -> Caches:
        """Empty caches for this model (RAM LRUs; a disk tier under cache_dir). Bounds in bytes:
        image_bytes, prefix_bytes, disk_bytes."""
        return Caches(self.bundle.sha256, cache_dir, variant=self.decoder.entry_variant or "none",
                      check_prefix=self.decoder.entry_fits, check_image=self._image_fits, **bounds)

    def token_table(self):
        """The tokenizer as structured output's grammar engine reads it (built on first use, then kept)."""
        if self._token_table is None:
            from .constrain import TokenTable

            m = self.manifest
            self._token_table = TokenTable(self.prompter.raw, m.vocab_size, m.generation.eos_token_ids)
        return self._token_table

    def with_graphs(self, graphs: dict[str, bytes], threads: int = 1) -> "VLM":
        """A VLM sharing this one's bundle, tokenizer and manifest with the named ONNX graphs replaced (given as
        bytes), a decoder of its own and empty caches: how quantization measures a candidate in memory."""
        out = object.__new__(VLM)
        out.__dict__.update(self.__dict__)
        out.graphs = dict(self.graphs)
        for name, model in graphs.items():
            out.graphs[name] = OnnxGraph(name, model, threads=threads)
        if self.manifest.is_static:
            from .backends.static_kv import StaticEmbed, StaticKVGraph  # (re-wrap the fixed-shape graphs)

            if "embed" in graphs:
                out.graphs["embed"] = StaticEmbed(out.graphs["embed"], self.manifest.components["embed"].static.chunk)
            if "prefusion" in graphs:
                c = self.manifest.components["prefusion"]
                out.graphs["prefusion"] = StaticKVGraph(out.graphs["prefusion"], c.kv, c.num_layers, c.static, "fused")
        out.vision, out.embedder = out.graphs["vision"], out.graphs.get("embed")
        if self.manifest.fusion == "prefusion":
            out.compressor, out.prefusion = out.graphs["compressor"], out.graphs["prefusion"]
        out.decoder = open_decoder(self.manifest, self.bundle, out.graphs, out.embed_ids, threads, self.context_length)
        out.caches = out.new_caches()
        return out

    @contextmanager
    def recording(self) -> Iterator[dict[str, list[dict]]]:
        """Every ONNX graph's feeds (copies) while the body runs, per component; the decoder runs on plain KV
        arrays meanwhile, so its feeds hold the KV as inputs (quantization calibrates on them)."""
        feeds = {name: [] for name, g in self.graphs.items() if isinstance(g, OnnxGraph)}
        inplace = getattr(self.decoder, "inplace", None)
        try:
            for name in feeds:
                self.graphs[name].tap = feeds[name]
            if inplace is not None:
                self.decoder.inplace = False
            yield feeds
        finally:
            for name in feeds:
                self.graphs[name].tap = None
            if inplace is not None:
                self.decoder.inplace = inplace

    # ---- the stages a Chat runs ----------------------------------------------------------------------

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:  # [S] int64 -> [S, D] text embeds
        return pipeline.embed(self.embedder, ids)

    def prompt_ids(self, messages: list[dict], states: list[dict] | None = None, n_images: int = 0) -> np.ndarray:
        """Token ids of the rendered prompt, each image (or video) marker expanded to its placeholder text (from
        states, in the messages' order; without states, n_images images of image_tokens placeholders)."""
        return self.render(messages, states, n_images)[0]

    def render(self, messages: list[dict], states: list[dict] | None = None,
               n_images: int = 0) -> tuple[np.ndarray, list[int]]:
        """(token ids, the order the states' rows take in the prompt: indices into states). A template may place
        media in another order than the messages hold them (LLaVA-OneVision: images, then videos, then text)."""
        m = self.manifest
        fills, owner = [], []
        for i, s in enumerate(states or [(None,)] * n_images):
            f = media.fills(self, s) if states else [(m.image_token, m.image_token * m.image_tokens)]
            fills += f
            owner += [i] * len(f)
        placed: list[int] = []
        ids = self.prompter.ids(messages, fills, placed)
        order = list(dict.fromkeys(owner[j] for j in placed))
        if [owner[j] for j in placed] != [i for i in order for _ in range(owner.count(i))]:
            raise EdgeVLMError("the chat template splits one video's frames between other images: send it alone")
        rows = sum(s["rows"].shape[0] for s in states) if states else n_images * m.image_tokens
        if int(np.isin(ids, self.placeholder_ids).sum()) != rows:
            raise BundleError("the tokenizer does not map the image token to image_token_id")
        return ids, order

    def cache_keys(self, ids: np.ndarray, images: list[str], states: list[dict] | None = None) -> list:
        """The prompt's cache keys (images and states in the prompt's order): image placeholders become (image
        key, row), so two images never share a cached prefix; with pre-fusion the text depends on the image too:
        ("fused", image key, id)."""
        m = self.manifest
        if m.fusion == "prefusion" and len(images) > 1:
            raise EdgeVLMError(media.ONE_FOR_PREFUSION)
        keys, rows = ids.tolist(), np.nonzero(np.isin(ids, self.placeholder_ids))[0]
        if m.fusion == "prefusion" and images:
            keys = [("fused", images[0], k) for k in keys]
        counts = [s["rows"].shape[0] for s in states] if states else [m.image_tokens] * len(images)
        owner = np.repeat(np.arange(len(images)), counts)  # placeholder j belongs to image owner[j]
        starts = np.cumsum([0] + counts[:-1])
        for j, r in enumerate(rows):
            keys[r] = (images[owner[j]], int(j - starts[owner[j]]))
        return keys

    def prompt(self, ids: np.ndarray, keys: list, states: dict[str, dict], stages: dict | None = None) -> Prompt:
        """The prompt as a decoder takes it (embeddings computed on demand, timed into stages)."""
        stages = {} if stages is None else stages

        def rows(image_keys: list) -> np.ndarray:  # [(image key, row), ...] -> [n, D]
            return np.stack([states[k[0]]["rows"][k[1]] for k in image_keys])

        def embed(ids_: np.ndarray, keys_: list, start: int) -> np.ndarray:
            t = time.perf_counter()
            x = self._prompt_embeds(ids_, keys_, states, start, stages)
            stages["embed"] = stages.get("embed", 0.0) + time.perf_counter() - t - stages.pop("_fused", 0.0)
            return x

        return Prompt(ids, keys, embed, rows)

    def remember(self, state: State) -> None:
        """Offer a chat's KV to the prefix cache, then write pending disk entries (after the first token)."""
        entry = self.decoder.entry(state) if state.keys else None
        if entry is not None:
            self.caches.put_prefix(state.keys, entry)
        self.caches.flush()

    def prompt_logits(self, image, prompt: str, max_image_tokens: int | None = None) -> np.ndarray:
        """Logits [V] after a fresh one-turn prompt about an image, a list of images or none (or a prompt of parts,
        image None); nothing reused (parity checks)."""
        parts = media.parts_of(prompt, images=_listed(image)) if isinstance(prompt, str) else media.parts_of(prompt)
        self.decoder.reset()
        return self.chat()._begin(parts, max_image_tokens, {}, reuse=False)[0]

    def _prompt_embeds(self, ids: np.ndarray, keys: list, states: dict[str, dict], start: int,
                       stages: dict) -> np.ndarray:
        """Embeds [S - start, D] of the prompt from position start on: text, fused text, image rows."""
        m = self.manifest
        image_keys = list(dict.fromkeys(k[0] for k in keys if isinstance(k, tuple) and len(k) == 2))
        if m.fusion == "prefusion" and image_keys:
            text, state = pipeline.embed(self.embedder, ids), states[image_keys[0]]
            t = time.perf_counter()  # the text attends (causally) after the image's cached pre-fusion prefix
            frames = state.get("frames_kv") or [state["kv"]]  # a video: fused with each frame, averaged
            x = sum(pipeline.prefuse(self.prefusion, self.prefusion_kv, text, kv)[start:] for kv in frames)
            x = x / np.float32(len(frames)) if len(frames) > 1 else x
            took = time.perf_counter() - t
            stages["prefusion"] = stages.get("prefusion", 0.0) + took
            stages["_fused"] = stages.get("_fused", 0.0) + took  # not embedding time: prompt() subtracts it
        else:
            x = pipeline.embed(self.embedder, ids[start:])
        rows = np.nonzero(np.isin(ids[start:], self.placeholder_ids))[0]
        if rows.size:
            picked = [states[keys[start + r][0]]["rows"][keys[start + r][1]] for r in rows]
            x = pipeline.splice(x, rows, np.stack(picked))
        return x

    def _warmup(self) -> None:
        """Run every graph once (ONNX Runtime and llama.cpp allocate on a graph's first run), caching nothing;
        the decoder warms itself (the ONNX one ran at construction: its in-place KV probe)."""
        self._encode(self._blank_pixels(), {})  # vision (+ compressor and pre-fusion prefix)
        make_sampler(temperature=1.0, seed=0)  # host-side first calls: numpy.random's import, Pillow's format
        png = io.BytesIO()  # plugins, the chat template's compilation
        Image.new("RGB", (8, 8)).save(png, "PNG")
        load_image(png.getvalue())
        try:
            self.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], None, 1)
        except EdgeVLMError:
            pass  # a template without images: its first real call says so
        self.decoder.warmup()


def _listed(image) -> list:
    """An image, a list of images, or None -> a list."""
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


def _open_graphs(bundle: Bundle, providers, threads: int) -> dict:
    """Every component but a GGUF decoder (llama.cpp opens its own file): ONNX graphs from their verified bytes
    (or by path when weights are external), CoreML programs by path."""
    graphs = {}
    providers = resolve_providers(providers) if providers else None  # once: a missing provider is named once
    for name, comp in bundle.manifest.components.items():
        if comp.backend == "gguf":
            if name != "decoder":
                raise BundleError(f"component {name!r}: only the decoder can run on the gguf backend")
            continue
        if comp.backend == "coreml":
            from .backends.coreml import CoremlGraph

            graphs[name] = CoremlGraph(name, bundle, comp)
            continue
        if comp.data_files:  # weights outside the graph file: ONNX Runtime reads them by path (hashed at open)
            source = str(bundle.path(comp.file))
        else:
            source = bundle.read(comp.file)
        # only the decoder, run step after step, keeps its threads spinning between runs (see OnnxGraph)
        graphs[name] = OnnxGraph(name, source, providers, threads, spin=name == "decoder",
                                 base_dir=str(bundle.path(comp.file).parent))
    return graphs


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
