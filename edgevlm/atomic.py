"""The one way edgevlm writes files and bundles: nothing is visible at its final path until it is complete.

`write_atomic(path, data)`  a file: temp file in the same directory, fsync, rename, fsync the directory.
`atomic_dir(out, overwrite)` a directory (a bundle): built in a temp dir next to `out`, every file fsynced,
                             renamed to `out` only if the block completes; removed on any exception,
                             KeyboardInterrupt included.
`scratch_dir(near)`          a work directory next to `near`, removed at exit (for intermediate files).

Temp names are `.NAME.partial-PID-XXXX`: hidden, never a bundle path anyone asked for, and owned by a pid.
A process killed with SIGKILL cannot clean up, so the next atomic_dir/scratch_dir for the same NAME removes
the partial directories whose owning process is gone (a live writer's are left alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import EdgeVLMError, ExportError

MANIFEST = "manifest.json"  # same name as bundle.MANIFEST (kept here so this module imports nothing else)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` (str is UTF-8 encoded) to `path` so that readers see the old file or the new one, never a
    torn one. durable=False skips the fsyncs (a cache entry that is cheap to lose, not a bundle)."""
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; these files are ordinary data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, *,
               error: type[EdgeVLMError] = ExportError, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield an empty temp dir next to `out`; when the block completes it becomes `out` (an existing `out`
    is replaced only with overwrite=True, and only if it is empty or holds `marker`: a bundle's manifest, or the
    file that names another kind of model directory). On any exception it is removed. `error` is the edgevlm
    error type raised for a refused target."""
    out = Path(out)
    check_target(out, overwrite, error, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = _mkdtemp(out)
    try:
        yield tmp
        _fsync_tree(tmp)  # durable before it becomes visible
        check_target(out, overwrite, error, marker)  # the target may have appeared while we worked
        old = None
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():  # rename it aside first: `out` is never a half-deleted bundle
            old = _mkdtemp(out)
            os.replace(out, old / "old")
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A work directory next to `near` (same file system, so files can be moved into a bundle), removed at
    exit; named like atomic_dir's temp dirs, so a killed run's scratch is cleaned by the next run."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(near)
    work = _mkdtemp(near)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def partial_dirs(out: str | os.PathLike) -> list[Path]:
    """The temp and scratch directories of writers of `out` (live or dead) in out's parent directory."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pat = _pattern(out.name)
    return sorted(p for p in out.parent.iterdir() if pat.match(p.name))


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove partial directories of `out` left by processes that no longer run; returns those removed."""
    removed = []
    for p in partial_dirs(out):
        pid = int(_pattern(Path(out).name).match(p.name).group(1))
        if not alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.partial-(\d+)-[^/]+$")


def alive(pid: int) -> bool:
    """Whether process `pid` may still be running (ours, another user's, or unknowable: yes)."""
    if pid == os.getpid() or os.name == "nt":  # (on Windows os.kill would terminate it: callers rely on age there)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process, or a platform without signal 0
        return True
    return True


def _mkdtemp(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle is ordinary data
    return tmp


def check_target(out: str | os.PathLike, overwrite: bool, error: type[EdgeVLMError] = ExportError,
                 marker: str = MANIFEST) -> None:
    """Raise `error` unless `out` may be written: absent, or (overwrite=True) an empty directory or one holding
    `marker` (a bundle: manifest.json). Writers call it before long work so a refused target fails fast;
    atomic_dir checks again."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise error(f"{out} already exists (pass overwrite=True / --force to replace it)")
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / marker).is_file():
        what = "a bundle" if marker == MANIFEST else "one this command writes"
        raise error(f"refusing to replace {out}: it is a non-empty directory that is not {what} (no {marker})")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open directories; rename durability is the OS's there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is racy across threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    u = os.umask(0o022)
    os.umask(u)
    return u
