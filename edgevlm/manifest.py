"""The bundle manifest: the one contract between export/, quant/ and the runtime.

Parsed into frozen dataclasses by a strict reader: an unknown key, a missing key or a wrong type is a
`BundleError` naming the offending path (``components.vision.sha256``), never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import BundleError
from .strict import plain, read

FORMAT_VERSION = 1  # the manifest format this runtime reads; any other is a BundleError
MAX_SIDE = 8192  # preprocess sizes (pixels)
MAX_TOKEN_ID = (1 << 31) - 1  # token ids (image_token_id, eos_token_ids) lie in [0, MAX_TOKEN_ID]
BACKENDS = ("onnx", "gguf", "coreml")  # components.*.backend
RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos")  # preprocess.resample

Shape = tuple[Union[int, str], ...]  # ints are fixed dims, strings name dynamic ones


@dataclass(frozen=True)
class FileRef:
    file: str  # a path inside the bundle (no "..", not absolute, no symlink leading out)
    sha256: str  # of the file's bytes, 64 lowercase hex digits; checked before any parser sees the file


@dataclass(frozen=True)
class KVSpec:
    past: str  # input name pattern, e.g. "past_key_values.%d.%s" (layer, "key"|"value")
    present: str  # output name pattern, e.g. "present.%d.%s"
    heads: int  # key/value heads
    head_dim: int  # size of one head's key and value vectors


@dataclass(frozen=True)
class StaticShape:
    """A fixed-shape graph (NPU-ready bundles, `edgevlm export --static`): it takes `chunk` positions per call;
    a graph with a KV cache attends over `kv_capacity` cache slots (masked by attention_mask) plus its chunk."""

    chunk: int  # positions per call (1: the one-token decoder graph)
    kv_capacity: int | None = None  # KV cache slots (None: a graph without a KV cache)


@dataclass(frozen=True)
class Component:
    backend: str  # "onnx" | "gguf" | "coreml" (BACKENDS)
    file: str  # the graph file, a path inside the bundle (a CoreML .mlpackage is a directory)
    sha256: str  # of that file
    precision: str = "fp32"  # what its weights are: fp32, fp16, int8, int4, mixed, a GGUF type (q4_k_m, ...)
    inputs: dict[str, Shape] = field(default_factory=dict)  # declared input shapes, checked against the graph at load
    outputs: dict[str, Shape] = field(default_factory=dict)  # declared output shapes, checked likewise
    data_files: tuple[FileRef, ...] = ()  # external tensor data the graph file refers to
    num_layers: int | None = None  # graphs with a KV cache (decoder, prefill, prefusion): their layers
    kv: KVSpec | None = None  # graphs with a KV cache: the names and shape of its tensors
    quant: dict[str, Any] | None = None  # by `edgevlm quant` / `export --format gguf`: levels, node counts, bytes
    static: StaticShape | None = None  # fixed-shape graphs (`edgevlm export --static`)


@dataclass(frozen=True)
class Preprocess:
    resample: str = "bicubic"  # the resize filter (RESAMPLES)
    shortest_edge: int | None = None  # resize so the short side is this, keeping aspect
    size: tuple[int, int] | None = None  # or resize to exactly (height, width)
    crop: tuple[int, int] | None = None  # centre crop (height, width) after resize
    pad_to_square: tuple[int, int, int] | None = None  # pad colour, before resize (LLaVA-1.5 "pad")
    rescale: float = 1.0 / 255.0  # pixel values are multiplied by this, then normalised: (x - mean) / std
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per channel (RGB), after rescale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per channel (RGB), after rescale; never 0
    resize_kernel: str = "torchvision"  # "torchvision" (its uint8 antialiased resize) or "pil" (Pillow's resize)


@dataclass(frozen=True)
class Generation:
    eos_token_ids: tuple[int, ...]  # an answer ends at any of these tokens
    context_length: int  # positions a conversation (prompts and answers) may take
    max_new_tokens: int = 256  # default cap on the tokens of one answer
    max_image_tokens: int | None = None  # default image-token budget per image (None: all); see edgevlm/budget.py


@dataclass(frozen=True)
class ImageLayout:
    """How one image becomes vision-graph inputs and prompt rows (edgevlm/tiling.py reads it)."""

    grid: tuple[int, int] | None = None  # the vision graph's rows for one tile form this (h, w) raster grid
    tiling: str = "none"  # "none" | "split" (tiles + a global image, Idefics3) | "anyres" (best grid, LLaVA-NeXT)
    tile_size: int = 0  # pixels per tile side (the vision graph's input)
    longest_edge: int = 0  # split: the image's longest edge is resized to this before splitting
    pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: candidate (height, width) resolutions
    global_tile: str = "last"  # where the whole image, resized to one tile, goes among the tiles: first | last
    unpad: bool = False  # anyres: drop feature rows/columns that fall in the letterbox padding
    max_tiles_area: int = 0  # anyres: grid features beyond this many tiles' worth are bilinearly shrunk (0: never)
    row_end: bool = False  # anyres: the vision graph's `row_end` output follows every feature row of the grid
    # one image's placeholder text (jinja, sandboxed): image, rows, cols (tile grid; 0, 0 if not split),
    # tile_tokens (rows per tile), tokens (all rows of the image)
    prompt: str = "{{ image * tokens }}"
    # an image of a prompt that holds several: "same" (as alone) | "one_tile" (LLaVA-OneVision: padded to a
    # square in multi_pad's colour, one tile, its rows then the row-end row once)
    multi: str = "same"
    multi_pad: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class VideoLayout:
    """How a video's sampled frames become prompt rows (edgevlm/media.py). A bundle without one takes a video as
    its frames, each an image of the message in turn."""

    marker: str  # what the chat template writes for a {"type": "video"} item
    token: str  # the placeholder token of the frames' rows (an image or a video token)
    token_id: int
    preprocess: Preprocess  # a frame -> one vision-graph input
    longest_edge: int = 0  # a frame's longest edge is first resized to this (0: straight to preprocess.size)
    pool: tuple[int, int] | None = None  # each frame's grid of rows bilinearly shrunk to this (h, w)
    row_end: bool = False  # the vision graph's row_end row once after the last frame
    # the whole video's placeholder text (jinja, sandboxed): image (token), frames, tokens (rows per frame),
    # seconds (each frame's time in the video), duration (seconds)
    prompt: str = "{{ image * (frames * tokens) }}"
    sampling: str = "uniform"  # which frames: "uniform" (i * total // n) | "spread" (linspace, 1 s kept off the ends)
    fps: float = 1.0  # frames kept per second of video by default
    max_frames: int = 64  # frames kept at most by default


@dataclass(frozen=True)
class Quant:
    scheme: str = "fp32"  # "fp32" as exported, else the `edgevlm quant --scheme` that wrote the bundle
    details: dict[str, Any] | None = None  # bytes and ratio to the source, calibration seed, fidelity, accuracy


@dataclass(frozen=True)
class Source:
    checkpoint: str = ""  # what the bundle was exported from: a directory name or a hub id
    exporter_version: str = ""  # the edgevlm version that exported it
    parity: dict[str, Any] = field(default_factory=dict)  # the export's parity figures against PyTorch


@dataclass(frozen=True)
class Manifest:
    format_version: int  # FORMAT_VERSION
    family: str  # the adapter that exported the bundle (export/adapters/); the runtime never branches on it
    components: dict[str, Component]  # vision, embed, decoder (+ prefill: static; compressor, prefusion: LLaVA-Mini)
    preprocess: Preprocess  # image -> pixel_values, as the checkpoint's processor does it
    tokenizer: FileRef  # a tokenizers `tokenizer.json`
    chat_template: str  # the checkpoint's jinja chat template (rendered in edgevlm's sandbox)
    image_token: str  # the image placeholder in the rendered prompt
    image_token_id: int  # its token id
    image_tokens: int  # placeholders per image in the prompt
    generation: Generation
    special_tokens: dict[str, str] = field(default_factory=dict)  # what the template sees: bos_token, eos_token, ...
    fusion: str = "splice"  # "splice": image embeds replace placeholders; "prefusion": LLaVA-Mini
    image_layout: ImageLayout | None = None  # tiles, marker tokens, feature grid; None: one tile, image_tokens rows
    video: VideoLayout | None = None  # None: a video is its frames, each an image of the message
    quant: Quant = field(default_factory=Quant)  # the bundle's quantization (edgevlm quant)
    source: Source = field(default_factory=Source)  # where the bundle came from

    @property
    def vocab_size(self) -> int:
        """Rows of the decoder's logits (bounds token ids a caller may name: logit_bias, top_k)."""
        return int(self.components["decoder"].outputs["logits"][-1])

    @property
    def is_static(self) -> bool:
        """Fixed shapes everywhere: the decoder runs on a fixed-capacity KV cache (see `StaticShape`)."""
        return self.components["decoder"].static is not None

    def files(self) -> list[FileRef]:
        """Every file the bundle holds besides manifest.json."""
        refs = [self.tokenizer]
        for comp in self.components.values():
            refs.append(FileRef(comp.file, comp.sha256))
            refs.extend(comp.data_files)
        return refs

    def to_json(self) -> str:
        return json.dumps(plain(self), indent=2, sort_keys=False) + "\n"


