"""ONNX Runtime graphs: providers configurable, with fallback to CPU; the providers in use are reported."""

from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort

from ..errors import BackendError

log = logging.getLogger("edgevlm")

ProviderSpec = Union[str, tuple[str, dict]]


def resolve_providers(requested: Sequence[ProviderSpec] | None) -> list[ProviderSpec]:
    """Keep the requested providers this onnxruntime build has, in order, and always end with CPU."""
    available = set(ort.get_available_providers())
    chosen: list[ProviderSpec] = []
    for spec in requested or ["CPUExecutionProvider"]:
        name = spec[0] if isinstance(spec, tuple) else spec
        if name in available:
            chosen.append(spec)
        else:
            log.warning("execution provider %s is not available in this onnxruntime build; skipping it", name)
    if not any((s[0] if isinstance(s, tuple) else s) == "CPUExecutionProvider" for s in chosen):
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxGraph:
    """One ONNX graph in one InferenceSession."""

    def __init__(self, name: str, model: bytes | str, providers: Sequence[ProviderSpec] | None = None,
                 threads: int = 0, spin: bool = True, base_dir: str | None = None):
        """spin: the intra-op threads busy-wait for work after a run. Right for a graph run back to back (the
        decoder); wrong for one followed by another graph: every session has its own thread pool, and threads
        spinning after the vision graph took the cores from the pre-fusion layers that ran next (2x their time
        on 2 cores). base_dir: where external data of a graph given as bytes may be (the bundle's directory;
        the bundle reader refused every location outside it already): never the working directory."""
        opts = ort.SessionOptions()
        if base_dir is not None and isinstance(model, (bytes, bytearray)):
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=resolve_providers(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime cannot load graph {name!r}: {str(e).splitlines()[0][:300]}") from None
        # A provider failing at run time is a BackendError, not a rebuild of the session on the next provider
        # of the list (which onnxruntime announces with print() -- on the chat command's stdout). Nothing is
        # left to rebuild from anyway: onnxruntime's Python session keeps the model bytes it was given for as
        # long as it lives, for that rebuild only, while the session holds the weights already -- the graph's
        # size once more in RAM (0.5B-shaped int8 bundle: 1.92 -> 1.12 GB after load, load_memory.py).
        self.session.disable_fallback()
        self.session._model_bytes = None
        self.name = name
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self._quiet = ort.RunOptions()
        self._quiet.log_severity_level = 4
        self.tap: list | None = None  # when a list: every run's feeds are appended (copies), e.g. calibration

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.tap is not None:
            self.tap.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        try:
            outs = self.session.run(None, feeds)
        except Exception as e:
            raise self._failed(e) from None
        return dict(zip(self.output_names, outs))

    def _failed(self, e: Exception) -> BackendError:  # onnxruntime raises its own Fail/InvalidArgument/... types
        return BackendError(f"graph {self.name!r} failed: {str(e).splitlines()[0][:300]}")

    def bind_inplace(self, inplace: dict[str, tuple[str, ort.OrtValue]], out: str, out_array: np.ndarray):
        """An IOBinding, kept by the caller across runs, with each `inplace` input bound to an OrtValue the
        graph also writes as the paired output (a KV cache that GroupQueryAttention extends in place: nothing is
        copied) and output `out` written into out_array; `run_bound` then binds only the per-run inputs."""
        io = self.session.io_binding()
        io.bind_output(out, "cpu", 0, out_array.dtype, list(out_array.shape), out_array.ctypes.data)
        for name, (present, value) in inplace.items():
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(present, value)
        return io

    def run_bound(self, io, feeds: dict[str, np.ndarray], quiet: bool = False) -> None:
        """Run an IOBinding from bind_inplace with these inputs (quiet: onnxruntime logs nothing if the graph
        refuses, e.g. a probe)."""
        for name, a in feeds.items():
            io.bind_cpu_input(name, a)
        try:
            self.session.run_with_iobinding(io, self._quiet if quiet else None)
        except Exception as e:
            raise self._failed(e) from None
