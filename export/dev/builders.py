"""Random-weight checkpoints of each family, written as real HF checkpoint directories.

Tests build tiny ones; benchmarks build real-size ones (random weights: say so beside every figure).
A checkpoint is config + safetensors + a tokenizer trained on the fly + the processor files with a chat
template, so the exporter reads it exactly as it would read a downloaded one. Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = (
    "what color is the circle? the circle is red. how many squares are there? there are three squares. "
    "is there a blue star in the image? yes. no. which object is bigger, the triangle or the square? "
    "describe the image. a small green triangle left of a large yellow star. the image shows a cat on a mat. "
    "where is the purple square? at the top. bottom left right of above below next to. one two three four "
    "five six seven eight nine ten. orange cyan white black gray pink brown. hello world, how are you today? "
)

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: {% elif "
    "message['role'] == 'assistant' %}ASSISTANT: {% else %}{{ message['role'] | upper }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class TextDims:
    arch: str = "qwen2"  # qwen2 | llama
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384  # trained BPE size; special tokens come on top
    vocab_size: int | None = None  # embedding rows (real-size benchmarks); None: the tokenizer's size
    max_positions: int = 1024
    tie_embeddings: bool = False
    init_range: float = 0.1  # sharper than HF's 0.02, so that a random model's attention can tell tokens apart


@dataclass
class VisionDims:
    tower: str = "fastvit"  # fastvit | clip | siglip
    image_size: int = 64
    timm_arch: str = "fastvit_t8"  # fastvit: the timm architecture (fastvit_mci3: FastVLM's FastViTHD)
    stride: int = 32  # fastvit: pixels per image token along a side (t8: 32; mci3, one more stage: 64)
    # fastvit: timm model args; clip/siglip: ViT dims
    embed_dims: tuple = (16, 32, 64, 128)
    layers: tuple = (1, 1, 1, 1)
    hidden: int = 48
    vit_layers: int = 2
    heads: int = 4
    patch: int = 8
    feature_layer: int = -1
    select: str = "default"  # llava: "default" drops CLS, "full" keeps it
    tiles: int = 3  # smolvlm: longest edge = tiles * image_size; llava_onevision: grids up to tiles x tiles
    scale: int = 2  # smolvlm: pixel-shuffle factor
    projector: str = "ldpv2"  # mobilevlm: ldp | ldpv2


@dataclass
class CheckpointSpec:
    family: str  # fast_vlm | llava
    text: TextDims = field(default_factory=TextDims)
    vision: VisionDims = field(default_factory=VisionDims)
    seed: int = 0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)


def train_tokenizer(arch: str, vocab: int, corpus: str = CORPUS, extra: tuple[str, ...] = (), eos: str = "<|im_end|>"):
    """A BPE tokenizer trained here: byte-level like Qwen2 (with `extra` special tokens), or metaspace + BOS
    like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "llama":
        specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
        tok.train_from_iterator([corpus] * 4, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", *extra]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})


def _text_config(d: TextDims, vocab_size: int, tok):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if d.arch == "llama" else Qwen2Config
    extra = {"bos_token_id": tok.bos_token_id} if tok.bos_token_id is not None else {}
    return cls(vocab_size=d.vocab_size or vocab_size, hidden_size=d.hidden, intermediate_size=d.intermediate,
               num_hidden_layers=d.layers, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
               max_position_embeddings=d.max_positions, tie_word_embeddings=d.tie_embeddings,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=d.init_range, **extra)


def _vision_config(v: VisionDims):
    from transformers import CLIPVisionConfig, SiglipVisionConfig, TimmWrapperConfig

    if v.tower == "fastvit":
        return TimmWrapperConfig(architecture=v.timm_arch, hidden_size=v.embed_dims[-1] * 2, do_pooling=False,
                                 model_args={"inference_mode": True, "embed_dims": tuple(v.embed_dims),
                                             "layers": tuple(v.layers)})
    cls = CLIPVisionConfig if v.tower == "clip" else SiglipVisionConfig
    return cls(hidden_size=v.hidden, intermediate_size=v.hidden * 2, num_hidden_layers=v.vit_layers,
               num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch)


def build_model(spec: CheckpointSpec, tok):
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, LlavaConfig, LlavaForConditionalGeneration

    vocab_size = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    text_cfg = _text_config(spec.text, vocab_size, tok)
    vis_cfg = _vision_config(spec.vision)
    torch.manual_seed(spec.seed)
    if spec.family == "fast_vlm":
        cfg = FastVlmConfig(vision_config=vis_cfg, text_config=text_cfg, image_token_index=image_id,
                            image_seq_length=(spec.vision.image_size // spec.vision.stride) ** 2)
        model = FastVlmForConditionalGeneration(cfg)
    else:
        cfg = LlavaConfig(vision_config=vis_cfg, text_config=text_cfg, image_token_index=image_id,
                          vision_feature_layer=spec.vision.feature_layer,
                          vision_feature_select_strategy=spec.vision.select)
        model = LlavaForConditionalGeneration(cfg)
    model.config.tie_word_embeddings = spec.text.tie_embeddings
    make_image_matter(model, spec)
    return model.eval()


@torch.no_grad()
def make_image_matter(model, spec: CheckpointSpec, tower=None, linears=None, run=None) -> None:
    """Random towers barely react to their input (FastViT's layer scales start near 0): re-draw them with a
    fan-in scale, then centre and scale the projector's input so that the image decides the answer.
    tower / linears (projector Linears, first one first) / run (pixels -> forward) default to LLaVA's."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    tower = model.model.vision_tower if tower is None else tower
    if linears is None:
        linears = [model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2]
    run = run or (lambda px: model.model.get_image_features(pixel_values=px))
    for name, p in tower.named_parameters():
        if "layer_scale" in name or name.endswith("gamma"):
            p.fill_(1.0)
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    for lin in linears:
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
    size = spec.vision.image_size
    probe = torch.rand((4, 3, size, size), generator=g)
    probe = (probe - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    lin = linears[0]
    feats = _projector_input(lin, run, probe).flatten(0, -2)  # [B * N, C]
    mean, std = feats.mean(dim=0), feats.std() + 1e-6  # one scale: no channel blown up
    lin.weight.div_(std)
    if lin.bias is not None:
        lin.bias.sub_(lin.weight @ mean)


def _projector_input(linear, run, pixels):
    captured = {}
    hook = linear.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
    try:
        run(pixels)
    finally:
        hook.remove()
    return captured["x"]


def build_checkpoint(spec: CheckpointSpec, out_dir: str | os.PathLike) -> Path:
    """Write a complete random-weight checkpoint directory (model, tokenizer, processor, template)."""
    if spec.family not in ("fast_vlm", "llava"):
        from .family_builders import build_family_checkpoint

        return build_family_checkpoint(spec, out_dir)
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.text.arch, spec.text.vocab)
    model = build_model(spec, tok)
    model.save_pretrained(out)
    v = spec.vision
    size = v.image_size
    if v.tower == "siglip":
        ip = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=list(spec.mean),
                                  image_std=list(spec.std))
    else:
        ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(spec.mean), image_std=list(spec.std))
    if spec.family == "fast_vlm":
        patch, select, extra = v.stride, "full", 0
    else:
        patch, select, extra = v.patch, v.select, 1 if v.tower == "clip" else 0
    template = LLAMA_TEMPLATE if spec.text.arch == "llama" else QWEN_TEMPLATE
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=select,
                          chat_template=template, num_additional_image_tokens=extra)
    proc.save_pretrained(out)
    return out


def build_mini_checkpoint(spec: CheckpointSpec, out_dir: str | os.PathLike, fusion_layers: int = 1) -> Path:
    """A random-weight LLaVA-Mini (one vision token + pre-fusion) over a FastVLM checkpoint of `spec`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..llava_mini import MiniVLM

    out = build_checkpoint(spec, out_dir)
    base = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(spec.seed + 7)
    mini = MiniVLM(base, fusion_layers=fusion_layers, grid=spec.vision.image_size // 32)
    with torch.no_grad():  # a zero fusion projection would leave the pre-fusion path untested
        mini.fuse_out.weight.normal_(0, 0.5 / spec.text.hidden ** 0.5)
    mini.save(out)
    processor = AutoProcessor.from_pretrained(out)
    processor.patch_size = spec.vision.image_size  # one placeholder per image
    processor.save_pretrained(out)
    return out