# ---- strict reader ------------------------------------------------------------------------------


def parse_manifest(data: Any) -> Manifest:
    """Build a Manifest from decoded JSON, rejecting anything not in the schema."""
    if not isinstance(data, dict):
        raise BundleError("manifest.json must hold a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"unsupported bundle format_version {version!r}: this edgevlm reads version {FORMAT_VERSION}; "
            "re-export the bundle or upgrade edgevlm"
        )
    m = read(Manifest, data, "manifest")
    _check(m)
    return m


def _check(m: Manifest) -> None:
    for name in ("vision", "decoder"):
        if name not in m.components:
            raise BundleError(f"manifest: components.{name} is required")
    # llama.cpp embeds text tokens itself; every other decoder takes embeds from the embed graph
    if "embed" not in m.components and (m.components["decoder"].backend != "gguf" or m.fusion == "prefusion"):
        raise BundleError("manifest: components.embed is required")
    for name, comp in m.components.items():
        if comp.backend not in BACKENDS:
            raise BundleError(f"manifest: components.{name}.backend must be one of {BACKENDS}, got {comp.backend!r}")
    for ref in m.files():
        if len(ref.sha256) != 64 or any(c not in "0123456789abcdef" for c in ref.sha256):
            raise BundleError(f"manifest: sha256 of {ref.file!r} is not 64 lowercase hex digits")
    if m.fusion not in ("splice", "prefusion"):
        raise BundleError("manifest: fusion must be 'splice' or 'prefusion'")
    kv_parts = ["decoder"] + (["prefusion"] if m.fusion == "prefusion" else [])
    for name in kv_parts + (["compressor"] if m.fusion == "prefusion" else []):
        if name not in m.components:
            raise BundleError(f"manifest: fusion {m.fusion!r} needs components.{name}")
    for name in kv_parts:
        if m.components[name].num_layers is None or m.components[name].kv is None:
            raise BundleError(f"manifest: components.{name} needs num_layers and kv")
    if m.is_static:
        _check_static(m, kv_parts)
    for where, p in (("preprocess", m.preprocess), ("video.preprocess", m.video and m.video.preprocess)):
        if p is not None:
            _check_preprocess(p, where)
    _check_layout(m)
    _check_video(m)
    if m.image_tokens < 0 or m.generation.context_length <= 0:
        raise BundleError("manifest: image_tokens and generation.context_length must be positive")
    _check_ranges(m)


