"""The per-stage profile every backend reports in `Response` (stage names, peak memory)."""

from __future__ import annotations

import sys

# The first-token path, in order. preprocess: decode + resize + normalize (or only the input's digest when
# it is known); cache: image and prefix KV cache lookups, disk reads included; encode includes the projector
# (it is inside the vision graph); compress and prefusion run only for pre-fusion (LLaVA-Mini) bundles;
# embed: chat template + tokenizer + token embedding; first_decode: the first step after the first token.
STAGES = ("preprocess", "cache", "encode", "compress", "prefusion", "embed", "prefill", "first_decode")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
