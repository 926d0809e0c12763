"""The CPU's instruction set as ONNX Runtime's int8 kernels see it, and whether a bundle's int8 graphs are exact on it.

onnxruntime's x86 int8 GEMM multiplies uint8 activations by int8 weights. With VNNI (vpdpbusd) the products
are summed in 32 bits; on CPUs without it (AVX2 only: many laptops and desktops) vpmaddubsw first adds two
products into a saturating int16, which 8-bit weights overflow. `edgevlm quant` therefore writes 7-bit weights
by default (`int8_range: "portable"`, exact everywhere); a bundle quantized with `--int8-range full` (or before
the range was recorded) is exact only on VNNI x86 and on ARM, and loading it elsewhere logs one warning.
"""

from __future__ import annotations

import logging
import platform

log = logging.getLogger("edgevlm")
_warned: set[str] = set()


def features() -> set[str]:
    """The CPU features numpy's runtime dispatch found (by CPUID, so an emulated CPU reports its own)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return {k for k, v in __cpu_features__.items() if v}


def _linux_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """"VNNI" (x86 with AVX512-VNNI or AVX-VNNI), "AVX512", "AVX2", "NEON" (ARM), or the machine's name."""
    f = features()
    if "AVX512VNNI" in f:
        return "VNNI"
    if "AVX2" in f and "AVX512F" not in f and "avx_vnni" in _linux_flags():
        return "VNNI"  # AVX-VNNI (Alder Lake and later): numpy does not list it
    if "AVX512F" in f:
        return "AVX512"
    if "AVX2" in f:
        return "AVX2"
    if "ASIMD" in f or "NEON" in f:
        return "NEON"
    return platform.machine() or "unknown"


def saturating_components(manifest, cpu: str) -> list[str]:
    """Components whose int8 weights use the full 8-bit range on an x86 CPU without VNNI: their int8 kernels
    saturate there. Bundles written before the range was recorded count as full range."""
    if cpu not in ("AVX2", "AVX512"):
        return []
    out = []
    for name, comp in manifest.components.items():
        q = comp.quant or {}
        nodes = q.get("nodes") or {}
        if (nodes.get("int8") or nodes.get("int8-static")) and q.get("int8_range", "full") == "full":
            out.append(name)
    return out


def check_int8(manifest, key: str, cpu: str | None = None) -> list[str]:
    """Log once per bundle (`key`) if its int8 graphs saturate on this CPU (`cpu`: default `isa()`); returns
    those components."""
    cpu = cpu or isa()
    bad = saturating_components(manifest, cpu)
    if bad and key not in _warned:
        _warned.add(key)
        log.warning("this bundle's int8 weights (%s) use the full 8-bit range, which this CPU (%s, no VNNI) "
                    "saturates: answers may be less accurate; re-quantize with `edgevlm quant --int8-range "
                    "portable` (the default)", ", ".join(bad), cpu)
    return bad
