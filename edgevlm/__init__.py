"""edgevlm: an on-device runtime for small vision-language models (torch-free).

    import edgevlm
    vlm = edgevlm.load("bundle/")            # verifies, opens sessions, warms up
    vlm.generate("cat.jpg", "What is this?")
"""

from importlib import import_module

from .errors import (ArgumentError, BackendError, BundleError, ContextOverflowError, DependencyError, EdgeVLMError,
                     ExportError, ImageError, IntegrityError, TemplateError, VideoError)

__version__ = "0.1.0"

# The runtime's names are imported on first use (PEP 562): `import edgevlm` stays a few milliseconds, not the
# ~0.7 s of numpy, onnxruntime and tokenizers, so the `edgevlm` command is running its own code (and handles
# Ctrl-C) before those load.
_LAZY = {"load": "model", "VLM": "model", "Chat": "generate", "Response": "generate", "Limits": "limits",
         "make_sampler": "sampling", "Video": "video"}

__all__ = [
    "load", "VLM", "ArgumentError", "Chat", "Response", "Video", "make_sampler", "EdgeVLMError", "BundleError",
    "IntegrityError", "ImageError", "VideoError", "ContextOverflowError", "TemplateError", "BackendError",
    "ExportError", "DependencyError", "Limits", "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module("." + _LAZY[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule not imported yet, e.g. edgevlm.model after a bare `import edgevlm`
        return import_module("." + name, __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
