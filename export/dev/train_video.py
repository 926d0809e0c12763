"""Fine-tune the LLaVA-Mini demo on shapes videos (edgevlm/data/shapes_video.py): one vision token per frame.

    python -m edgevlm.export.dev.train_video --init export/checkpoints/shapes-fastvlm-mini --out runs/mini-video \\
        --minutes 25 --export benchmarks/.cache/shapes-fastvlm-mini-video

A video enters as its frames, each an image of the message (the runtime's form for a bundle without a video
layout): the template's image marker once per frame, each frame compressed to its one token, and the prompt fused
with every frame alone and averaged (MiniVLM.video_embeds, as ictnlp's LLaVA-Mini does for video). The tower and
projector stay frozen (their features are computed without gradients); compressor, pre-fusion and the language
model learn. A quarter of the batches are still pictures with the still set's questions, so the model keeps
answering about single images. The learning rate follows the wall clock (warmup, cosine).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgevlm.data import shapes
from edgevlm.data.shapes_video import MAX_FRAMES, MIN_FRAMES, VIDEO_QTYPES, make_video_example

STILL_SHARE = 0.25
VAL_SEED = 1_000_003


class Prompts:
    """Token ids of "frames, then a question" prompts and of answers, as the checkpoint's chat template writes
    them (one image marker per frame: the processor expands each to the one placeholder)."""

    def __init__(self, processor):
        self.processor, self.tok = processor, processor.tokenizer
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")

    def prompt(self, frames: int, question: str) -> list[int]:
        content = [{"type": "image"}] * frames + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def answer(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) + [self.eos]


def pixels(images) -> torch.Tensor:  # PIL images of 128 px -> [N, 3, 128, 128] in 0..1 (the demo's processor)
    return torch.from_numpy(np.stack([np.asarray(i, np.float32).transpose(2, 0, 1) / 255.0 for i in images]))


def batch(rng: np.random.Generator, prompts: Prompts, size: int, step: int, split: str = "train", seed: int = 0,
          frames: int | None = None):
    """-> (frame pixels [B, F, 3, H, W], ids [B, T], attention mask, prompt mask, answer weights, qtypes); frames:
    1 (still pictures) or 2..8 (videos), drawn when None."""
    if frames is None:
        frames = 1 if rng.random() < STILL_SHARE else int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    exs = []
    for i in range(size):
        if frames == 1:
            e = shapes.make_example(seed, step * size + i, split)
            exs.append(((e.image,), e.question, e.answer, e.qtype))
        else:
            e = make_video_example(seed, step * size + i, split, frames)
            exs.append((e.frames, e.question, e.answer, e.qtype))
    seqs = [(prompts.prompt(frames, q), prompts.answer(a)) for _, q, a, _ in exs]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((size, width), prompts.tok.pad_token_id or 0, dtype=torch.long)
    mask, prompt_mask = torch.zeros((size, width), dtype=torch.long), torch.zeros((size, width), dtype=torch.bool)
    weight = torch.zeros((size, width))
    for r, (p, a) in enumerate(seqs):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        mask[r, : len(p) + len(a)] = 1
        prompt_mask[r, : len(p)] = True
        weight[r, len(p): len(p) + len(a)] = 1.0 / len(a)
    px = pixels([f for e in exs for f in e[0]]).reshape(size, frames, 3, 128, 128)
    return px, ids, mask, prompt_mask, weight, [e[3] for e in exs]


def forward(mini, px, ids, mask, prompt_mask, image_id):
    """-> logits [B, T, V] (bfloat16 autocast), the frozen tower's features computed without gradients."""
    b, f = px.shape[:2]
    with torch.no_grad():
        feats = mini.image_embeds(px.flatten(0, 1)).reshape(b, f, -1, mini.base.config.text_config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = mini.video_embeds(feats, ids, mask, prompt_mask, image_id)
        return mini.logits(x, mask)


def loss_of(logits, ids, weight):
    """Weighted cross-entropy on the answer tokens, and per row: every answer token right (teacher-forced)."""
    tgt, w = ids[:, 1:], weight[:, 1:]
    sel = w > 0
    lg = logits[:, :-1][sel].float()
    loss = (F.cross_entropy(lg, tgt[sel], reduction="none") * w[sel]).sum() / w.sum()
    wrong = torch.zeros_like(tgt, dtype=torch.bool)
    wrong[sel] = lg.argmax(-1) != tgt[sel]
    return loss, ~wrong.any(dim=1)


@torch.no_grad()
def validate(mini, prompts: Prompts, image_id: int, batches: int = 24) -> dict:
    """Teacher-forced exact match on held-out batches: a quarter still pictures, the rest videos of 2..8 frames."""
    rng, per = np.random.default_rng(VAL_SEED), {}
    for k in range(batches):
        frames = 1 if k % 4 == 0 else MIN_FRAMES + (k - k // 4 - 1) % (MAX_FRAMES - MIN_FRAMES + 1)
        px, ids, mask, pm, w, qtypes = batch(rng, prompts, 16, k, split="eval", seed=VAL_SEED, frames=frames)
        _, ok = loss_of(forward(mini, px, ids, mask, pm, image_id), ids, w)
        tag = "still" if px.shape[1] == 1 else "video"
        for q, good in zip(qtypes, ok.tolist()):
            per.setdefault(q if tag == "video" else "still", []).append(float(good))
    video = [x for q in VIDEO_QTYPES for x in per.get(q, [])]
    return {"video_exact": round(float(np.mean(video)), 4), "still_exact": round(float(np.mean(per["still"])), 4),
            "per_type": {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())}}


def train(init: Path, out: Path, minutes: float, lr: float = 5e-4, size: int = 16, seed: int = 0,
          threads: int = 2, check_minutes: float = 5.0, max_steps: int | None = None, val_batches: int = 48,
          log=print) -> dict:
    """Fine-tune for `minutes` of training (validation not counted) or max_steps, whichever ends first; save the
    checkpoint (with the processor files of init) and its training.json into out."""
    from transformers import AutoProcessor

    from ..llava_mini import MiniVLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    mini, processor = MiniVLM.load(init), AutoProcessor.from_pretrained(init)
    prompts, image_id = Prompts(processor), mini.base.config.image_token_id
    for p in mini.base.model.vision_tower.parameters():
        p.requires_grad_(False)
    for p in mini.base.model.multi_modal_projector.parameters():
        p.requires_grad_(False)
    params = [p for p in mini.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng, history = np.random.default_rng(seed), []
    history.append({"step": 0, "minutes": 0.0, "check": validate(mini, prompts, image_id, max(2, val_batches // 2))})
    log(json.dumps(history[-1]))
    start, step, budget, next_check = time.perf_counter(), 0, minutes * 60, check_minutes * 60
    while (elapsed := time.perf_counter() - start) < budget and (max_steps is None or step < max_steps):
        if elapsed >= next_check:
            t = time.perf_counter()
            history.append({"step": step, "minutes": round(elapsed / 60, 2),
                            "check": validate(mini, prompts, image_id, max(2, val_batches // 2))})
            log(json.dumps(history[-1]))
            start += time.perf_counter() - t  # checks are not charged to the budget
            next_check += check_minutes * 60
            continue
        frac = max(elapsed / budget, step / max_steps if max_steps else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr * (frac / 0.03 if frac < 0.03 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        px, ids, mask, pm, w, _ = batch(rng, prompts, size, step, seed=seed)
        loss, ok = loss_of(forward(mini, px, ids, mask, pm, image_id), ids, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            history.append({"step": step, "minutes": round(elapsed / 60, 2), "frames": px.shape[1],
                            "loss": round(loss.item(), 4), "train_exact": round(float(ok.float().mean()), 3)})
            log(json.dumps(history[-1]))
    final = validate(mini, prompts, image_id, val_batches)
    mini.eval()
    mini.save(out)
    for name in ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        if (init / name).is_file():
            shutil.copy(init / name, out / name)
    summary = {"init": init.name, "minutes": round((time.perf_counter() - start) / 60, 2), "steps": step,
               "batch": size, "lr": lr, "threads": threads,
               "still_share": STILL_SHARE, "val_teacher_forced": final, "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(json.dumps({"final": final, "steps": step}))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevlm.export.dev.train_video", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", type=Path, required=True, help="the LLaVA-Mini demo checkpoint to start from")
    p.add_argument("--out", type=Path, required=True, help="where the fine-tuned checkpoint goes")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the training loop")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", type=Path, default=None, help="also export the result to this bundle directory")
    args = p.parse_args(argv)
    train(args.init, args.out, args.minutes, args.lr, args.batch, args.seed, args.threads,
          log=lambda s: print(s, flush=True))
    if args.export is not None:
        from ..exporter import export

        export(args.out, args.export, overwrite=True, progress=False)
        print(f"exported {args.export}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
