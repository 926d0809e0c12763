"""What the runtime needs from each ONNX graph, checked against the opened sessions at load time, so that a
manifest and graphs that disagree end in a BundleError naming the difference, not in a KeyError mid-answer."""

from __future__ import annotations

from .errors import BundleError
from .manifest import Manifest, kv_names

# The tensor names every decoder graph uses (onnxruntime-genai's too); the modules that feed graphs read them here.
EMBEDS, MASK, POSITIONS, LOGITS = "inputs_embeds", "attention_mask", "position_ids", "logits"
DECODER_INPUTS = (EMBEDS, MASK, POSITIONS)


def check_graphs(m: Manifest, graphs: dict) -> None:
    """graphs: component name -> object with input_names / output_names (ONNX components only)."""
    for name, g in graphs.items():
        if not g.input_names or not g.output_names:
            raise BundleError(f"components.{name}: the graph has no inputs or no outputs")
        _check_shapes(name, m.components[name], g)
    for name, extra_in, extra_out in (("decoder", (), (LOGITS,)), ("prefusion", (), ("fused",))):
        g, comp = graphs.get(name), m.components.get(name)
        if g is None or comp is None or comp.kv is None or comp.num_layers is None:
            continue
        need_in = set(DECODER_INPUTS) | set(extra_in) | set(kv_names(comp.kv.past, comp.num_layers))
        need_out = set(extra_out) | set(kv_names(comp.kv.present, comp.num_layers))
        missing = sorted(need_in - set(g.input_names)) + sorted(need_out - set(g.output_names))
        if missing:
            raise BundleError(f"components.{name}: the graph lacks {', '.join(missing[:4])}"
                              f"{' …' if len(missing) > 4 else ''} that the manifest's num_layers and kv name")


def _check_shapes(name: str, comp, g) -> None:
    """The manifest's declared inputs/outputs exist in the graph with the same rank and the same fixed dims."""
    session = getattr(g, "session", None)
    if session is None:
        return
    for which, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        actual = {a.name: a.shape for a in args}
        for key, shape in getattr(comp, which).items():
            if key not in actual:
                raise BundleError(f"components.{name}.{which}: the graph has no {which[:-1]} named {key!r}")
            got = actual[key] or []
            if len(got) != len(shape) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                             for a, b in zip(shape, got)):
                raise BundleError(f"components.{name}.{which}.{key}: the manifest says {list(shape)}, "
                                  f"the graph {list(got)}")
