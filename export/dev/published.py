"""Random-weight checkpoints from the published text files of a real checkpoint.

The config, tokenizer, processor and chat-template files are used as published; the weights are random at
the real widths, heads, vocabulary and image size. Only depth may be cut (`Cut`): the number of text and
vision layers written into config.json, and for FastViT towers the blocks per stage. The tower and projector
are re-drawn so that the image decides the answer (see checkpoints.make_image_matter). Tests and the
verification of published checkpoints build their checkpoints here; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .builders import CheckpointSpec, VisionDims, make_image_matter

# not checkpoint files: provenance notes, model cards, licences, hub metadata; the shard index names weights
# that are not there
NOT_COPIED = {"SOURCE.md", "README.md", "LICENSE", "hf_api_model.json", "model.safetensors.index.json"}
TEXT_SUFFIXES = (".json", ".jinja", ".txt", ".model")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Cut:
    """How much depth a random-weight copy keeps (widths never change)."""

    text_layers: int = 1
    vision_layers: int = 2  # >= 2 where the features come from the second-to-last layer (LLaVA, MobileVLM)
    stages: tuple[int, ...] | None = None  # FastViT towers: blocks per stage (FastViTHD: 2, 12, 24, 4, 2)


def build_from_published(files: str | Path, out: str | Path, cut: Cut = Cut(), *,
                         tokenizer_from: tuple[str | Path, ...] = (), seed: int = 0) -> Path:
    """Copy the published text files in `files` to `out`, cut the depth in config.json, and write random
    weights of the real shapes. `tokenizer_from`: directories (their tokenizer files) or single files that
    fill what `files` lacks (checkpoints that share a tokenizer); a file already in `files` is never replaced."""
    files, out = Path(files), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(files.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and f.name.endswith(TEXT_SUFFIXES):
            shutil.copyfile(f, out / f.name)
    for src in map(Path, tokenizer_from):  # a directory (its tokenizer files) or one file
        for f in ([src / n for n in TOKENIZER_FILES] if src.is_dir() else [src]):
            if f.is_file() and not (out / f.name).exists():
                shutil.copyfile(f, out / f.name)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cut_config(config, cut)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    builder = {"mobilevlm": _mobilevlm, "llava_qwen2": _apple_fastvlm}.get(config["model_type"], _transformers)
    builder(files, out, cut, seed)
    return out


def cut_config(config: dict, cut: Cut) -> None:
    """Fewer layers in a config dict, nothing else changed (flat configs hold the text model at the top)."""
    text = config.get("text_config", config)
    text["num_hidden_layers"] = cut.text_layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:cut.text_layers]
    if "max_window_layers" in text:
        text["max_window_layers"] = min(text["max_window_layers"], cut.text_layers)
    vision = config.get("vision_config")
    if vision is None:
        return  # custom layouts (MobileVLM, Apple FastVLM): the weights written decide the tower's depth
    if vision.get("model_type") == "timm_wrapper":
        if cut.stages:
            vision.setdefault("model_args", {})["layers"] = list(cut.stages)
    else:
        vision["num_hidden_layers"] = cut.vision_layers


def _normalisation(out: Path) -> tuple[tuple, tuple]:
    p = out / "preprocessor_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    return tuple(cfg.get("image_mean", (0.0, 0.0, 0.0))), tuple(cfg.get("image_std", (1.0, 1.0, 1.0)))


def _spec(out: Path, seed: int, image_size: int) -> CheckpointSpec:
    mean, std = _normalisation(out)
    return CheckpointSpec("published", vision=VisionDims(image_size=image_size), seed=seed, mean=mean, std=std)


def _matter(model, out: Path, seed: int) -> None:
    """Re-draw the tower and scale the projector so that the image decides the answer, per family."""
    cfg = model.config
    if cfg.model_type in ("idefics3", "smolvlm"):
        inner = model.model
        make_image_matter(model, _spec(out, seed, cfg.vision_config.image_size), tower=inner.vision_model,
                          linears=[inner.connector.modality_projection.proj],
                          run=lambda px: inner.get_image_features(pixel_values=px[:, None]))
    elif cfg.model_type == "llava_onevision":
        layer = cfg.vision_feature_layer
        make_image_matter(model, _spec(out, seed, cfg.vision_config.image_size), run=lambda px: (
            model.model.multi_modal_projector(model.model.vision_tower(px, output_hidden_states=True).hidden_states[layer])))
    elif cfg.model_type == "fast_vlm":
        size = json.loads((out / "preprocessor_config.json").read_text())["crop_size"]["height"]
        make_image_matter(model, _spec(out, seed, int(size)))
    else:  # llava
        make_image_matter(model, _spec(out, seed, cfg.vision_config.image_size))


def _transformers(files: Path, out: Path, cut: Cut, seed: int) -> None:
    """A family transformers implements: random weights saved by transformers itself, so that they carry the
    names its save_pretrained writes (for LLaVA the published `language_model.model.*` layout)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(out)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32).eval()
    _matter(model, out, seed)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save_pretrained(tmp)
        for f in Path(tmp).glob("*.safetensors*"):
            shutil.move(str(f), out / f.name)
    index = files / "model.safetensors.index.json"
    if index.is_file():
        _published_names(out, set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]))


# where transformers 5 writes a name differently from the published checkpoints (it drops CLIP's and SigLIP's
# `vision_model` level): the published spelling
ALTERNATIVES = (("vision_tower.", "vision_tower.vision_model."),)


def _published_names(out: Path, published: set[str]) -> None:
    """Rename the weights to the names the published shard index lists, where they are spelled differently."""
    from safetensors.torch import load_file, save_file

    for f in sorted(out.glob("*.safetensors")):
        state = load_file(str(f))
        renamed = {}
        for name, value in state.items():
            for ours, theirs in ALTERNATIVES:
                alt = name.replace(ours, theirs, 1)
                if name not in published and name.startswith(ours) and alt in published:
                    name = alt
            renamed[name] = value
        if list(renamed) != list(state):
            save_file(renamed, str(f), metadata={"format": "pt"})


def _mobilevlm(files: Path, out: Path, cut: Cut, seed: int) -> None:
    from ..mobilevlm import KNOWN_TOWERS, MobileVlmConfig, MobileVlmForCausalLM, save_weights

    cfg = MobileVlmConfig.from_pretrained(out)
    cfg.mm_vision_config = {**KNOWN_TOWERS[cfg.mm_vision_tower], "num_hidden_layers": cut.vision_layers}  # not saved
    cfg.image_token_index = cfg.vocab_size
    model = MobileVlmForCausalLM(cfg).eval()
    mlp = model.model.mm_projector.mlp.mlp if cfg.mm_projector_type.startswith("ldpnetv2") else \
        model.model.mm_projector.model.mlp
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    make_image_matter(model, _spec(out, seed, cfg.mm_vision_config["image_size"]), tower=model.model.vision_tower,
                      linears=linears, run=model.image_features)
    save_weights(model, out)


def _apple_fastvlm(files: Path, out: Path, cut: Cut, seed: int) -> None:
    """Apple's FastVLM layout: the transformers model at the real widths, its weights under Apple's names."""
    from safetensors.torch import save_file
    from transformers import FastVlmForConditionalGeneration

    from ..fastvlm_apple import TOWERS, fast_vlm_config, to_apple_names

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    model = FastVlmForConditionalGeneration(fast_vlm_config(config, stages=cut.stages)).eval()
    make_image_matter(model, _spec(out, seed, TOWERS[config["mm_vision_tower"]].image_size))
    state = to_apple_names(model.state_dict())
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
