"""What the runtime needs from each ONNX graph, checked against the opened sessions at load time, so that a
manifest and graphs that disagree end in a BundleError naming the difference, not in a KeyError mid-answer."""

from __future__ import annotations

from .errors import BundleError
from .manifest import Manifest, kv_names

DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")


def check_graphs(m: Manifest, graphs: dict) -> None:
    """graphs: component name -> object with input_names / output_names (ONNX components only)."""
    for name, g in graphs.items():
        if not g.input_names or not g.output_names:
            raise BundleError(f"components.{name}: the graph has no inputs or no outputs")
    for name, extra_in, extra_out in (("decoder", (), ("logits",)), ("prefusion", (), ("fused",))):
        g, comp = graphs.get(name), m.components.get(name)
        if g is None or comp is None or comp.kv is None or comp.num_layers is None:
            continue
        need_in = set(DECODER_INPUTS) | set(extra_in) | set(kv_names(comp.kv.past, comp.num_layers))
        need_out = set(extra_out) | set(kv_names(comp.kv.present, comp.num_layers))
        missing = sorted(need_in - set(g.input_names)) + sorted(need_out - set(g.output_names))
        if missing:
            raise BundleError(f"components.{name}: the graph lacks {', '.join(missing[:4])}"
                              f"{' …' if len(missing) > 4 else ''} that the manifest's num_layers and kv name")
