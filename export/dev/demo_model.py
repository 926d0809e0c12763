"""The demo model itself: a transformers `fast_vlm` (small timm FastViT tower, MLP projector, 6 x 128 Qwen2), its
byte-level BPE trained on the dataset's own text, its processor and chat template. export/dev/train_demo.py trains it.
"""

from __future__ import annotations

import torch

from edgevlm.data import shapes

from .demo_data import IMAGE_SIZE

TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION = {"embed_dims": (32, 64, 128, 256), "layers": (2, 2, 4, 2)}
# initializer_range 0.05 (not Qwen2's 0.02): with the default, attention logits start so small that the model
# spent ~300 steps at chance before it began to look up objects in the image; 0.05 had it at 45% by then.
# Depth over width: answers that relate two objects (left of, bigger than) need a lookup of each, then a
# comparison; 6 x 128 learnt them where 3 x 192 (same cost a token) did not in the same minutes.
TEXT = {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 352, "max_position_embeddings": 512, "initializer_range": 0.05}


def text_config(layers: int, hidden: int) -> dict:
    """TEXT resized: 32-wide heads, 2 KV heads, MLP 8/3 of the width (Qwen2's proportions)."""
    return {**TEXT, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 32,
            "intermediate_size": (hidden * 8 // 3 + 31) // 32 * 32}


def build_tokenizer():
    """Byte-level BPE trained on the dataset's own text, so every word of it is about one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    for ex in shapes.examples(0, 4000, split="train"):
        lines += [ex.question, ex.answer]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines + ["user assistant system"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})


def build_model(tok, text: dict = TEXT):
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="fastvit_t8", hidden_size=VISION["embed_dims"][-1] * 2,
                               do_pooling=False, model_args={"inference_mode": True, **VISION})
    text = Qwen2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, **text)
    cfg = FastVlmConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                        image_seq_length=(IMAGE_SIZE // 32) ** 2)
    model = FastVlmForConditionalGeneration(cfg)
    init_tower(model.model.vision_tower)
    return model


@torch.no_grad()
def init_tower(tower) -> None:
    """Start the deployable (reparameterized) FastViT where the train-time one starts.

    Training FastViT's train-time branches here crashes torch's oneDNN backward and runs 3x slower without
    oneDNN, so we train the inference-mode graph directly. There, RepMixer is a single depthwise conv that
    replaced `x + layer_scale * (mixer(x) - norm(x))`, which is ~identity at init: a Dirac kernel restores
    that, and He init on the other convs keeps the signal from vanishing through the stages.
    """
    from timm.models.fastvit import RepMixer

    mixers = {id(m.reparam_conv) for m in tower.modules() if isinstance(m, RepMixer)}
    for m in tower.modules():
        if isinstance(m, torch.nn.Conv2d):
            if id(m) in mixers:
                torch.nn.init.dirac_(m.weight, groups=m.groups)
            else:
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def build_processor(tok, patch: int = 32):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    # patch = IMAGE_SIZE makes the processor lay out ONE placeholder: the LLaVA-Mini prompt
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="full",
                          chat_template=TEMPLATE)
