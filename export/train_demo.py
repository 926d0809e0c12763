"""Train the embedded demo: a FastVLM-architecture model on the procedural shapes world, on CPU, in a budget.

    python -m edgevlm.export.train_demo --out runs/demo --minutes 41 --export runs/demo-bundle

transformers `fast_vlm` (a small timm FastViT tower, the MLP projector, a small Qwen2), trained from
scratch. Each step encodes a few scenes once and asks several questions about each (the tower's cost is
shared); the loss is on the answer tokens only. The learning rate follows the wall clock (warmup, then
cosine), so a run ends on time whatever the machine's speed. `--variant mini` trains the LLaVA-Mini model
(one vision token + pre-fusion), starting from a trained standard checkpoint with `--init`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgevlm.data import shapes

TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = 128  # FastViT downsamples 32x: 4 x 4 = 16 image tokens
VISION = {"embed_dims": (32, 64, 128, 256), "layers": (2, 2, 4, 2)}
TEXT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 768, "max_position_embeddings": 512}


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


def build_model(tok):
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="fastvit_t8", hidden_size=VISION["embed_dims"][-1] * 2,
                               do_pooling=False, model_args={"inference_mode": True, **VISION})
    text = Qwen2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, **TEXT)
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


GRID = IMAGE_SIZE // 32
VAL_EVERY = 500
ATTRS = ["present"] + list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.SIZES)


def cell_targets(scene) -> np.ndarray:
    """[GRID*GRID, len(ATTRS)] multi-hot: what sits in each cell of the tower's output grid (row-major)."""
    t = np.zeros((GRID * GRID, len(ATTRS)), np.float32)
    for o in scene.objects:
        cell = min(int(o.cy * GRID), GRID - 1) * GRID + min(int(o.cx * GRID), GRID - 1)
        for a in ("present", o.color, o.shape, o.size):
            t[cell, ATTRS.index(a)] = 1.0
    return t


class Batcher:
    """Scenes and questions -> tensors. `scenes` images per step, `per_scene` questions about each."""

    def __init__(self, tok, processor, n_image_tokens: int, scenes: int, per_scene: int, seed: int):
        self.tok, self.scenes, self.per_scene, self.seed = tok, scenes, per_scene, seed
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
        head, tail = processor.apply_chat_template(msgs, add_generation_prompt=True).split("Q")
        head = head.replace("<image>", "<image>" * n_image_tokens)
        self.head, self.tail = tok.encode(head), tok.encode(tail)
        self.eos = tok.eos_token_id
        self.index = 0

    def text(self, question: str, answer: str | None):
        prompt = self.head + self.tok.encode(question) + self.tail
        target = [] if answer is None else self.tok.encode(answer) + [self.eos]
        return prompt, target

    def next(self):
        pixels, rows, targets = [], [], []
        for _ in range(self.scenes):
            ex = shapes.make_example(self.seed, self.index, split="train", size=IMAGE_SIZE)
            targets.append(cell_targets(ex.scene))
            rng = np.random.default_rng([self.seed, self.index, 7])
            self.index += 1
            qa = [(ex.qtype, ex.question, ex.answer)]
            qa += shapes.scene_questions(ex.scene, rng, self.per_scene - 1)
            pixels.append(np.asarray(ex.image, np.float32).transpose(2, 0, 1) / 255.0)
            rows.append([self.text(q, a) for _, q, a in qa])
        return collate(np.stack(pixels), rows, self.tok.pad_token_id), torch.from_numpy(np.stack(targets))


def collate(pixels, rows, pad_id):
    """rows[i] = questions about image i as (prompt ids, target ids) -> padded tensors (right padding)."""
    flat = [(i, p, t) for i, qs in enumerate(rows) for p, t in qs]
    width = max(len(p) + len(t) for _, p, t in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    labels = torch.full((len(flat), width), -100, dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.long)
    prompt = torch.zeros((len(flat), width), dtype=torch.bool)
    for r, (_, p, t) in enumerate(flat):
        seq = p + t
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(p): len(seq)] = torch.tensor(t)
        mask[r, : len(seq)] = 1
        prompt[r, : len(p)] = True
    which = torch.tensor([i for i, _, _ in flat])
    return torch.from_numpy(pixels), which, ids, labels, mask, prompt


def forward_loss(model, image_id, pixels, which, ids, labels, mask, prompt):
    """Encode each image once, splice its embeds into every question about it, LM loss on answers."""
    grid = model.model.vision_tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)  # [B_img, N, C]
    feats = model.model.multi_modal_projector(grid)  # as FastVLM's get_image_features: [B_img, N, D]
    embeds = model.model.get_input_embeddings()(ids)
    img_rows = feats[which].reshape(-1, feats.shape[-1]).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == image_id)[..., None], img_rows)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return (*_answer_loss(model.lm_head(hidden[:, :-1]), labels), grid)


def forward_loss_mini(mini, image_id, pixels, which, ids, labels, mask, prompt):
    """LLaVA-Mini: fused prompt + one compressed token; same loss."""
    vt = mini.base.model
    grid = vt.vision_tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)  # [B_img, N, C]
    feats = vt.multi_modal_projector(grid)[which]  # [B_q, N, D]
    x = mini.llm_embeds(feats, ids, mask, prompt, image_id)
    return (*_answer_loss(mini.logits(x, mask)[:, :-1], labels), grid)


