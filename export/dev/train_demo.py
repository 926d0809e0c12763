"""Train the embedded demo: a FastVLM-architecture model on the procedural shapes world, on CPU, in a budget.

    python -m edgevlm.export.dev.train_demo --out runs/demo --minutes 44 --export runs/demo-bundle
    python -m edgevlm.export.dev.train_demo --variant mini --init runs/demo --out runs/mini --minutes 20 --export runs/mini-bundle

transformers `fast_vlm` (a small timm FastViT tower, the MLP projector, a 6-layer x 128 Qwen2), from scratch,
in two stages inside one wall-clock budget:
1. vision (5 min): the tower alone, with a linear probe per attribute that must name what sits in each
   cell of its 4 x 4 output grid (colour, shape, size, row, column; the probe is dropped afterwards);
2. language (the rest): the tower frozen; projector and Qwen2 learn to answer, in bfloat16 autocast. One
   row per scene: the image prefix once, then several questions, each answered, each seeing only the prefix
   and itself at the positions it has when asked alone (`collate`); loss on the answer tokens only, each
   answer weighted equally however many tokens it has, plus a small cell probe on the projected image tokens
   and the reference probe on the text (below).
The learning rate follows the wall clock (warmup, then cosine), so a run ends on time whatever the
machine's speed. `--variant mini` trains the LLaVA-Mini model (one vision token + pre-fusion) the same way
from a trained standard checkpoint (`--init`): its tower stays frozen, so it has no vision stage.

What moved the held-out accuracy (side-by-side runs, benchmarks/results/demo_training*.json): depth (6 x 128
beat 3 x 192 and 8 x 128 at equal wall clock), packing questions so that none sees another (with plain
causal packing a later question could read its answer off an earlier one: a description lists the objects
left to right), and above all the reference probe (`--ref-aux`): wherever a question names an object ("the
red circle"), the hidden state of the phrase's last token halfway up the decoder must name that object's
colour, shape, size and cell. Without it, relational questions ("is the X left or right of the Y?") sat at
chance for 3,000 steps and ended at ~0.68 — the model has to learn, from the answer token alone, to look the
two objects up and compare them; with it each lookup is taught where it happens, and position questions were
at 0.97 after 5 minutes.
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

from .demo_data import CELL_HEADS, GRID, IMAGE_SIZE, Conversations, Stream, collate, pixels_of
from .demo_model import TEXT, build_model, build_processor, build_tokenizer, text_config

def cell_loss(head, grid, targets):
    """Cross-entropy of each cell head; also the fraction of cells with every head right."""
    logits = head(grid).split(list(CELL_HEADS.values()), dim=-1)
    loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[..., k].reshape(-1)) for k, lg in enumerate(logits))
    ok = torch.stack([lg.argmax(-1) == targets[..., k] for k, lg in enumerate(logits)]).all(0)
    return loss, float(ok.float().mean())


def tower_grid(tower, pixels):  # [B, 3, H, W] -> [B, N, C]
    return tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)


def answer_loss(logits_fn, ids, weight):
    """Weighted cross-entropy on answer tokens (logits only where there is a target) and teacher-forced
    exact match per sequence (every answer token right)."""
    tgt, w = ids[:, 1:], weight[:, 1:]
    sel = w > 0
    logits = logits_fn(sel).float()
    tok_loss = F.cross_entropy(logits, tgt[sel], reduction="none")
    loss = (tok_loss * w[sel]).sum() / w.sum()
    with torch.no_grad():
        wrong = torch.zeros_like(tgt, dtype=torch.bool)
        wrong[sel] = logits.argmax(-1) != tgt[sel]
    return loss, ~wrong.any(dim=1)


def standard_logits(model, tower, image_id, ref_layer: int = 0):
    """FastVLM forward: splice projected tower tokens at the placeholders. -> (logits at selected positions,
    the projected image tokens, the hidden states after decoder layer `ref_layer` (None if 0))."""
    def run(pixels, ids, mask, pos, weight):
        feats = model.model.multi_modal_projector(tower_grid(tower, pixels))  # [B, N, D]
        embeds = model.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == image_id)[..., None], feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                         output_hidden_states=ref_layer > 0)
        hidden = out.last_hidden_state[:, :-1]
        mid = out.hidden_states[ref_layer] if ref_layer > 0 else None
        return (lambda sel: model.lm_head(hidden[sel])), feats, mid
    return run


def mini_logits(mini, tower, image_id):
    """LLaVA-Mini forward: pre-fusion over [image tokens; text], one compressed token at the placeholder.
    The third output is the LLM's input (the fused text: where the text has looked at the image)."""
    def run(pixels, ids, mask, pos, weight):
        feats = mini.base.model.multi_modal_projector(tower_grid(tower, pixels))
        x = mini.llm_embeds(feats, ids, mask, weight == 0, image_id, pos)  # answer tokens enter plain, as when decoding
        hidden = mini.base.model.language_model(inputs_embeds=x, attention_mask=mask,
                                                position_ids=pos).last_hidden_state[:, :-1]
        return (lambda sel: mini.base.lm_head(hidden[sel])), feats, x
    return run


