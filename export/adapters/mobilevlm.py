"""MobileVLM / MobileVLM V2 (config `model_type: mobilevlm`; our PyTorch model in export/mobilevlm.py): CLIP tower,
LDP / LDPv2 projector (in the vision graph), MobileLLaMA. LLaVA-1.5 preprocessing: pad to a square in the mean
colour, resize, centre crop (PIL kernels, as the original pipeline ran)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, load_tokenizer


class _Embed(nn.Module):  # token embedding that tolerates the `<image>` id added after the vocabulary
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.embed(input_ids)


class MobileVlmAdapter(Adapter):
    family = "mobilevlm"
    model_types = ("mobilevlm",)

    def load_model(self, hf_dir):
        from ..mobilevlm import load

        return load(hf_dir)

    def load_processor(self, hf_dir):
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        from ..mobilevlm import CHAT_TEMPLATE, MobileVlmConfig, tower_config

        config = MobileVlmConfig.from_pretrained(hf_dir)
        tower = tower_config(config)
        tok = load_tokenizer(hf_dir)
        if "<image>" not in tok.get_vocab():
            tok.add_tokens(["<image>"], special_tokens=True)
        size = tower.image_size
        ip = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
            do_pad=getattr(config, "image_aspect_ratio", "pad") == "pad",
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
        side = size // tower.patch_size  # LDP's stride-2 block rounds up; LDPv2 pools to its grid
        side = getattr(config, "mm_projector_grid", 12) if config.mm_projector_type.startswith("ldpnetv2") else -(-side // 2)
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=size // side,
                              vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                              num_additional_image_tokens=0, image_token="<image>")

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.image_features(pixel_values)  # [1, n, D]

    def language_parts(self, model):
        return model.model, _Embed(model), model.lm_head

    def text_config(self, model):
        return model.config
