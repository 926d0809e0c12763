"""Apple's FastVLM checkpoints as published (`apple/FastVLM-*`: `model_type: llava_qwen2`, custom code), converted
on the fly to transformers' `fast_vlm` (FastVlmForConditionalGeneration), as transformers'
`convert_fastvlm_weights_to_hf.py` converts them. What is converted:

- config: the flat LLaVA-Qwen2 config -> a Qwen2 text config + a timm `fastvit_mci3` tower (MobileCLIP-L's
  FastViTHD, re-parameterised) + an `mlp2x_gelu` projector; the tower's blocks per stage are read from the weights.
- weights: Apple's module names -> timm's and transformers' (`network.I.J` -> `stages.S.blocks.J`, `conv_exp` ->
  `final_conv`, `convffn` -> `mlp`, `lkb_reparam` -> `reparam_conv`, ...); the CLIP head's `head.proj` is dropped.
- tokenizer: `<image>` is added as a special token (Apple splices id -200 instead); it takes the first free id,
  inside the embedding matrix (Qwen2 keeps spare rows), whose row the image rows replace anyway.
- processor: what Apple's code builds (CLIPImageProcessor: shortest edge = crop = the tower's size, bicubic,
  mean 0, std 1) with `image_aspect_ratio: pad` (a square in the mean colour first, as Apple's process_images
  does; transformers' converted checkpoints centre-crop instead), PIL kernels as in Apple's pipeline, and the
  chat template transformers' conversion gives these checkpoints (`<image>` then `\\n` + the text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import ExportError


@dataclass(frozen=True)
class Tower:
    timm_arch: str
    image_size: int
    stride: int  # pixels per image token along a side


TOWERS = {"mobileclip_l_1024": Tower("fastvit_mci3", 1024, 64)}  # FastViTHD widths 96, 192, 384, 768, 1536

# Apple's FastViT keeps every stage part in one list, `network`: blocks of stage S at BLOCKS[S], the downsampling
# before stage S at DOWN[S], the conditional positional encoding before stage S at POS[S] (FastViTHD: stages 3, 4)
BLOCKS, DOWN, POS = {0: 0, 1: 2, 2: 4, 3: 7, 4: 10}, {1: 1, 2: 3, 3: 5, 4: 8}, {3: 6, 4: 9}
APPLE_TOWER, HF_TOWER = "model.vision_tower.vision_tower.model.", "model.vision_tower.timm_model."
# language model and projector: Apple (LLaVA) name prefix <-> transformers fast_vlm prefix
PREFIXES = (("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
            ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
            ("model.", "model.language_model."))
RENAMES = ((".mlp.", ".convffn."), ("final_conv.", "conv_exp."), ("se.fc1.", "se.reduce."), ("se.fc2.", "se.expand."),
           ("stem.", "patch_embed."))
TEMPLATE = (  # transformers' convert_fastvlm_weights_to_hf.py gives converted checkpoints this template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def check(config: dict) -> Tower:
    """The one tower and projector this conversion knows; anything else is one clear error."""
    tower = config.get("mm_vision_tower")
    if tower not in TOWERS:
        raise ExportError(f"llava_qwen2: mm_vision_tower {tower!r} is not supported (only Apple FastVLM's "
                          f"{', '.join(TOWERS)}); convert the checkpoint to a transformers layout first")
    for field, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_patch_merge_type", "flat")):
        if config.get(field, want) != want:
            raise ExportError(f"llava_qwen2: {field} {config.get(field)!r} is not supported (only {want!r})")
    if config.get("image_aspect_ratio", "pad") not in ("pad", "square", None):
        raise ExportError(f"llava_qwen2: image_aspect_ratio {config['image_aspect_ratio']!r} is not supported "
                          "(pad, square)")
    return TOWERS[tower]


def stage_depths(names, stages: int = 5) -> tuple[int, ...]:
    """Blocks per stage, counted in Apple's weight names (`...network.I.J.*`)."""
    found = {}
    for name in names:
        m = re.match(re.escape(APPLE_TOWER) + r"network\.(\d+)\.(\d+)\.", name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(found.get(BLOCKS[s], ())) for s in range(stages))


def fast_vlm_config(config: dict, stages: tuple[int, ...] | None = None, image_token_id: int = 151646):
    """The transformers FastVlmConfig of an Apple config dict (stages: blocks per tower stage; None = FastViTHD's)."""
    from transformers import FastVlmConfig, Qwen2Config, TimmWrapperConfig

    tower = check(config)
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_dropout", "use_sliding_window",
                 "sliding_window", "max_window_layers", "initializer_range")
    text = Qwen2Config(**{k: config[k] for k in text_keys if k in config})
    args = {"inference_mode": True, **({"layers": tuple(stages)} if stages else {})}
    vision = TimmWrapperConfig(architecture=tower.timm_arch, hidden_size=int(config["mm_hidden_size"]),
                               do_pooling=False, model_args=args)
    return FastVlmConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=(tower.image_size // tower.stride) ** 2, projector_hidden_act="gelu",
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         multimodal_projector_bias=True)