def lr_at(frac: float, peak: float, warm: float = 0.03) -> float:
    if frac < warm:
        return peak * frac / warm
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def timed_loop(budget_s: float, params, lr: float, step_fn, log, every: int = 50, tag: str = "",
               max_steps: int | None = None, check=None, check_every_s: float = 0.0):
    """AdamW with the learning rate following the wall clock (warmup, cosine), until the budget is spent (or
    max_steps, whichever comes first: the schedule follows the one nearer its end). `params` may be a list
    of param groups, each with an "lr_scale". `check()` (a dict, e.g. validation) runs every check_every_s
    seconds of training; its time is not charged to the schedule."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params, "lr_scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    flat = [p for g in groups for p in g["params"]]
    start, step, history = time.perf_counter(), 0, []
    next_check = check_every_s if check and check_every_s > 0 else math.inf
    while (elapsed := time.perf_counter() - start) < budget_s and (max_steps is None or step < max_steps):
        if elapsed >= next_check:
            t = time.perf_counter()
            entry = {"stage": tag, "step": step, "minutes": round(elapsed / 60, 2), "check": check()}
            history.append(entry)
            log(json.dumps(entry))
            start += time.perf_counter() - t
            next_check += check_every_s
            continue
        frac = max(elapsed / budget_s, step / max_steps if max_steps else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, lr) * g["lr_scale"]
        loss, acc = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, 1.0)
        opt.step()
        step += 1
        if step % every == 0:
            entry = {"stage": tag, "step": step, "minutes": round(elapsed / 60, 2), "loss": round(loss.item(), 4),
                     "train_exact": round(acc, 3)}
            history.append(entry)
            log(json.dumps(entry))
    return step, history


@torch.no_grad()
def recalibrate_bn(tower, stream, batches: int = 40) -> None:
    """Recompute BatchNorm population statistics with the final weights (a cumulative average over fresh
    training images): the running averages lag weights that move fast."""
    bns = [m for m in tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for _ in range(batches):
        tower(stream.vision_batch(16)[0])
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


@torch.no_grad()
def validate(logits_fn, conv: Conversations, n: int = 512) -> dict:
    """Teacher-forced exact match on single-question prompts of the validation split, per question type."""
    exs = list(shapes.examples(shapes.VALIDATION_SEED, n, split="eval", size=IMAGE_SIZE))
    per: dict[str, list[float]] = {}
    for s in range(0, n, 64):
        chunk = exs[s: s + 64]
        pixels, ids, weight, mask, pos = collate(np.stack([pixels_of(e.image) for e in chunk]),
                                                 [conv.encode([(e.question, e.answer)]) for e in chunk],
                                                 conv.tok.pad_token_id)
        fn = logits_fn(pixels, ids, mask, pos, weight)[0]
        _, ok = answer_loss(fn, ids, weight)
        for e, k in zip(chunk, ok.tolist()):
            per.setdefault(e.qtype, []).append(float(k))
            if e.qtype == "position":  # the three forms learn at different speeds: worth seeing apart
                per.setdefault(f"position.{e.spec.form}", []).append(float(k))
    return {"exact": round(float(np.mean([x for k, v in per.items() if "." not in k for x in v])), 4),
            "per_type": {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())}}


def train(out: Path, minutes: float | None, seed: int = 0, variant: str = "standard", init: Path | None = None,
          vision_minutes: float = 5.0, scenes: int = 16, per_scene: int = 6, lr: float = 2e-3, vision_lr: float = 2e-3,
          threads: int = 2, tower_lr: float = 0.0, max_steps: int | None = None, text: dict = TEXT,
          aux: float = 0.1, bf16: bool = True, check_minutes: float = 0.0, tower_from: Path | None = None,
          vision_steps: int | None = None,
          ref_aux: float = 0.2, ref_layer: int | None = None, log=print) -> dict:
    """Stage 1 (standard only): the tower alone learns what sits in each cell of its output grid (a linear
    probe per attribute, dropped afterwards). Stage 2: the tower is frozen; projector and language model
    (plus, for LLaVA-Mini, compressor and pre-fusion) learn to answer. `minutes` covers both stages; with
    minutes=None only `vision_steps` and `max_steps` end them (runs that must not depend on the clock)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    summary: dict = {"variant": variant, "seed": seed, "history": []}
    if variant == "standard" and init is not None:  # continue a standard checkpoint (experiments)
        tok = AutoTokenizer.from_pretrained(init)
        processor = build_processor(tok)
        model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
        tower, n_img = model.model.vision_tower, GRID * GRID
    elif variant == "standard":
        tok = build_tokenizer()
        processor = build_processor(tok)
        model = build_model(tok, text)
        tower, n_img = model.model.vision_tower, GRID * GRID
        if tower_from is not None:  # experiments: a trained tower from another standard checkpoint, no vision stage
            src = AutoModelForImageTextToText.from_pretrained(tower_from, dtype=torch.float32)
            tower.load_state_dict(src.model.vision_tower.state_dict())
    else:  # LLaVA-Mini from a trained standard checkpoint, as the paper starts from pretrained parts
        from ..llava_mini import MiniVLM

        if init is None:
            raise SystemExit("--variant mini needs --init STANDARD_CHECKPOINT")
        tok = AutoTokenizer.from_pretrained(init)
        processor = build_processor(tok, patch=IMAGE_SIZE)
        model = MiniVLM(AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32), grid=GRID)
        tower, n_img = model.base.model.vision_tower, 1
    conv = Conversations(tok, processor, n_img)
    stream = Stream(conv, seed)
    base = model if variant == "standard" else model.base
    image_id = base.config.image_token_id

    if variant == "standard" and init is None and tower_from is None:
        tower.train()
        head = torch.nn.Linear(base.config.vision_config.hidden_size, sum(CELL_HEADS.values()))

        def vision_step():
            pixels, targets = stream.vision_batch(32)
            return cell_loss(head, tower_grid(tower, pixels), targets)

        budget = math.inf if minutes is None else vision_minutes * 60
        steps, hist = timed_loop(budget, list(tower.parameters()) + list(head.parameters()), vision_lr,
                                 vision_step, log, every=25, tag="vision", max_steps=vision_steps)
        recalibrate_bn(tower, stream)
        tower.eval()
        with torch.no_grad():
            pixels, targets = Stream(conv, shapes.VALIDATION_SEED).vision_batch(256)
            summary["vision"] = {"steps": steps, "val_cell_exact": round(cell_loss(head, tower_grid(tower, pixels), targets)[1], 4)}
        summary["history"] += hist
        log(json.dumps(summary["vision"]))
    tower.eval()  # BatchNorm keeps its population statistics; recalibrated at the end if the tower trains
    tower_params = list(tower.parameters())
    for p in tower_params:
        p.requires_grad_(tower_lr > 0)
    ids_tower = {id(p) for p in tower_params}
    params = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids_tower], "lr_scale": 1.0}]
    if tower_lr > 0:  # the answers' gradient reaches the tower: it can make what they need (e.g. columns) prominent
        params.append({"params": tower_params, "lr_scale": tower_lr / lr})
    is_mini = variant != "standard"
    if ref_layer is None:
        ref_layer = base.config.text_config.num_hidden_layers // 2
    logits_of = (mini_logits(model, tower, image_id) if is_mini
                 else standard_logits(model, tower, image_id, ref_layer if ref_aux > 0 else 0))

    if aux > 0:  # the projected image tokens must also name what sits in their cell (and where the cell is)
        probe = torch.nn.Linear(base.config.text_config.hidden_size, sum(CELL_HEADS.values()))
        params[0]["params"] += list(probe.parameters())
    if ref_aux > 0:  # where a question names an object, that text token must come to hold what the object is
        ref_probe = torch.nn.Linear(base.config.text_config.hidden_size, sum(CELL_HEADS.values()))
        params[0]["params"] += list(ref_probe.parameters())

    def text_step():
        pixels, ids, weight, mask, pos, targets, (rows, index, ref_targets) = stream.text_batch(scenes, per_scene)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn, feats, mid = logits_of(pixels, ids, mask, pos, weight)
            loss, ok = answer_loss(fn, ids, weight)
            if aux > 0:
                loss = loss + aux * cell_loss(probe, feats.float(), targets)[0]
            if ref_aux > 0 and len(rows):
                loss = loss + ref_aux * cell_loss(ref_probe, mid[rows, index].float(), ref_targets)[0]
        return loss, float(ok.float().mean())

    def check():
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = validate(logits_of, conv, n=256)
        model.train()
        return out

    model.train()
    tower.eval()
    # keep time for validation and saving; minutes=None: no clock at all, the step counts decide
    left = math.inf if minutes is None else minutes * 60 - (time.perf_counter() - t0) - 30
    steps, hist = timed_loop(left, params, lr, text_step, log, tag="language", max_steps=max_steps,
                             check=check, check_every_s=check_minutes * 60)
    summary["history"] += hist
    model.eval()
    if tower_lr > 0:
        recalibrate_bn(tower, stream)
    summary["language"] = {"steps": steps, "scenes": steps * scenes, "questions": steps * scenes * per_scene}
    summary["val_teacher_forced"] = validate(logits_of, conv)
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    log(json.dumps(summary["val_teacher_forced"]))
    out.mkdir(parents=True, exist_ok=True)
    model.half()  # fp16 on disk: half the bytes; the exporter computes in fp32
    if is_mini:
        model.save(out)
    else:
        model.save_pretrained(out)
    processor.save_pretrained(out)
    summary["params"] = sum(p.numel() for p in model.parameters())
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevlm.export.dev.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=44.0, help="training wall-clock budget, both stages (default 44)")
    p.add_argument("--vision-minutes", type=float, default=5.0, help="of which the tower-only stage (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=16, help="scenes (conversations) per language step")
    p.add_argument("--per-scene", type=int, default=6, help="questions per conversation")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the language stage")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tower-lr", type=float, default=0.0,
                   help="peak learning rate of the tower in the language stage (0 = frozen)")
    p.add_argument("--text-layers", type=int, default=TEXT["num_hidden_layers"], help="Qwen2 layers (standard)")
    p.add_argument("--text-hidden", type=int, default=TEXT["hidden_size"], help="Qwen2 width (standard; 32-wide heads)")
    p.add_argument("--aux", type=float, default=0.1,
                   help="weight of the cell probe on the projected image tokens in the language stage (0 = off)")
    p.add_argument("--ref-aux", type=float, default=0.2,
                   help="weight of the reference probe: where a question names an object, the hidden state of the "
                        "phrase's last token after --ref-layer must name the object (colour, shape, size, row, "
                        "column); for mini, the fused text does (0 = off)")
    p.add_argument("--ref-layer", type=int, default=None,
                   help="decoder layer whose output the reference probe reads (standard; default: half the depth)")
    p.add_argument("--fp32", dest="bf16", action="store_false",
                   help="no bfloat16 autocast in the language stage (default: autocast; weights stay fp32 either way)")
    p.add_argument("--check-minutes", type=float, default=0.0,
                   help="teacher-forced validation (256 questions) every this many minutes of the language stage")
    p.add_argument("--tower-from", type=Path, default=None,
                   help="take the trained tower of this standard checkpoint and skip the vision stage (experiments)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the language stage's steps (experiments)")
    p.add_argument("--variant", choices=["standard", "mini"], default="standard",
                   help="mini = LLaVA-Mini (one vision token + pre-fusion), needs --init")
    p.add_argument("--init", type=Path, default=None,
                   help="a trained standard checkpoint: where --variant mini starts; for standard, continue it "
                        "(no vision stage)")
    p.add_argument("--export", type=Path, default=None, metavar="BUNDLE",
                   help="then export the checkpoint to this bundle directory (parity-checked)")
    args = p.parse_args(argv)
    summary = train(args.out, args.minutes, args.seed, args.variant, args.init, args.vision_minutes, args.scenes,
                    args.per_scene, args.lr, threads=args.threads, tower_lr=args.tower_lr,
                    max_steps=args.max_steps, text=text_config(args.text_layers, args.text_hidden), aux=args.aux,
                    bf16=args.bf16, check_minutes=args.check_minutes, tower_from=args.tower_from,
                    ref_aux=args.ref_aux, ref_layer=args.ref_layer, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if args.export:
        from ..exporter import export

        export(args.out, args.export, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
