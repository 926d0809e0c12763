"""FastVLM (transformers `fast_vlm`): timm FastViT/MCi tower -> flatten the feature map -> MLP projector -> Qwen2."""

from __future__ import annotations

import torch

from .base import Adapter


class FastVlmAdapter(Adapter):
    family = "fast_vlm"
    model_types = ("fast_vlm",)

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = model.model.vision_tower(pixel_values, return_dict=True).last_hidden_state  # [1, C, h, w]
        return model.model.multi_modal_projector(fmap.flatten(2).permute(0, 2, 1))  # [1, h*w, D]
