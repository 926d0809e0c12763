"""MobileVLM / MobileVLM V2 ("MobileVLM: A Fast, Reproducible and Strong Vision Language Assistant for Mobile
Devices"): CLIP tower -> LDP or LDPv2 projector -> MobileLLaMA (a Llama), as a small PyTorch model.

Not in transformers. The module tree reproduces the parameter names of the published checkpoints
(`model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.*`, `model.layers.*`, `lm_head`), so a
downloaded checkpoint directory (config.json + weights + tokenizer) loads as it is. The CLIP tower's config
is not in such a directory (it names a hub model): the towers the published checkpoints use are known here;
a `mm_vision_config` object in config.json (our test checkpoints) or a local tower directory also works.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from edgevlm.errors import ExportError

KNOWN_TOWERS = {  # hub name -> CLIPVisionConfig fields
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
}
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
# MobileVLM's "v1" conversation (Vicuna v1): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}" + SYSTEM
    + "{% endif %} {% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class MobileVlmConfig(LlamaConfig):
    model_type = "mobilevlm"


def tower_config(config) -> CLIPVisionConfig:
    own = getattr(config, "mm_vision_config", None)
    if own:
        return CLIPVisionConfig(**own)
    name = getattr(config, "mm_vision_tower", None) or ""
    if name in KNOWN_TOWERS:
        return CLIPVisionConfig(**KNOWN_TOWERS[name])
    if name and (Path(name) / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(name)
    raise ExportError(f"MobileVLM vision tower {name!r} is unknown: add its CLIPVisionConfig as mm_vision_config")


class ClipTower(nn.Module):  # pixels [B, 3, S, S] -> patch features [B, (S/p)^2, C] of the selected layer
    def __init__(self, config):
        super().__init__()
        self.vision_tower = CLIPVisionModel(tower_config(config))
        self.select_layer = getattr(config, "mm_vision_select_layer", -2)
        self.keep_cls = getattr(config, "mm_vision_select_feature", "patch") == "cls_patch"

    def forward(self, pixels):
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden if self.keep_cls else hidden[:, 1:]


def _to_map(x):  # [B, N, C] -> [B, C, h, h]
    side = math.isqrt(x.shape[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class _LdpBlock(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        from timm.layers.norm_act import LayerNormAct2d
        from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

        norm = partial(LayerNormAct2d, act_layer=None)
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        # two MobileNetV3 blocks (depthwise 3x3, squeeze-excitation, hard-swish); the second halves the grid
        self.mb_block = nn.Sequential(nn.Identity(), *[
            InvertedResidual(InvertedResidualConfig(ouc, 3, ouc, ouc, True, "HS", stride, 1, 1), norm)
            for stride in (1, 2)])

    def forward(self, x):
        return self.mb_block(_to_map(self.mlp(x))).flatten(2).transpose(1, 2)


class LdpProjector(nn.Module):  # MobileVLM v1 ("ldpnet"): [B, N, C] -> [B, N / 4, D]
    def __init__(self, inc, ouc):
        super().__init__()
        self.model = _LdpBlock(inc, ouc)

    def forward(self, x):
        return self.model(x)


class _Mlp(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))

    def forward(self, x):
        return self.mlp(x)


class _Peg(nn.Module):  # positional encoding generator: x + depthwise 3x3 conv of x
    def __init__(self, ch):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1, bias=True, groups=ch))

    def forward(self, x):
        return x + self.peg(x)


class LdpV2Projector(nn.Module):  # MobileVLM V2 ("ldpnetv2"): MLP, average-pool to a g x g grid, PEG
    def __init__(self, inc, ouc, grid: int = 12):
        super().__init__()
        self.mlp, self.peg, self.grid = _Mlp(inc, ouc), _Peg(ouc), grid

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(_to_map(self.mlp(x)), self.grid)
        return self.peg(x).flatten(2).transpose(1, 2)


def build_projector(config) -> nn.Module:
    kind, inc, ouc = config.mm_projector_type, config.mm_hidden_size, config.hidden_size
    if kind.startswith("ldpnetv2"):
        return LdpV2Projector(inc, ouc, getattr(config, "mm_projector_grid", 12))
    if kind.startswith("ldpnet"):
        return LdpProjector(inc, ouc)
    raise ExportError(f"MobileVLM projector {kind!r} is not supported (ldpnet, ldpnetv2)")


class MobileVlmModel(LlamaModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = ClipTower(config)
        self.mm_projector = build_projector(config)


class MobileVlmForCausalLM(LlamaForCausalLM):
    """MobileLLaMA with the image rows spliced in at the `<image>` placeholders (config.image_token_index)."""

    config_class = MobileVlmConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MobileVlmModel(config)
        self.post_init()

    def image_features(self, pixel_values):  # [B, 3, S, S] -> [B, n, D]
        return self.model.mm_projector(self.model.vision_tower(pixel_values))

    def embed(self, input_ids):  # the placeholder id may lie past the vocabulary: its row is replaced anyway
        vocab = self.model.embed_tokens.num_embeddings
        return self.model.embed_tokens(torch.where(input_ids < vocab, input_ids, 0))

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
            image = input_ids == self.config.image_token_index
            if pixel_values is not None and bool(image.any()):
                rows = self.image_features(pixel_values).to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
                inputs_embeds = inputs_embeds.masked_scatter(image[..., None].expand_as(inputs_embeds), rows)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


TOWER = "model.vision_tower.vision_tower."
PUBLISHED_TOWER = TOWER + "vision_model."  # transformers 5 dropped CLIPVisionModel's `vision_model` level
IGNORED = ("position_ids", "rotary_emb.inv_freq")  # buffers older checkpoints carry


def published_names(state: dict) -> dict:
    return {(PUBLISHED_TOWER + k[len(TOWER):] if k.startswith(TOWER) else k): v for k, v in state.items()}


def read_weights(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: safetensors, else PyTorch .bin files (tensors only)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(Path(hf_dir).glob("pytorch_model*.bin"))
    if not files:
        raise ExportError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _tower_depth(config, names) -> None:
    """A published config names its CLIP tower but not its depth: the encoder layers present in the weights
    decide (a copy with fewer layers, e.g. a random-weight test checkpoint, loads as it is)."""
    name = getattr(config, "mm_vision_tower", None) or ""
    if getattr(config, "mm_vision_config", None) or name not in KNOWN_TOWERS:
        return
    prefix = PUBLISHED_TOWER + "encoder.layers."
    layers = {int(k[len(prefix):].split(".")[0]) for k in names if k.startswith(prefix)}
    if layers and len(layers) < KNOWN_TOWERS[name]["num_hidden_layers"]:
        config.mm_vision_config = {**KNOWN_TOWERS[name], "num_hidden_layers": len(layers)}


def load(hf_dir) -> MobileVlmForCausalLM:
    """A published MobileVLM checkpoint directory -> the model in fp32; every parameter must be found."""
    config = MobileVlmConfig.from_pretrained(hf_dir)
    if getattr(config, "image_token_index", None) is None:
        config.image_token_index = config.vocab_size  # the `<image>` token the exporter adds after the vocabulary
    weights = read_weights(hf_dir)
    _tower_depth(config, weights)
    model = MobileVlmForCausalLM(config).float().eval()
    state = {(TOWER + k[len(PUBLISHED_TOWER):] if k.startswith(PUBLISHED_TOWER) else k): v
             for k, v in weights.items() if not k.endswith(IGNORED)}
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(IGNORED)]
    if missing or unexpected:
        raise ExportError(f"MobileVLM weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def save_weights(model: MobileVlmForCausalLM, out_dir) -> None:
    """model.safetensors under the published names (the config is written by whoever owns it)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in published_names(model.state_dict()).items() if not k.endswith(IGNORED)}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # one tensor, as tied checkpoints store it
    save_file(state, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


def save(model: MobileVlmForCausalLM, out_dir) -> None:
    """Write a checkpoint laid out like the published ones (config.json + model.safetensors)."""
    save_weights(model, out_dir)
    model.config.save_pretrained(out_dir)