def _tower_to_apple(t: str) -> str:  # a timm fastvit_mci3 name -> Apple's (without the prefixes)
    m = re.match(r"stages\.(\d+)\.(blocks|downsample|pos_emb)\.(.*)", t)
    if m:
        stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "blocks":
            t = f"network.{BLOCKS[stage]}.{rest}"
        elif part == "downsample":  # proj.0 is the large-kernel conv, named lkb_reparam by Apple
            rest = re.sub(r"^proj\.0\.reparam_conv", "proj.0.lkb_reparam", rest)
            t = f"network.{DOWN[stage]}.{rest}"
        else:
            t = f"network.{POS[stage]}.{rest}"
    t = "." + re.sub(r"(layer_scale(_[12])?)\.gamma$", r"\1", t)
    for ours, apple in RENAMES:
        t = t.replace(ours, apple)
    return t[1:]


def to_apple_names(state: dict) -> dict:
    """transformers fast_vlm names -> Apple's (what published apple/FastVLM-* checkpoints hold)."""
    out = {}
    for name, value in state.items():
        if name.startswith(HF_TOWER):
            out[APPLE_TOWER + _tower_to_apple(name[len(HF_TOWER):])] = value
            continue
        for apple, ours in PREFIXES:
            if name.startswith(ours):
                name = apple + name[len(ours):]
                break
        out[name] = value
    return out


def from_apple_names(state: dict, stages: tuple[int, ...]) -> dict:
    """Apple's names -> transformers fast_vlm names. Tower names go through the inverse of to_apple_names over
    the names a tower of these stage depths has (each maps one way only); `head.proj` (the CLIP head) is dropped."""
    names = _tower_names(stages)
    inverse = dict(zip(to_apple_names({n: n for n in names}), names))
    out, unknown = {}, []
    for name, value in state.items():
        if name == APPLE_TOWER + "head.proj" or name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith(APPLE_TOWER):
            if name not in inverse:
                unknown.append(name)
            out[inverse.get(name, name)] = value
            continue
        for apple, ours in PREFIXES:
            if name.startswith(apple):
                name = ours + name[len(apple):]
                break
        out[name] = value
    if unknown:
        raise ExportError(f"llava_qwen2: tower weights this conversion does not know, e.g. {unknown[:3]}")
    return out


def _tower_names(stages: tuple[int, ...]) -> list[str]:  # a meta-device tower: names without memory
    import timm
    import torch

    with torch.device("meta"):
        tower = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, inference_mode=True, layers=stages)
    return [HF_TOWER + k for k in tower.state_dict()]


def _weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir}: no *.safetensors weights (Apple's FastVLM checkpoints ship model.safetensors)")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def tokenizer(hf_dir: Path):
    """The checkpoint's tokenizer with `<image>` added as a special token."""
    from transformers import AddedToken

    from .adapters.base import load_tokenizer

    tok = load_tokenizer(hf_dir)
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    return tok


def load(hf_dir) -> "FastVlmForConditionalGeneration":  # noqa: F821
    """An Apple-layout checkpoint directory -> transformers' FastVlmForConditionalGeneration in fp32."""
    import json

    import torch
    from transformers import FastVlmForConditionalGeneration

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    check(config)
    weights = _weights(hf_dir)
    image_id = tokenizer(hf_dir).convert_tokens_to_ids("<image>")
    if image_id >= int(config["vocab_size"]):
        raise ExportError(f"llava_qwen2: the added <image> token ({image_id}) lies past vocab_size "
                          f"{config['vocab_size']}; convert with transformers' script, which resizes the embeddings")
    stages = stage_depths(weights)
    model = FastVlmForConditionalGeneration(fast_vlm_config(config, stages, image_id)).to(torch.float32).eval()
    state = {k: v.float() for k, v in from_apple_names(weights, stages).items()}
    if "lm_head.weight" not in state and config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"llava_qwen2: weights do not match FastViTHD + Qwen2: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.generation_config.eos_token_id = config.get("eos_token_id")
    return model


def processor(hf_dir):
    """What Apple's code does to an image and a prompt, as a transformers LlavaProcessor (see the module doc)."""
    import json

    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    tower = check(config)
    size = tower.image_size
    ip = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                                do_pad=config.get("image_aspect_ratio", "pad") == "pad",
                                image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer(hf_dir), patch_size=tower.stride,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=TEMPLATE, image_token="<image>")
