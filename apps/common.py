"""What the subcommands share: one-line errors, and loading a bundle with a note on stderr."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys

from edgevlm.errors import DependencyError, EdgeVLMError

# extra -> the modules its commands import (pyproject.toml's optional dependencies install them)
EXTRAS = {
    "export": ("torch", "torchvision", "timm", "transformers", "onnx", "onnxscript", "safetensors", "tqdm",
               "huggingface_hub"),
    "quant": ("onnx", "onnx_ir", "rich", "matplotlib"),
    "gguf": ("gguf", "llama_cpp"),
    "coreml": ("coremltools", "sklearn"),
    "server": ("starlette", "uvicorn", "llguidance"),
    "structured": ("llguidance",),
    "plot": ("matplotlib",),
    "parquet": ("pyarrow",),
    "ray": ("ray", "pyarrow", "pandas"),  # ray[data]
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules (set to None)
        return False


def requires(command: str, extra: str, modules: tuple[str, ...] | None = None) -> None:
    """Refuse a command at once, in one line, when a module of the extra it needs is not installed."""
    missing = [m for m in (modules or EXTRAS[extra]) if not _importable(m)]
    if missing:
        raise DependencyError(f"`edgevlm {command}` needs the {extra} extra: pip install 'edgevlm[{extra}]' "
                              f"(missing: {', '.join(missing)})")


def one_line_errors(fn):
    """Run a command's main; an edgevlm error becomes one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.WARNING, format="edgevlm: %(message)s")
        try:
            return fn(argv)
        except EdgeVLMError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would fail)
            return 141

    return wrapper
