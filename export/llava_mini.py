"""LLaVA-Mini on top of a FastVLM: one vision token for the LLM, and modality pre-fusion.

After "LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One Vision Token":
- query-based compression: a learnable query with 2-D sin-cos position embeddings on the keys attends over
  the image embeds [N, D] and yields ONE token [1, D];
- pre-fusion: a few decoder layers of the LLM's width run causally over [image embeds; prompt embeds];
  their text outputs (through a zero-initialised projection, added to the embeddings) replace the prompt
  embeddings. The LLM then sees the prompt with the image placeholder holding the one compressed token.

Generated tokens enter the LLM as plain embeddings (in training too), so the decode loop is unchanged.
Saved as safetensors + mini_config.json beside the base FastVLM checkpoint files.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

MINI_CONFIG = "mini_config.json"
MINI_WEIGHTS = "mini.safetensors"


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:  # -> [h*w, dim]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    parts = [f(c.reshape(-1, 1) * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    out = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


class Compressor(nn.Module):
    """image embeds [B, N, D] -> [B, 1, D] by cross-attention from one learnable query."""

    def __init__(self, dim: int, grid: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.register_buffer("pos", sincos_2d(grid, grid, dim), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        b, n, d = image_embeds.shape
        x = self.norm(image_embeds)
        hd = d // self.heads
        q = self.q(self.query).reshape(1, 1, self.heads, hd).transpose(1, 2)  # [1, H, 1, hd]
        k = self.k(x + self.pos).reshape(b, n, self.heads, hd).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # [B, H, 1, N]
        return self.o((att @ v).transpose(1, 2).reshape(b, 1, d))


class MiniVLM(nn.Module):
    """A trained FastVLM plus compressor and pre-fusion layers."""

    def __init__(self, base, fusion_layers: int = 2, grid: int = 4):
        super().__init__()
        from transformers import Qwen2Model

        self.base = base
        text = base.config.text_config
        self.fusion_layers, self.grid = fusion_layers, grid
        self.compressor = Compressor(text.hidden_size, grid)
        cfg = copy.deepcopy(text)
        cfg.num_hidden_layers, cfg.vocab_size = fusion_layers, 1
        self.prefusion = Qwen2Model(cfg)
        self.fuse_out = nn.Linear(text.hidden_size, text.hidden_size)
        nn.init.zeros_(self.fuse_out.weight)  # starts as the identity on the text embeddings
        nn.init.zeros_(self.fuse_out.bias)
        with torch.no_grad():  # start the fusion layers from the LLM's first layers
            for mine, theirs in zip(self.prefusion.layers, base.model.language_model.layers):
                mine.load_state_dict(theirs.state_dict())

    def image_embeds(self, pixel_values):  # [B, 3, H, W] -> [B, N, D]
        return self.base.model.get_image_features(pixel_values=pixel_values).pooler_output

    def fuse(self, image_embeds, text_embeds, text_mask, text_pos=None):
        """[B, N, D], [B, S, D], [B, S] -> [B, S, D]. text_mask may also be a boolean [B, 1, S, S] mask with
        position ids text_pos [B, S] (training packs several questions): the image tokens come first, causal
        among themselves, and every text token sees all of them."""
        n = image_embeds.shape[1]
        x = torch.cat([image_embeds, text_embeds], dim=1)
        if text_mask.ndim == 4:
            b, s = text_mask.shape[0], text_mask.shape[-1]
            mask = torch.zeros(b, 1, n + s, n + s, dtype=torch.bool)
            mask[:, :, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            mask[:, :, n:, :n] = True
            mask[:, :, n:, n:] = text_mask
            pos = torch.cat([torch.arange(n).expand(b, n), text_pos + n], dim=1)
            h = self.prefusion(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state[:, n:]
        else:
            mask = torch.cat([torch.ones(text_mask.shape[0], n, dtype=text_mask.dtype), text_mask], dim=1)
            h = self.prefusion(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, n:]
        return text_embeds + self.fuse_out(h)

    def llm_embeds(self, image_embeds, ids, mask, prompt_mask, image_id, pos=None):
        """The LLM's input: fused prompt, plain answer tokens, the one compressed token at the placeholder."""
        emb = self.base.model.get_input_embeddings()(ids)
        fused = self.fuse(image_embeds, emb, mask, pos)
        x = torch.where(prompt_mask[..., None], fused, emb)
        token = self.compressor(image_embeds)  # [B, 1, D]
        return x.masked_scatter((ids == image_id)[..., None], token.reshape(-1, token.shape[-1]).to(x.dtype))

    def video_embeds(self, frame_embeds, ids, mask, prompt_mask, image_id):
        """A video's LLM input (ictnlp's LLaVA-Mini): frame_embeds [B, F, N, D]; each frame compressed to one token,
        the F placeholders take them in order; the prompt is fused with each frame alone and averaged."""
        b, f = frame_embeds.shape[:2]
        emb = self.base.model.get_input_embeddings()(ids)
        fused = sum(self.fuse(frame_embeds[:, i], emb, mask) for i in range(f)) / f
        x = torch.where(prompt_mask[..., None], fused, emb)
        tokens = self.compressor(frame_embeds.flatten(0, 1)).reshape(b, f, -1)  # [B, F, D]
        return x.masked_scatter((ids == image_id)[..., None], tokens.reshape(-1, tokens.shape[-1]).to(x.dtype))

    def logits(self, inputs_embeds, mask):
        h = self.base.model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        return self.base.lm_head(h)

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(out)
        extra = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("base.")}
        save_file({k: v.half() if v.is_floating_point() else v for k, v in extra.items()}, str(out / MINI_WEIGHTS))
        (out / MINI_CONFIG).write_text(json.dumps({"fusion_layers": self.fusion_layers, "grid": self.grid}))

    @classmethod
    def load(cls, path: Path) -> "MiniVLM":
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText

        path = Path(path)
        cfg = json.loads((path / MINI_CONFIG).read_text())
        base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        mini = cls(base, cfg["fusion_layers"], cfg["grid"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / MINI_WEIGHTS)).items()}
        missing, unexpected = mini.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("base.") for k in missing):
            raise ValueError(f"{MINI_WEIGHTS} does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return mini.eval()

    @staticmethod
    def is_mini(path: Path) -> bool:
        return (Path(path) / MINI_CONFIG).is_file()


# ---- export -----------------------------------------------------------------------------------------


class FuseHead(nn.Module):  # (hidden [1, S, D], inputs_embeds [1, S, D]) -> fused [1, S, D]
    def __init__(self, fuse_out):
        super().__init__()
        self.fuse_out = fuse_out

    def forward(self, hidden, inputs_embeds):
        return inputs_embeds + self.fuse_out(hidden)


class CompressorGraph(nn.Module):  # image_embeds [1, N, D] -> token [1, 1, D]
    def __init__(self, compressor):
        super().__init__()
        self.compressor = compressor

    def forward(self, image_embeds):
        return self.compressor(image_embeds)


def export_extra(mini: MiniVLM, n_image: int, tmp: Path, static=None, use_gqa: bool = True) -> dict:
    """Export the compressor and pre-fusion graphs -> manifest components (name -> kwargs). With `static`
    (exporter.StaticOptions) the pre-fusion graph has fixed shapes: chunks over a cache holding the image
    prefix and a prompt of up to kv_capacity tokens. `use_gqa`: the dynamic pre-fusion graph on ONNX Runtime's fused
    kernels (export/gqa.py) when the layers allow it."""
    from edgevlm.manifest import StaticShape

    from . import gqa, graphs

    d = mini.base.config.text_config.hidden_size
    comp = graphs.export_graph(CompressorGraph(mini.compressor).eval(), (torch.zeros(1, n_image, d),),
                          tmp / "compressor.onnx", ["image_embeds"], ["token"], None)
    head, cfg, path = FuseHead(mini.fuse_out), mini.prefusion.config, tmp / "prefusion.onnx"
    heads, head_dim = graphs.kv_dims(cfg)
    kv = {"past": graphs.PAST, "present": graphs.PRESENT, "heads": heads, "head_dim": head_dim}
    if static:
        shape = StaticShape(chunk=static.prefill_chunk, kv_capacity=n_image + static.kv_capacity)
        pf = graphs.export_static_decoder(mini.prefusion, head, cfg, path, capacity=shape.kv_capacity,
                                          chunk=shape.chunk, output="fused", pick=False)
        return {"compressor": (comp, {}), "prefusion": (pf, {"num_layers": mini.fusion_layers, "kv": kv,
                                                             "static": shape})}
    pf = gqa.export_decoder(mini.prefusion, mini.fuse_out, cfg, path, output="fused") if use_gqa else None
    pf = pf or graphs.export_decoder(mini.prefusion, head, cfg, path, output="fused")
    return {
        "compressor": (comp, {"inputs": {"image_embeds": [1, n_image, d]}, "outputs": {"token": [1, 1, d]}}),
        "prefusion": (pf, {"num_layers": mini.fusion_layers, "kv": kv,
                           "inputs": {"inputs_embeds": [1, "seq", d]}, "outputs": {"fused": [1, "seq", d]}}),
    }


def _greedy(embeds, ids, eos: set[int], n: int, logits_of) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens with a full recompute each step (embeds(ids, mask, prompt_mask) -> inputs_embeds) and the
    first logits."""
    p = ids.shape[1]
    out, first = [], None
    for _ in range(n):
        mask = torch.ones_like(ids)
        prompt = torch.arange(ids.shape[1])[None] < p
        logits = logits_of(embeds(ids, mask, prompt), mask)[0, -1]
        first = logits if first is None else first
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out, first


@torch.no_grad()
def reference_tokens(mini: MiniVLM, inputs, image_id: int, eos: set[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the PyTorch LLaVA-Mini (full recompute each step) and its first logits."""
    feats = mini.image_embeds(inputs["pixel_values"])
    return _greedy(lambda ids, mask, prompt: mini.llm_embeds(feats, ids, mask, prompt, image_id),
                   inputs["input_ids"], eos, n, mini.logits)


@torch.no_grad()
def reference_video_tokens(mini: MiniVLM, frame_pixels, ids, image_id: int, eos: set[int],
                           n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the PyTorch LLaVA-Mini on a video (frame_pixels [F, 3, H, W], ids: the prompt with one
    placeholder per frame) and its first logits."""
    feats = mini.image_embeds(frame_pixels)[None]  # [1, F, N, D]
    return _greedy(lambda ids, mask, prompt: mini.video_embeds(feats, ids, mask, prompt, image_id),
                   ids, eos, n, mini.logits)


def check_parity(mini: MiniVLM, processor, bundle_dir, max_new_tokens: int = 16) -> dict:
    """The exported LLaVA-Mini bundle vs the PyTorch module: first logits and greedy tokens."""
    import numpy as np

    import edgevlm

    from .parity import PROMPT, hf_inputs, probe_image

    image = probe_image()
    vlm = edgevlm.load(bundle_dir)
    m = vlm.manifest
    inputs = hf_inputs(processor, image, PROMPT)
    ids = inputs["input_ids"][0].numpy()
    ref_tokens, ref_first = reference_tokens(mini, inputs, m.image_token_id, set(m.generation.eos_token_ids),
                                             max_new_tokens)
    logits = vlm.prompt_logits(image, PROMPT)
    ours = [r.token for r in vlm.stream(image, PROMPT, max_tokens=max_new_tokens)]
    our_ids = vlm.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], None, 1)
    return {
        "prompt_ids_match": bool(our_ids.shape == ids.shape and (our_ids == ids).all()),
        "max_abs_logit_diff": float(np.abs(logits - ref_first.numpy()).max()),
        "greedy_tokens": len(ref_tokens),
        "greedy_match": ours == ref_tokens,
    }
