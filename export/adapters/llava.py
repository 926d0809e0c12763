"""LLaVA (transformers `llava`): CLIP or SigLIP tower, a hidden layer picked by the config, MLP projector."""

from __future__ import annotations

import torch

from .base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    processors = ("LlavaProcessor",)

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = model.config
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [
            cfg.vision_feature_layer]
        feats = [out.hidden_states[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]  # drop CLS
        return model.model.multi_modal_projector(torch.cat(feats, dim=-1))  # [1, N, D]
