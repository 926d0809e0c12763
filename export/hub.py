"""`export --from`: a checkpoint directory, or a Hugging Face hub id resolved through huggingface_hub's cache
(downloaded when online; with HF_HUB_OFFLINE=1 only the cache is read)."""

from __future__ import annotations

import re
from pathlib import Path

from edgevlm.errors import ExportError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name, optionally @revision
# what the exporter reads: configs, tokenizer and template files, weights; top level only (no onnx/ etc.)
TEXT = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve(src: str | Path) -> Path:
    """A local directory as it is, else `org/name[@revision]` -> its snapshot directory in the hub cache."""
    path = Path(src)
    if path.is_dir():
        return path
    if not HUB_ID.match(str(src)):
        raise ExportError(f"--from {src}: no such directory, and not a hub id (org/name)")
    repo, _, revision = str(src).partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ExportError(f"--from {src}: resolving hub ids needs huggingface_hub (pip install "
                          "'edgevlm[export]')") from None
    get = dict(repo_id=repo, revision=revision or None, ignore_patterns=["*/*"])
    try:
        snap = Path(snapshot_download(allow_patterns=TEXT + ["*.safetensors"], **get))
        if not any(snap.glob("*.safetensors")):  # older checkpoints: PyTorch weights only
            snap = Path(snapshot_download(allow_patterns=TEXT + ["pytorch_model*.bin"], **get))
    except LocalEntryNotFoundError:
        raise ExportError(f"--from {src}: no such directory, and as a hub id it is not in the hub cache "
                          f"({constants.HF_HUB_CACHE}) while downloading is off (HF_HUB_OFFLINE=1 or no network): "
                          "download it once online, or pass a directory") from None
    except RepositoryNotFoundError:
        raise ExportError(f"--from {src}: no such directory, and no such hub repository (or it is private: log in "
                          "with `hf auth login`)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ExportError(f"--from {src}: the hub download failed: {_one_line(e)}") from None
    return snap


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