def _answer_loss(logits, labels):
    """Cross-entropy on answer tokens, averaged per answer first: a 12-token description must not outweigh
    twelve one-word answers."""
    tgt = labels[:, 1:]
    tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                               reduction="none").reshape(tgt.shape)
    n = (tgt != -100).sum(dim=1).clamp(min=1)
    loss = (tok_loss.sum(dim=1) / n).mean()
    with torch.no_grad():  # teacher-forced exact match: every answer token right
        ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(dim=1).float().mean()
    return loss, float(ok)


def lr_at(frac: float, peak: float, warm: float = 0.03) -> float:
    if frac < warm:
        return peak * frac / warm
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


@torch.no_grad()
def recalibrate_bn(model, batcher, batches: int = 40) -> None:
    """Recompute BatchNorm population statistics with the final weights.

    The running averages lag weights that move fast; in eval mode they gave chance-level answers where the
    same weights with batch statistics answered well. A cumulative average over fresh training images fixes
    the exported (eval-mode) model.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
        bn.train()
    tower = model.base.model if hasattr(model, "base") else model.model
    for _ in range(batches):
        pixels = batcher.next()[0][0]
        tower.vision_tower(pixels)
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


@torch.no_grad()
def validate(model, batcher, image_id, n: int = 256, loss_fn=forward_loss) -> float:
    recalibrate_bn(model, batcher)
    pixels, rows = [], []
    for ex in shapes.examples(shapes.VALIDATION_SEED, n, split="eval", size=IMAGE_SIZE):
        pixels.append(np.asarray(ex.image, np.float32).transpose(2, 0, 1) / 255.0)
        rows.append([batcher.text(ex.question, ex.answer)])
    accs = []
    for s in range(0, n, 64):
        batch = collate(np.stack(pixels[s:s + 64]), rows[s:s + 64], batcher.tok.pad_token_id)
        accs.append(loss_fn(model, image_id, *batch)[1])
    model.train()
    return float(np.mean(accs))


def train(out: Path, minutes: float, seed: int = 0, scenes: int = 8, per_scene: int = 6, lr: float = 7e-4,
          threads: int = 2, variant: str = "standard", init: Path | None = None, aux_weight: float = 1.0,
          log=print) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if variant == "standard" and init is not None:  # continue a run (fresh optimizer, same recipe)
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(init)
        processor = build_processor(tok)
        model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32).train()
        image_id, n_img, loss_fn = model.config.image_token_id, (IMAGE_SIZE // 32) ** 2, forward_loss
    elif variant == "standard":
        tok = build_tokenizer()
        processor = build_processor(tok)
        model = build_model(tok).train()
        image_id, n_img, loss_fn = model.config.image_token_id, (IMAGE_SIZE // 32) ** 2, forward_loss
    else:  # LLaVA-Mini from a trained standard checkpoint, as the paper starts from pretrained parts
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from .llava_mini import MiniVLM

        if init is None:
            raise SystemExit("--variant mini needs --init STANDARD_CHECKPOINT")
        tok = AutoTokenizer.from_pretrained(init)
        processor = build_processor(tok, patch=IMAGE_SIZE)
        model = MiniVLM(AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32),
                        grid=IMAGE_SIZE // 32).train()
        image_id, n_img, loss_fn = model.base.config.image_token_id, 1, forward_loss_mini
    batcher = Batcher(tok, processor, n_img, scenes, per_scene, seed)
    # Auxiliary dense supervision, dropped after training: a linear probe on the tower's output grid must
    # name what sits in each cell. It gives the tower a direct signal from step one, where the answer loss
    # alone left it near chance for the whole budget.
    aux = torch.nn.Linear(VISION["embed_dims"][-1] * 2, len(ATTRS))
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()), lr=lr, betas=(0.9, 0.98),
                            weight_decay=0.05)
    budget = minutes * 60.0
    start = time.perf_counter()
    step, history = 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget, lr)
        batch, targets = batcher.next()
        loss, acc, grid = loss_fn(model, image_id, *batch)
        if aux_weight:
            loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux(grid), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            entry = {"step": step, "minutes": round(elapsed / 60, 2), "loss": round(loss.item(), 4),
                     "train_exact": round(acc, 3)}
            if step % VAL_EVERY == 0:
                entry["val_exact"] = round(validate(model, batcher, image_id, loss_fn=loss_fn), 4)
            history.append(entry)
            log(json.dumps(entry))
    model.eval()
    final_val = validate(model, batcher, image_id, n=512, loss_fn=loss_fn)
    out.mkdir(parents=True, exist_ok=True)
    model.half()  # fp16 on disk: half the bytes; the exporter computes in fp32
    if variant == "mini":
        model.save(out)
    else:
        model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"variant": variant, "steps": step, "minutes": round((time.perf_counter() - start) / 60, 2), "examples": step * scenes * per_scene,
               "images": step * scenes, "val_teacher_forced_exact": final_val, "history": history,
               "params": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevlm.export.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=40.0, help="training wall-clock budget (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=8, help="images per step")
    p.add_argument("--per-scene", type=int, default=6, help="questions per image per step")
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--variant", choices=["standard", "mini"], default="standard",
                   help="mini = LLaVA-Mini (one vision token + pre-fusion), needs --init")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this standard checkpoint (continue training; required for --variant mini)")
    p.add_argument("--export", type=Path, default=None, metavar="BUNDLE",
                   help="then export the checkpoint to this bundle directory (parity-checked)")
    args = p.parse_args(argv)
    summary = train(args.out, args.minutes, args.seed, args.scenes, args.per_scene, args.lr, variant=args.variant,
                    init=args.init, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if args.export:
        from .exporter import export

        export(args.out, args.export, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
