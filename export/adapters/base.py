"""What an adapter provides, and the family-independent reading of HF processor files."""

from __future__ import annotations

from typing import Any

import torch

from edgevlm.errors import ExportError
from edgevlm.manifest import ImageLayout, Preprocess, VideoLayout

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL / HF PILImageResampling codes


class Adapter:
    """One model family: how to cut it into graphs and what its processor does."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    vision_outputs: tuple[str, ...] = ("image_embeds",)  # the vision graph's outputs, image rows first
    processors: tuple[str, ...] = ()  # the processor classes whose behaviour the adapter reproduces

    def check_processor(self, processor, model_type: str) -> None:
        name = type(processor).__name__
        if self.processors and name not in self.processors:
            raise ExportError(f"model_type {model_type!r} with processor class {name} is not supported (supported: "
                              f"{', '.join(self.processors)}): check processor_class in processor_config.json")

    def load_model(self, hf_dir):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False)

    def load_processor(self, hf_dir):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(hf_dir, trust_remote_code=False)

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 3, H, W] -> image embeds [1, N, D] ready for the language model."""
        raise NotImplementedError

    def language_parts(self, model) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
        """(decoder body that takes inputs_embeds, token embedding, lm_head)."""
        return model.model.language_model, model.model.language_model.get_input_embeddings(), model.lm_head

    def text_config(self, model):
        return model.config.text_config

    def preprocess(self, processor) -> Preprocess:
        return preprocess_from_hf(processor.image_processor)

    def image_layout(self, model, processor, tile_rows: int) -> ImageLayout | None:
        """How images become tiles and prompt rows; the default: one tile whose rows are a square grid
        when they can be (no CLS row), else a plain sequence."""
        side = int(round(tile_rows ** 0.5))
        return ImageLayout(grid=(side, side) if side * side == tile_rows else None)

    def template_for_video(self, processor) -> str:
        """The chat template the bundle carries, given the processor's (set on it): a family whose processor swaps
        in another template for video prompts returns that one where it renders everything else the same."""
        return processor.chat_template

    def video_layout(self, model, processor) -> VideoLayout | None:
        """How the processor turns a video into prompt rows; None: a video is its frames, each an image."""
        return None

    def hf_pixels(self, inputs) -> torch.Tensor:
        """The processor's pixel_values as tiles [T, 3, S, S]."""
        pv = inputs["pixel_values"]
        return pv.reshape(-1, *pv.shape[-3:])

    def reference_rows(self, model, inputs) -> torch.Tensor:
        """The rows the PyTorch model puts in the placeholders for the (one) image in inputs: [N, D]."""
        return self.image_features(model, inputs["pixel_values"])[0]


def load_tokenizer(hf_dir):
    """The class tokenizer_config.json names, loaded without AutoTokenizer reading config.json (a custom-code
    checkpoint's auto_map there would ask to run its code; its model type is unknown to transformers)."""
    import json
    from pathlib import Path

    import transformers

    cfg = Path(hf_dir) / "tokenizer_config.json"
    name = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") if cfg.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.endswith("Tokenizer") else None
    if cls is not None:
        return cls.from_pretrained(hf_dir)
    return transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)


def _get(obj, key):
    v = getattr(obj, key, None)
    if v is None and isinstance(obj, dict):
        v = obj.get(key)
    return v


def preprocess_from_hf(ip) -> Preprocess:
    """Map an HF image processor's settings onto our Preprocess config (the runtime reproduces it exactly)."""
    size, crop = ip.size, ip.crop_size if getattr(ip, "do_center_crop", False) else None
    shortest = _get(size, "shortest_edge")
    exact = None if shortest else (int(_get(size, "height")), int(_get(size, "width")))
    if not getattr(ip, "do_resize", True):
        raise ValueError("image processors without resizing are not supported")
    if _get(size, "longest_edge") or _get(size, "max_height"):
        raise ValueError(f"unsupported resize rule {dict(size)!r}")
    pad = None
    if getattr(ip, "do_pad", False):  # LLaVA-1.5 "pad": square with the mean colour
        pad = tuple(int(x * 255) for x in ip.image_mean)
    return Preprocess(
        shortest_edge=int(shortest) if shortest else None,
        size=exact,
        crop=(int(_get(crop, "height")), int(_get(crop, "width"))) if crop is not None else None,
        pad_to_square=pad,
        **pixel_settings(ip),
    )


def renders_video(processor, marker: str, source: str | None = None) -> bool:
    """Does the chat template (the processor's, or source) write `marker` for a message's video item?"""
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    try:
        return _render(processor, source or processor.chat_template, msgs).count(marker) == 1
    except Exception:
        return False


PROBES = [  # conversations without video: two templates that render these alike render every such prompt alike
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
     {"role": "user", "content": [{"type": "text", "text": "c"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "s"}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}],
]


def renders_alike(processor, a: str, b: str) -> bool:
    try:
        return all(_render(processor, a, m) == _render(processor, b, m) for m in PROBES)
    except Exception:
        return False


def _render(processor, source: str, msgs) -> str:
    from edgevlm.template import render

    tok = processor.tokenizer
    return render(source, msgs, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")


def tile_preprocess(ip, tile: int) -> Preprocess:
    """A square tile of `tile` pixels with the processor's resampling and normalisation (tiled families)."""
    return Preprocess(size=(tile, tile), **pixel_settings(ip))


def pixel_settings(ip) -> dict:
    """What an HF image processor does to pixel values: resampling filter and kernel, rescale, normalisation."""
    resample = ip.resample
    return dict(
        resample=_RESAMPLE[int(resample.value if hasattr(resample, "value") else resample)],
        rescale=float(ip.rescale_factor) if ip.do_rescale else 1.0,
        mean=tuple(float(x) for x in ip.image_mean) if ip.do_normalize else (0.0, 0.0, 0.0),
        std=tuple(float(x) for x in ip.image_std) if ip.do_normalize else (1.0, 1.0, 1.0),
        resize_kernel="pil" if getattr(ip, "backend", "torchvision") == "pil" else "torchvision",
    )
