"""LLaVA-OneVision (transformers `llava_onevision`), single-image anyres: SigLIP tower per tile + MLP projector
in the vision graph (which also emits the learned row-end embedding); the runtime picks the grid, letterboxes,
stitches the tile features back together, drops the padding, shrinks large maps and closes each row."""

from __future__ import annotations

import torch

from edgevlm.errors import ExportError
from edgevlm.manifest import ImageLayout, Preprocess, VideoLayout

from .base import Adapter, pixel_settings, renders_video, tile_preprocess


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    processors = ("LlavaOnevisionProcessor",)
    vision_outputs = ("image_embeds", "row_end")

    def _tile_rows(self, model, pixel_values):  # [B, 3, S, S] -> [B, n, D]
        cfg = model.config
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [
            cfg.vision_feature_layer]
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return model.model.multi_modal_projector(feats)

    def image_features(self, model, pixel_values: torch.Tensor):
        return self._tile_rows(model, pixel_values), model.model.image_newline  # [1, n, D], [D]

    def preprocess(self, processor) -> Preprocess:
        ip = processor.image_processor
        if getattr(ip, "do_center_crop", False) or not ip.do_resize:
            raise ExportError("LLaVA-OneVision processors with centre crop or without resizing are not supported")
        tile = int(ip.size["height"])
        return tile_preprocess(ip, tile)

    def image_layout(self, model, processor, tile_rows: int) -> ImageLayout:
        cfg, ip = model.config, processor.image_processor
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if side * side != tile_rows:
            raise ExportError(f"LLaVA-OneVision tile rows {tile_rows} are not a {side} x {side} grid")
        pins = [tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints]
        if pins != [tuple(int(x) for x in p) for p in ip.image_grid_pinpoints]:
            raise ExportError("the processor's image_grid_pinpoints differ from the model's")
        ratio = getattr(processor, "vision_aspect_ratio", None) or cfg.vision_aspect_ratio
        if ratio != cfg.vision_aspect_ratio or not ratio.startswith("anyres_max_"):
            raise ExportError(f"vision_aspect_ratio {ratio!r} is not supported (anyres_max_N, same in model and processor)")
        # several images in a prompt: each padded to a square in the mean colour, one tile, one row end
        return ImageLayout(grid=(side, side), tiling="anyres", tile_size=int(ip.size["height"]), pinpoints=tuple(pins),
                           global_tile="first", unpad=True, max_tiles_area=int(ratio[len("anyres_max_"):]),
                           row_end=True, multi="one_tile", multi_pad=tuple(int(x * 255) for x in ip.image_mean))

    def video_layout(self, model, processor) -> VideoLayout | None:
        """Each frame one tile (resized to the video processor's size), its rows bilinearly pooled to half the
        grid (rounded up), the frames' rows in a row, then the row end once: the video token that many times."""
        vp, marker = getattr(processor, "video_processor", None), getattr(processor, "video_token", None)
        if vp is None or not marker or not renders_video(processor, marker):
            return None
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        size = (int(vp.size["height"]), int(vp.size["width"]))
        if getattr(vp, "do_center_crop", False) or size != (cfg.vision_config.image_size,) * 2:
            raise ExportError(f"LLaVA-OneVision video frames of {size} pixels (or centre-cropped) are not supported")
        return VideoLayout(marker=marker, token=marker, token_id=int(processor.video_token_id),
                           preprocess=Preprocess(size=size, **pixel_settings(vp)), pool=(-(-side // 2),) * 2,
                           row_end=True, prompt="{{ image * (frames * tokens + 1) }}", sampling="uniform",
                           fps=float(getattr(vp, "fps", None) or 1.0),
                           max_frames=int(getattr(vp, "num_frames", None) or 32))

    def reference_rows(self, model, inputs) -> torch.Tensor:
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             batch_num_images=inputs.get("batch_num_images"))
        return torch.cat(list(out.pooler_output))
