"""Random-weight checkpoints of the families beyond FastVLM and LLaVA: SmolVLM, LLaVA-OneVision, MobileVLM.

Same contract as checkpoints.py: a real checkpoint directory (config, safetensors, tokenizer, processor
files, chat template) that the exporter reads as it would read a downloaded one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .builders import QWEN_TEMPLATE, CheckpointSpec, _text_config, make_image_matter, train_tokenizer

SMOLVLM_TEMPLATE = (  # SmolVLM2's: images and videos in place
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ONEVISION_TEMPLATE = (  # llava-onevision-qwen2-*-ov-hf's: a message's images first, then its videos, then its text
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VIDEO_FPS, VIDEO_FRAMES = 1, 8  # the test checkpoints' video sampling: a frame a second, at most 8


def build_family_checkpoint(spec: CheckpointSpec, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {"smolvlm": _smolvlm, "mobilevlm": _mobilevlm, "llava_onevision": _onevision}
    builders[spec.family](spec, out)
    return out


def _vision_dims(v, cls, **extra):
    return cls(hidden_size=v.hidden, intermediate_size=v.hidden * 2, num_hidden_layers=v.vit_layers,
               num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch, **extra)


def _smolvlm(spec: CheckpointSpec, out: Path) -> None:
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor, SmolVLMVisionConfig)

    v = spec.vision
    markers = [f"<row_{r}_col_{c}>" for r in range(1, v.tiles + 1) for c in range(1, v.tiles + 1)]
    tok = train_tokenizer("qwen2", spec.text.vocab, eos="<end_of_utterance>",
                          extra=("<end_of_utterance>", "<fake_token_around_image>", "<global-img>", *markers))
    text_cfg = _text_config(spec.text, len(tok), tok)
    cfg = SmolVLMConfig(vision_config=_vision_dims(v, SmolVLMVisionConfig), text_config=text_cfg,
                        scale_factor=v.scale, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(spec.seed)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.config.tie_word_embeddings = spec.text.tie_embeddings
    make_image_matter(model, spec, tower=model.model.vision_model, linears=[model.model.connector.modality_projection.proj],
                      run=lambda px: model.model.get_image_features(pixel_values=px[:, None]))
    model.save_pretrained(out)
    ip = SmolVLMImageProcessor(size={"longest_edge": v.tiles * v.image_size},
                               max_image_size={"longest_edge": v.image_size},
                               image_mean=list(spec.mean), image_std=list(spec.std))
    per_tile = (v.image_size // v.patch) ** 2 // v.scale ** 2
    # SmolVLM2's video processor: a frame's longest edge to the image's, then one tile (no splitting)
    vp = SmolVLMVideoProcessor(video_sampling={"fps": VIDEO_FPS, "max_frames": VIDEO_FRAMES,
                                               "video_size": {"longest_edge": v.tiles * v.image_size}},
                               max_image_size={"longest_edge": v.image_size}, do_sample_frames=True,
                               image_mean=list(spec.mean), image_std=list(spec.std))
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=per_tile,
                            chat_template=SMOLVLM_TEMPLATE)
    proc.save_pretrained(out)


def _mobilevlm(spec: CheckpointSpec, out: Path) -> None:
    """Laid out like a published MobileVLM checkpoint: config.json + weights + tokenizer, no processor files."""
    from ..mobilevlm import MobileVlmConfig, MobileVlmForCausalLM, save

    v, t = spec.vision, spec.text
    tok = train_tokenizer(t.arch, t.vocab)
    text = _text_config(t, len(tok), tok).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    tower = dict(hidden_size=v.hidden, intermediate_size=v.hidden * 2, num_hidden_layers=v.vit_layers,
                 num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch)
    cfg = MobileVlmConfig(**text, mm_vision_tower="tiny-clip", mm_vision_config=tower, mm_hidden_size=v.hidden,
                          mm_projector_type="ldpnetv2" if v.projector == "ldpv2" else "ldpnet",
                          mm_projector_grid=v.image_size // v.patch // 2, mm_vision_select_layer=v.feature_layer,
                          mm_vision_select_feature="patch", image_aspect_ratio="pad",
                          image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(spec.seed)
    model = MobileVlmForCausalLM(cfg).eval()
    proj = model.model.mm_projector
    mlp = proj.mlp.mlp if v.projector == "ldpv2" else proj.model.mlp
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    make_image_matter(model, spec, tower=model.model.vision_tower, linears=linears, run=model.image_features)
    save(model, out)
    tok.save_pretrained(out)


def _onevision(spec: CheckpointSpec, out: Path) -> None:
    """Grids of up to tiles x tiles tiles; a small anyres_max so that large grids are shrunk (bilinear)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              SiglipVisionConfig)

    v, s = spec.vision, spec.vision.image_size
    tok = train_tokenizer(spec.text.arch, spec.text.vocab, extra=("<video>",))
    pins = [[s * r, s * c] for r in range(1, v.tiles + 1) for c in range(1, v.tiles + 1)]
    ratio = f"anyres_max_{max(1, v.tiles * v.tiles // 2)}"
    cfg = LlavaOnevisionConfig(vision_config=_vision_dims(v, SiglipVisionConfig),
                               text_config=_text_config(spec.text, len(tok), tok),
                               image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins,
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_select_strategy="full", vision_feature_layer=v.feature_layer,
                               vision_aspect_ratio=ratio)
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.config.tie_word_embeddings = spec.text.tie_embeddings
    adapter_rows = lambda px: model.model.multi_modal_projector(  # noqa: E731
        model.model.vision_tower(px, output_hidden_states=True).hidden_states[v.feature_layer])
    make_image_matter(model, spec, run=adapter_rows)
    model.save_pretrained(out)
    ip = LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=pins,
                                      image_mean=list(spec.mean), image_std=list(spec.std))
    vp = LlavaOnevisionVideoProcessor(size={"height": s, "width": s}, image_mean=list(spec.mean),
                                      image_std=list(spec.std), fps=VIDEO_FPS, do_sample_frames=True)
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                   num_image_tokens=(s // v.patch) ** 2, vision_feature_select_strategy="full",
                                   chat_template=ONEVISION_TEMPLATE, vision_aspect_ratio=ratio)
    proc.save_pretrained(out)
