"""Why the demo misses position questions: the recipe as shipped vs a cell probe on the LLM's hidden states.

    python benchmarks/demo_position_probe.py [--minutes 22] [--layer 2] [--weight 0.3]

The shipped demo answers "above" to every above/below question and ~0.7 of left/right-of questions while
every lookup (colour, shape) is right. Hypothesis: the row and column of an image token reach the LLM's input
(a probe on the projected tokens is part of the recipe) but are too weak in the residual stream where
attention reads values. Variant "hidden probe": the same cell probe (colour, shape, size, row, column) reads
the hidden state of each image token after decoder layer --layer instead of the projected token.

Both language stages run side by side, one thread each, from the shipped demo's trained tower (no vision
stage), for the same wall clock; then each is scored teacher-forced on 2000 validation questions, position
broken down by form. Writes benchmarks/results/demo_position_probe.{json,md}. Experiments, not the recipe.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOWER = ROOT / "export" / "checkpoints" / "shapes-fastvlm"


def hidden_probe_logits(layer: int):
    from edgevlm.export.dev import train_demo as td

    def make(model, tower, image_id):
        def run(pixels, ids, mask, pos, weight):
            feats = model.model.multi_modal_projector(td.tower_grid(tower, pixels))
            embeds = model.model.get_input_embeddings()(ids)
            img = (ids == image_id)[..., None]
            embeds = embeds.masked_scatter(img, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
            out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                             output_hidden_states=True)
            hidden = out.last_hidden_state[:, :-1]
            at = out.hidden_states[layer]  # after decoder layer `layer` (0 = the embeddings)
            cells = at[img.expand_as(at)].reshape(feats.shape[0], feats.shape[1], -1)
            return (lambda sel: model.lm_head(hidden[sel])), cells
        return run
    return make


def one(variant: str, minutes: float, layer: int, weight: float, out: str, queue) -> None:
    import torch

    from edgevlm.export.dev import train_demo as td

    if variant == "hidden probe":
        td.standard_logits = hidden_probe_logits(layer)
    summary = td.train(Path(out), minutes, threads=1, aux=weight if variant == "hidden probe" else 0.1,
                       tower_from=TOWER, check_minutes=minutes / 4, log=lambda s: None)
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    conv = td.Conversations(tok, td.build_processor(tok), td.GRID * td.GRID)
    run = td.standard_logits(model, model.model.vision_tower, model.config.image_token_id)
    with torch.no_grad():
        val = td.validate(run, conv, n=2000)
    queue.put((variant, {"steps": summary["language"]["steps"], "validation_2000": val,
                         "checks": [h for h in summary["history"] if "check" in h]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=22.0)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--weight", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_position_probe")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as work:
        procs = [ctx.Process(target=one, args=(v, args.minutes, args.layer, args.weight, f"{work}/{i}", queue))
                 for i, v in enumerate(("shipped recipe", "hidden probe"))]
        for pr in procs:
            pr.start()
        results = dict(queue.get() for _ in procs)
        for pr in procs:
            pr.join()
    result = {"minutes": args.minutes, "layer": args.layer, "weight": args.weight, "threads_each": 1,
              "tower": "export/checkpoints/shapes-fastvlm (shipped)", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    keys = ["exact", "position", "position.side", "position.x", "position.y", "count", "describe", "bigger"]
    lines = ["| variant | steps | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, r in results.items():
        v = r["validation_2000"]
        cells = [f"{v['exact']:.3f}"] + [f"{v['per_type'].get(k, 0):.3f}" for k in keys[1:]]
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(cells) + " |")
    lines.append(f"\nLanguage stage only, {args.minutes} min each, side by side at one thread each from the shipped "
                 f"tower; hidden probe after decoder layer {args.layer}, weight {args.weight} (the shipped recipe's "
                 "probe: projected tokens, 0.1). Teacher-forced exact match, 2000 validation questions.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
