"""FastVLM (transformers `fast_vlm`): timm FastViT/MCi tower -> flatten the feature map -> MLP projector -> Qwen2.
Apple's own layout (`llava_qwen2`, the checkpoints published as apple/FastVLM-*) is converted on load
(export/fastvlm_apple.py) to the same model."""

from __future__ import annotations

import torch

from .base import Adapter


class FastVlmAdapter(Adapter):
    family = "fast_vlm"
    model_types = ("fast_vlm",)
    processors = ("LlavaProcessor",)

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = model.model.vision_tower(pixel_values, return_dict=True).last_hidden_state  # [1, C, h, w]
        return model.model.multi_modal_projector(fmap.flatten(2).permute(0, 2, 1))  # [1, h*w, D]


class FastVlmAppleAdapter(FastVlmAdapter):
    model_types = ("llava_qwen2",)

    def load_model(self, hf_dir):
        from ..fastvlm_apple import load

        return load(hf_dir)

    def load_processor(self, hf_dir):
        from ..fastvlm_apple import processor

        return processor(hf_dir)
