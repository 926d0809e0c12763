"""SmolVLM / Idefics3 (transformers `smolvlm`, `idefics3`): SigLIP tower per tile, pixel-shuffle connector
(in the vision graph), Llama. Images are split into tiles plus a global image, with row/column markers."""

from __future__ import annotations

import torch

from edgevlm.errors import ExportError
from edgevlm.manifest import ImageLayout, Preprocess, VideoLayout

from .base import Adapter, renders_alike, renders_video, tile_preprocess


class SmolVlmAdapter(Adapter):
    family = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    processors = ("SmolVLMProcessor", "Idefics3Processor")

    def image_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:  # [1, 3, S, S] -> [1, n, D]
        # The vision transformer's own steps for a full tile (every patch real, so no attention mask), with the
        # position ids as a constant: see _full_tile_position_ids.
        vision = model.model.vision_model
        emb = vision.embeddings
        size = pixel_values.shape[-1]
        ids = getattr(emb, "_edgevlm_position_ids", {}).get(size)
        if ids is None:  # computed eagerly (the exporter's first call), then a constant of the exported graph
            if torch.compiler.is_exporting() or torch.compiler.is_compiling():
                raise ExportError("SmolVLM: run image_features once eagerly before exporting the vision graph")
            ids = _full_tile_position_ids(emb, size)
            emb._edgevlm_position_ids = {**getattr(emb, "_edgevlm_position_ids", {}), size: ids}
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        hidden = vision.encoder(inputs_embeds=patches + emb.position_embedding(ids)).last_hidden_state
        return model.model.connector(vision.post_layernorm(hidden))  # pixel shuffle (n / scale^2 rows) + projection

    def language_parts(self, model):
        lm = model.model.text_model
        return lm, lm.get_input_embeddings(), model.lm_head

    def preprocess(self, processor) -> Preprocess:
        ip = processor.image_processor
        if not (ip.do_resize and getattr(ip, "do_image_splitting", True)):
            raise ExportError("image processors with do_resize or do_image_splitting false are not supported yet "
                              "(only the split into tiles + a global image)")
        return tile_preprocess(ip, _longest_edge(ip, "max_image_size"))

    def image_layout(self, model, processor, tile_rows: int) -> ImageLayout:
        ip = processor.image_processor
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        side //= model.config.scale_factor
        # SmolVLMProcessor: global_image_token; Idefics3Processor: global_image_tag
        glob = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", None)
        fake = getattr(processor, "fake_image_token", None)
        if not (isinstance(glob, str) and isinstance(fake, str)):
            raise ExportError(f"{type(processor).__name__} names no global-image / fake image token: "
                              "only SmolVLMProcessor and Idefics3Processor are supported for this family")
        whole = f"{fake}{glob}{{{{ image * tile_tokens }}}}{fake}"
        prompt = (  # exactly the processor's expansion; "\n" as expressions (templates trim block newlines)
            f"{{% if rows == 0 %}}{whole}{{% else %}}{{% for r in range(rows) %}}{{% for c in range(cols) %}}"
            f"{fake}<row_{{{{ r + 1 }}}}_col_{{{{ c + 1 }}}}>{{{{ image * tile_tokens }}}}{{% endfor %}}"
            f"{{{{ '\\n' }}}}{{% endfor %}}{{{{ '\\n' }}}}{whole}{{% endif %}}")
        return ImageLayout(grid=(side, side), tiling="split", tile_size=_longest_edge(ip, "max_image_size"),
                           longest_edge=_longest_edge(ip, "size"), global_tile="last", prompt=prompt)

    def template_for_video(self, processor) -> str:
        """SmolVLMProcessor renders a prompt with a video through its own default template (published SmolVLM2
        templates write no video marker): the bundle carries that one when it renders everything else alike."""
        from transformers.models.smolvlm import processing_smolvlm

        own, default = processor.chat_template, getattr(processing_smolvlm, "DEFAULT_CHAT_TEMPLATE", None)
        marker = getattr(processor, "video_token", None) or "<video>"
        if getattr(processor, "video_processor", None) is None or not default or renders_video(processor, marker):
            return own
        return default if renders_alike(processor, own, default) else own

    def video_layout(self, model, processor) -> VideoLayout | None:
        """SmolVLM2: each frame resized (longest edge) and squeezed into one tile, under a line with its time;
        an introduction names the frame count in words and the duration (SmolVLMProcessor's text, exactly)."""
        vp, marker = getattr(processor, "video_processor", None), getattr(processor, "video_token", None)
        if vp is None or not marker or not renders_video(processor, marker):
            return None
        from num2words import num2words

        most = int(getattr(vp, "num_frames", None) or 64)
        words = ", ".join(repr(num2words(n)) for n in range(most + 1))
        fake, glob = processor.fake_image_token, processor.global_image_token
        prompt = (  # "\n" as expressions: templates trim block newlines
            f"{{% set words = [{words}] %}}{{% set d = duration | int %}}You are provided the following series of "
            f"{{{{ words[frames] if frames < words | length else frames }}}} frames from a {{{{ d // 3600 }}}}:"
            f"{{{{ '%02d' % (d // 60 % 60) }}}}:{{{{ '%02d' % (d % 60) }}}} [H:MM:SS] video.{{{{ '\\n' }}}}"
            f"{{% for t in seconds %}}{{{{ '\\n' }}}}Frame from {{{{ '%02d' % (t // 60) }}}}:{{{{ '%02d' % (t % 60) }}}}:"
            f"{fake}{glob}{{{{ image * tokens }}}}{fake}{{% endfor %}}{{{{ '\\n\\n' }}}}")
        tile = _longest_edge(vp, "max_image_size")
        return VideoLayout(marker=marker, token=processor.image_token, token_id=int(processor.image_token_id),
                           preprocess=tile_preprocess(vp, tile), longest_edge=_longest_edge(vp, "size"),
                           prompt=prompt, sampling="spread", fps=float(getattr(vp, "fps", None) or 1.0),
                           max_frames=most)

    def reference_rows(self, model, inputs) -> torch.Tensor:
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                             pixel_attention_mask=inputs.get("pixel_attention_mask"))
        return out.pooler_output[0]


def _longest_edge(ip, field: str) -> int:
    value = getattr(ip, field, None)
    edge = value.get("longest_edge") if isinstance(value, dict) else getattr(value, "longest_edge", None)
    if not isinstance(edge, int) or edge <= 0:
        raise ExportError(f"image processor {field} {dict(value) if value else value!r} is not supported (it needs "
                          "longest_edge: tiles are cut by longest edge)")
    return edge


@torch.no_grad()
def _full_tile_position_ids(emb, size: int) -> torch.Tensor:
    """The position ids transformers computes for a tile with every patch real, taken from its own code run
    eagerly. Exported, that computation (bucketize over a float arange of 1/patches-per-side steps) rounds
    differently in ONNX Runtime when 1/n is not exact in binary (e.g. 6, 26 or 27 patches a side): the graph
    then gathers outside the position table."""
    n = size // emb.patch_size
    seen = []
    hook = emb.position_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        dtype = emb.patch_embedding.weight.dtype
        emb(torch.zeros(1, 3, size, size, dtype=dtype), torch.ones(1, n, n, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0]
