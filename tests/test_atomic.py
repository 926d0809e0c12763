"""edgevlm.atomic: nothing half-written is ever visible at a target path, even after an exception, a
KeyboardInterrupt or a SIGKILL; what a killed run leaves is hidden and cleaned by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import edgevlm
from edgevlm.atomic import atomic_dir, clean_stale, partial_dirs, scratch_dir, write_atomic
from edgevlm.bundle import open_bundle
from edgevlm.errors import EdgeVLMError, ExportError


def test_write_atomic_replaces_whole_files(tmp_path):
    p = tmp_path / "a.json"
    write_atomic(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # ordinary data, not mkstemp's 0600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    write_atomic(p, "old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_atomic(p, "new" * 1000)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()])
def test_atomic_dir_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "bundle"
    with pytest.raises(type(exc)):
        with atomic_dir(out) as tmp:
            (tmp / "vision.onnx").write_bytes(b"x" * 1000)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"y")
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_commits_and_replaces_only_bundles(tmp_path):
    out = tmp_path / "bundle"
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
    assert (out / "sub" / "w.bin").read_bytes() == b"1"
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(ExportError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text('{"v": 2}')
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no renamed-aside copy left
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(EdgeVLMError, match="not a bundle"):
        with atomic_dir(home, overwrite=True):
            pass
    assert (home / "thesis.tex").exists()


def test_scratch_dir_is_removed(tmp_path):
    with pytest.raises(ValueError):
        with scratch_dir(tmp_path / "out") as work:
            (work / "f").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def _run_and_kill(cmd: list[str], until, timeout: float = 120.0) -> None:
    """Start cmd, SIGKILL it as soon as until() is true (the child is mid-write then)."""
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not until():
            if child.poll() is not None:
                pytest.fail(f"child ended before it was killed: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail("child never reached the write")
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_sigkilled_writer_leaves_no_bundle_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "bundle"
    code = textwrap.dedent(f"""
        import time
        from edgevlm.atomic import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "manifest.json").write_text("{{}}")
            (tmp / "vision.onnx").write_bytes(b"x" * 1000)
            (tmp / "ready").touch()
            time.sleep(60)
    """)
    ready = lambda: any((p / "ready").exists() for p in partial_dirs(out))  # noqa: E731
    _run_and_kill([sys.executable, "-c", code], ready)
    assert not out.exists()
    stale = partial_dirs(out)
    assert len(stale) == 1 and stale[0].name.startswith(".bundle.partial-")  # hidden, not the target
    with pytest.raises(EdgeVLMError):
        open_bundle(out)
    with atomic_dir(out) as tmp:  # the next run removes the dead writer's leftovers
        (tmp / "manifest.json").write_text("{}")
    assert partial_dirs(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_live_writers_partial_dir_is_left_alone(tmp_path):
    out = tmp_path / "bundle"
    mine = tmp_path / f".bundle.partial-{os.getppid()}-abc"  # a live process (our parent)
    mine.mkdir()
    assert clean_stale(out) == [] and mine.exists()


def test_sigkilled_quantization_leaves_no_bundle(tmp_path):
    """A real `edgevlm quant` child killed once the first graph is written: no bundle at --to; the rerun
    cleans up and writes a bundle that verifies."""
    out = tmp_path / "q"
    argv = ["quant", "--to", str(out), "--scheme", "fp16", "--dataset", "none", "--calib-n", "2"]
    code = f"import sys; from edgevlm.apps.cli import main; sys.exit(main({argv!r}))"
    written = lambda: any(p.is_dir() and any(p.glob("*.onnx")) for p in partial_dirs(out))  # noqa: E731
    _run_and_kill([sys.executable, "-c", code], written)
    assert not out.exists() and len(partial_dirs(out)) == 1
    from edgevlm.apps.cli import main

    assert main(argv) == 0
    assert partial_dirs(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert edgevlm.load(out).generate(_example(), "What color is the star?")


def test_export_interrupted_mid_write_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    """KeyboardInterrupt after the vision graph is on disk, while the decoder is being written."""
    from edgevlm.export import exporter, gqa, graphs

    seen = {}

    def interrupted(*a, **k):
        (partial,) = partial_dirs(tmp_path / "out")
        seen["files"] = sorted(p.name for p in partial.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(graphs, "export_decoder", interrupted)
    monkeypatch.setattr(gqa, "export_decoder", interrupted)  # the default decoder graph for this Llama
    with pytest.raises(KeyboardInterrupt):
        exporter.export(checkpoint("llava-clip-llama"), tmp_path / "out", progress=False)
    assert "vision.onnx" in seen["files"]  # it was interrupted mid-write
    assert list(tmp_path.iterdir()) == []


def _example() -> Path:
    return Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"


def _umask() -> int:
    u = os.umask(0o022)
    os.umask(u)
    return u
