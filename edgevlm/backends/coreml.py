"""CoreML ML programs through coremltools (macOS only; imported lazily, only by bundles that place a
component on CoreML).

A graph (the vision encoder) runs like an ONNX graph: named feeds in, named outputs out. The decoder is a
stateful program: its KV cache lives in CoreML state, written at the positions each call covers, so the
cache is trimmed by simply writing over it; like the GGUF decoder it remembers what it holds as keys.
Not run on Linux (coremltools cannot predict there); the export side is verified by reading specs back.
"""

from __future__ import annotations

import platform

import numpy as np

from ..errors import BackendError


def _coremltools():
    if platform.system() != "Darwin":
        raise BackendError("this bundle places a component on CoreML, which predicts on macOS only: "
                           "run it on a Mac, or use the ONNX/GGUF bundle of the same model")
    try:
        import coremltools as ct
    except ImportError:
        raise BackendError("this bundle needs coremltools (pip install 'edgevlm[coreml]')") from None
    return ct


def _package(bundle, comp) -> str:
    """The .mlpackage directory holding a component's spec file (every file in it was verified)."""
    rel = comp.file.split(".mlpackage/")[0] + ".mlpackage"
    return str(bundle.path(rel))


class CoremlGraph:
    """One ML program: run(feeds) -> outputs, like OnnxGraph."""

    def __init__(self, name: str, bundle, comp, compute_units: str = "ALL"):
        ct = _coremltools()
        try:
            self.model = ct.models.MLModel(_package(bundle, comp), compute_units=ct.ComputeUnit[compute_units])
        except Exception as e:
            raise BackendError(f"CoreML cannot load {name!r}: {str(e).splitlines()[0][:300]}") from None
        spec = self.model.get_spec()
        self.name = name
        self.input_names = [i.name for i in spec.description.input]
        self.output_names = [o.name for o in spec.description.output]
        self.providers = [f"CoreML:{compute_units}"]

    def run(self, feeds: dict[str, np.ndarray], state=None) -> dict[str, np.ndarray]:
        try:
            out = self.model.predict(feeds, state=state) if state is not None else self.model.predict(feeds)
        except Exception as e:
            raise BackendError(f"CoreML graph {self.name!r} failed: {str(e).splitlines()[0][:300]}") from None
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