def _check_preprocess(p: Preprocess, where: str) -> None:
    if p.resample not in RESAMPLES:
        raise BundleError(f"manifest: {where}.resample must be one of {RESAMPLES}")
    if (p.shortest_edge is None) == (p.size is None):
        raise BundleError(f"manifest: {where} needs exactly one of shortest_edge and size")
    if p.resize_kernel not in ("torchvision", "pil"):
        raise BundleError(f"manifest: {where}.resize_kernel must be 'torchvision' or 'pil'")
    if any(s == 0 for s in p.std):
        raise BundleError(f"manifest: {where}.std must not contain 0")
    _check_pixel_ranges(p, where)


def _in(where: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise BundleError(f"manifest: {where} = {value} is outside [{lo}, {hi}]")


def _check_ranges(m: Manifest) -> None:
    """Bounds on every number the runtime sizes arrays or loops by: a hostile manifest must not be able to
    ask for a terabyte array or a billion-layer loop (limits far above any model edgevlm runs)."""
    g = m.generation
    _in("image_tokens", m.image_tokens, 0, 1 << 16)
    _in("image_token_id", m.image_token_id, 0, MAX_TOKEN_ID)
    _in("generation.context_length", g.context_length, 1, 1 << 24)
    _in("generation.max_new_tokens", g.max_new_tokens, 1, 1 << 24)
    for t in g.eos_token_ids:
        _in("generation.eos_token_ids", t, 0, MAX_TOKEN_ID)
    for name, comp in m.components.items():
        _in(f"components.{name}.num_layers", comp.num_layers, 1, 1024)
        if comp.kv is not None:
            _in(f"components.{name}.kv.heads", comp.kv.heads, 1, 4096)
            _in(f"components.{name}.kv.head_dim", comp.kv.head_dim, 1, 16384)
            for pattern in (comp.kv.past, comp.kv.present):
                kv_names(pattern, comp.num_layers or 1)
        for io, shapes in (("inputs", comp.inputs), ("outputs", comp.outputs)):
            for key, shape in shapes.items():
                if len(shape) > 8:
                    raise BundleError(f"manifest: components.{name}.{io}.{key} has more than 8 dimensions")
                for d in shape:
                    if isinstance(d, int):
                        _in(f"components.{name}.{io}.{key}", d, 0, 1 << 24)
    pixels = m.components["vision"].inputs.get("pixel_values")
    if pixels and all(isinstance(d, int) for d in pixels) and math.prod(pixels) > 1 << 26:
        raise BundleError(f"manifest: components.vision.inputs.pixel_values {list(pixels)} is too large to run")


def _check_pixel_ranges(p: Preprocess, where: str) -> None:
    for name, dims in (("size", p.size), ("crop", p.crop)):
        for d in dims or ():
            _in(f"{where}.{name}", d, 1, MAX_SIDE)
    _in(f"{where}.shortest_edge", p.shortest_edge, 1, MAX_SIDE)
    for c in p.pad_to_square or ():
        _in(f"{where}.pad_to_square", c, 0, 255)
    if not all(math.isfinite(x) for x in (p.rescale, *p.mean, *p.std)) or p.rescale == 0 or 0 in p.std:
        raise BundleError(f"manifest: {where}.rescale, mean and std must be finite (std and rescale non-zero)")
    # pixel values stay finite and meaningful: (pixel * rescale - mean) / std with pixel in 0..255
    if not (all(abs(x) <= 1e4 for x in p.mean) and all(1e-6 <= abs(x) <= 1e4 for x in p.std)
            and 1e-6 <= abs(p.rescale) <= 1e4):
        raise BundleError(f"manifest: {where}.mean must lie in [-1e4, 1e4], std and rescale in 1e-6 .. 1e4 "
                          "(in absolute value)")


def kv_names(pattern: str, num_layers: int) -> list[str]:
    """pattern % (layer, "key"|"value") for every layer; the pattern comes from the manifest (untrusted)."""
    try:
        names = [pattern % (i, part) for i in range(num_layers) for part in ("key", "value")]
    except (TypeError, ValueError, OverflowError) as e:
        raise BundleError(f"manifest: kv name pattern {pattern!r} does not format as (layer, 'key'|'value'): {e}") from None
    if len(set(names)) != len(names):
        raise BundleError(f"manifest: kv name pattern {pattern!r} gives the same name to two tensors")
    return names


def _check_static(m: Manifest, kv_parts: list[str]) -> None:
    """A static bundle: every graph's inputs/outputs are fixed, the decoder has a chunked prefill graph."""
    for name in ("prefill", "embed"):
        if name not in m.components or m.components[name].static is None:
            raise BundleError(f"manifest: a static bundle needs components.{name} with a `static` section")
    for name in kv_parts + ["prefill"]:
        c = m.components[name]
        if c.static is None or not c.static.kv_capacity or c.num_layers is None or c.kv is None:
            raise BundleError(f"manifest: components.{name} of a static bundle needs static.kv_capacity, num_layers, kv")
    if m.components["decoder"].static.chunk != 1 or m.components["prefill"].static.kv_capacity != \
            m.components["decoder"].static.kv_capacity:
        raise BundleError("manifest: a static decoder takes one token per call, over the prefill graph's kv_capacity")
    for name, c in m.components.items():
        if c.static is not None and c.static.chunk < 1:
            raise BundleError(f"manifest: components.{name}.static.chunk must be >= 1")
        for io, shapes in (("inputs", c.inputs), ("outputs", c.outputs)):
            for t, shape in shapes.items():
                if c.backend == "onnx" and not all(isinstance(d, int) for d in shape):
                    raise BundleError(f"manifest: components.{name}.{io}.{t} of a static bundle has a dynamic dim")


def _check_layout(m: Manifest) -> None:
    budget = m.generation.max_image_tokens
    if budget is not None and budget < 1:
        raise BundleError("manifest: generation.max_image_tokens must be at least 1")
    lay = m.image_layout
    if lay is None:
        return
    if lay.tiling not in ("none", "split", "anyres") or lay.global_tile not in ("first", "last"):
        raise BundleError("manifest: image_layout.tiling must be none|split|anyres and global_tile first|last")
    if lay.grid is not None and (min(lay.grid) < 1 or lay.grid[0] * lay.grid[1] != m.image_tokens):
        raise BundleError("manifest: image_layout.grid must be positive and hold image_tokens rows")
    if lay.tiling != "none" and lay.tile_size < 1:
        raise BundleError("manifest: a tiled image_layout needs tile_size")
    if lay.tiling == "split" and lay.longest_edge < lay.tile_size:
        raise BundleError("manifest: image_layout.longest_edge must be at least tile_size")
    if lay.tiling == "anyres" and (not lay.pinpoints or lay.grid is None
                                   or any(min(p) < 1 or p[0] % lay.tile_size or p[1] % lay.tile_size
                                          for p in lay.pinpoints)):
        raise BundleError("manifest: anyres needs a grid and pinpoints that are multiples of tile_size")
    if m.fusion != "splice" and lay.tiling != "none":
        raise BundleError("manifest: tiled images need fusion 'splice'")


def _check_video(m: Manifest) -> None:
    v, lay = m.video, m.image_layout
    if lay is not None and (lay.multi not in ("same", "one_tile")
                            or (lay.multi == "one_tile") != (lay.multi_pad is not None)):
        raise BundleError("manifest: image_layout.multi must be same|one_tile (one_tile with multi_pad)")
    for c in (lay.multi_pad if lay is not None else None) or ():
        _in("image_layout.multi_pad", c, 0, 255)
    if v is None:
        return
    if m.fusion != "splice":
        raise BundleError("manifest: a video layout needs fusion 'splice' (pre-fusion bundles take frames as images)")
    if v.sampling not in ("uniform", "spread") or v.preprocess.size is None or not v.marker or not v.token:
        raise BundleError("manifest: video.sampling must be uniform|spread, video.preprocess needs a size, marker "
                          "and token must be set")
    if not (0 < v.fps <= 1000) or not 1 <= v.max_frames <= 1 << 16 or not 0 <= v.longest_edge <= MAX_SIDE:
        raise BundleError("manifest: video.fps must be in (0, 1000], max_frames in [1, 65536], longest_edge in "
                          f"[0, {MAX_SIDE}]")
    _in("video.token_id", v.token_id, 0, MAX_TOKEN_ID)
    for d in (v.pool or ()) + v.preprocess.size:
        _in("video.pool / video.preprocess.size", d, 1, MAX_SIDE)
    if v.pool is not None and (lay is None or lay.grid is None):
        raise BundleError("manifest: video.pool needs image_layout.grid")
