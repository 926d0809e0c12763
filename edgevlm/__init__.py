"""edgevlm: an on-device runtime for small vision-language models (torch-free).

    import edgevlm
    vlm = edgevlm.load("bundle/")            # verifies, opens sessions, warms up
    vlm.generate("cat.jpg", "What is this?")
"""

from .errors import (ArgumentError, BackendError, BundleError, ContextOverflowError, DependencyError, EdgeVLMError,
                     ExportError, ImageError, IntegrityError, TemplateError)
from .generate import Chat, Response
from .limits import Limits
from .model import VLM, load
from .sampling import make_sampler

__version__ = "0.1.0"

__all__ = [
    "load", "VLM", "ArgumentError", "Chat", "Response", "make_sampler", "EdgeVLMError", "BundleError", "IntegrityError",
    "ImageError", "ContextOverflowError", "TemplateError", "BackendError", "ExportError", "DependencyError", "Limits",
    "__version__",
]
