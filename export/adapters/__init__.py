"""One adapter per model family: everything family-specific lives here."""

from .base import Adapter
from .fast_vlm import FastVlmAdapter, FastVlmAppleAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mobilevlm import MobileVlmAdapter
from .smolvlm import SmolVlmAdapter

ADAPTERS: list[Adapter] = [FastVlmAdapter(), FastVlmAppleAdapter(), LlavaAdapter(), SmolVlmAdapter(),
                           MobileVlmAdapter(), LlavaOnevisionAdapter()]


def adapter_for(model_type: str) -> Adapter:
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    from edgevlm.errors import ExportError

    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ExportError(f"no adapter for model_type {model_type!r}: it is not supported (supported: {known}; "
                      "the README lists the verified checkpoints)")
