"""int8 that is right on every CPU: 7-bit ("portable") weights never saturate onnxruntime's int8 kernels; 8-bit
("full") ones do on x86 without VNNI -- seen here on this CPU and on an emulated AVX2-only one (qemu)."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgevlm
from edgevlm import cpu
from edgevlm.manifest import Manifest

sys.path.insert(0, str(Path(__file__).parent))
import int8_probe  # noqa: E402

EXACT = 0.02  # relative error of an int8 layer that did not saturate (measured 0.003-0.005)
SATURATED = 0.2  # what saturation did to the probe (measured 0.56)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8-probe")
    int8_probe.write(root)
    return root


def check(result: dict) -> None:
    errs, isa = result["rel_err"], result["isa"]
    print(f"ISA {isa}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(errs.items())))
    portable = {k: v for k, v in errs.items() if k.endswith(".portable")}
    full = {k: v for k, v in errs.items() if k.endswith(".full")}
    assert len(portable) == len(full) == 4
    assert max(portable.values()) < EXACT, portable  # exact on every CPU
    if isa in ("AVX2", "AVX512"):  # vpmaddubsw: 8-bit weights overflow its int16 sums -- in the u8s8 GEMM of
        # dynamic MatMuls and static (QDQ) MatMuls and Convs; dynamic ConvInteger widens first (portable keeps 8 bits)
        assert {k for k, v in full.items() if v > SATURATED} == {
            "matmul.int8.full", "matmul.int8-static.full", "conv.int8-static.full"}, full
        assert full["conv.int8.full"] < EXACT
    else:
        assert max(full.values()) < EXACT, full


def test_int8_weights_on_this_cpu(probes):
    result = int8_probe.run(probes)
    assert result["isa"] == cpu.isa()
    check(result)


def test_int8_weights_on_an_emulated_avx2_cpu(probes):
    """qemu-x86_64 -cpu Haswell: AVX2, no AVX-512, no VNNI -- what many laptops and desktops run."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"x86 emulation of an x86 Python: this host is {platform.machine()}")
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: install Debian's qemu-user (scripts/test.sh does)"
    p = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, int8_probe.__file__, str(probes)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["isa"] == "AVX2"
    check(result)


def _manifest(**quant) -> Manifest:
    m = edgevlm.load().manifest
    comps = dict(m.components)
    comps["decoder"] = dataclasses.replace(comps["decoder"], quant=quant)
    return dataclasses.replace(m, components=comps)


@pytest.mark.parametrize("quant,cpus", [
    ({"scheme": "int8", "nodes": {"int8": 3}, "int8_range": "full"}, {"AVX2", "AVX512"}),
    ({"scheme": "int8", "nodes": {"int8": 3}}, {"AVX2", "AVX512"}),  # written before the range was recorded
    ({"scheme": "mixed", "nodes": {"int8-static": 2, "int4": 1}, "int8_range": "full"}, {"AVX2", "AVX512"}),
    ({"scheme": "int8", "nodes": {"int8": 3}, "int8_range": "portable"}, set()),
    ({"scheme": "int4", "nodes": {"int4": 3}}, set()),
])
def test_which_bundles_saturate_where(quant, cpus):
    m = _manifest(**quant)
    for isa in ("VNNI", "AVX512", "AVX2", "NEON", "riscv64"):
        assert cpu.saturating_components(m, isa) == (["decoder"] if isa in cpus else []), isa


def test_a_full_range_bundle_warns_once_on_a_cpu_without_vnni(caplog):
    m = _manifest(scheme="int8", nodes={"int8": 3}, int8_range="full")
    with caplog.at_level(logging.WARNING, logger="edgevlm"):
        assert cpu.check_int8(m, "test-bundle-a", cpu="AVX2") == ["decoder"]
        assert cpu.check_int8(m, "test-bundle-a", cpu="AVX2") == ["decoder"]
        assert cpu.check_int8(m, "test-bundle-b", cpu="VNNI") == []
    said = [r.getMessage() for r in caplog.records if "saturates" in r.getMessage()]
    print(said)
    assert len(said) == 1 and "--int8-range portable" in said[0] and "AVX2" in said[0]
