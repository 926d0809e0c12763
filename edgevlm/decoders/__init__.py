"""Language-model decoders, one file per backend, chosen from the manifest through REGISTRY.

Adding a backend is adding a file here with a class that implements `base.Decoder` and a `from_bundle`
classmethod, and naming it in REGISTRY (imported only when a bundle asks for it).
"""

from __future__ import annotations

import importlib

from ..errors import BundleError
from .base import ContextDecoder, Decoder, Prompt, State, common_prefix

REGISTRY = {  # kind -> "module:class"
    "onnx": "edgevlm.decoders.onnx:OnnxDecoder",
    "onnx-static": "edgevlm.decoders.static:StaticDecoder",
    "gguf": "edgevlm.decoders.gguf:GgufDecoder",
    "coreml": "edgevlm.decoders.coreml:CoremlDecoder",
}

__all__ = ["REGISTRY", "ContextDecoder", "Decoder", "Prompt", "State", "common_prefix", "kind", "open_decoder"]


def kind(manifest) -> str:
    """The registry key of a bundle's decoder: its backend, and "-static" for fixed-shape ONNX graphs."""
    backend = manifest.components["decoder"].backend
    return backend + ("-static" if manifest.is_static and backend == "onnx" else "")


def open_decoder(manifest, bundle, graphs: dict, embed_ids, threads: int, n_ctx: int) -> Decoder:
    """The bundle's decoder, built by its backend's class from the opened graphs (or its own file)."""
    name = kind(manifest)
    if name not in REGISTRY:
        raise BundleError(f"no decoder for backend {name!r} (known: {', '.join(REGISTRY)})")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls).from_bundle(manifest, bundle, graphs, embed_ids, threads, n_ctx)
