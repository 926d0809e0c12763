"""`quantize_bundle(src, dst, scheme)`: a verified bundle -> a new verified, smaller bundle."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

import edgevlm
from edgevlm.atomic import atomic_dir, check_target, write_atomic
from edgevlm.bundle import open_bundle
from edgevlm.data import shapes
from edgevlm.manifest import Manifest, Quant

from . import bundle_io, calib
from .graphs import Options, QuantError, allowed, op_counts, quantize, weight_nodes
from .schemes import BITS, LEVELS, SCHEMES

QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
             "QuantizeLinear", "DequantizeLinear", "QLinearSigmoid", "QLinearMul")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def resolve(graphs: dict[str, onnx.ModelProto], scheme: str, overrides: dict[str, str]) -> tuple[dict, dict]:
    """Per component: node -> level, and the component's label. A component's level applies to each of its
    weight nodes; Conv has no 4-bit kernel, so int4 on a graph with Conv makes that graph fp16. A node that
    cannot take the level takes int8, or stays fp32 where int8 is not allowed either (graphs.allowed)."""
    plan, labels = {}, {}
    for name, model in graphs.items():
        level = overrides.get(name, scheme)
        if level not in LEVELS:
            raise QuantError(f"component {name!r}: unknown level {level!r} (one of {', '.join(LEVELS)})")
        nodes = weight_nodes(model)
        if level == "int4" and any("int4" not in allowed(n) for n in nodes):
            level = "fp16"
        if level == "fp32" or not nodes:
            plan[name], labels[name] = {}, "fp32"
            continue
        plan[name] = {}
        for n in nodes:  # a level a node cannot take: int8 where it can, else it stays fp32 (`excluded`)
            fallback = "int8" if "int8" in allowed(n) else None
            if (lv := level if level in allowed(n) else fallback):
                plan[name][n.name] = lv
        used = set(plan[name].values())
        if not used:
            plan[name], labels[name] = {}, "fp32"
            continue
        labels[name] = used.pop() if len(used) == 1 else "mixed"  # e.g. int8-static Conv + int8 Gather
    return plan, labels


def component_quant(model: onnx.ModelProto, source_nodes: list[str], levels: dict[str, str], label: str,
                    opts: Options, nbytes: int) -> dict:
    """The manifest's `quant` section of one component."""
    counts = {lv: sum(1 for v in levels.values() if v == lv) for lv in LEVELS if lv != "fp32"}
    excluded = [n for n in source_nodes if n not in levels]
    bits = sorted({BITS[v] for v in levels.values()} | ({32} if excluded else set()))
    section = {"scheme": label, "bits": bits, "nodes": {k: v for k, v in counts.items() if v},
               "excluded": excluded, "bytes": nbytes,
               "ops": {k: v for k, v in op_counts(model).items() if k in QUANT_OPS}}
    if counts["int8-static"]:
        section["target"] = opts.target
    if counts["int8-static"] or counts["int8"]:  # which CPUs' int8 kernels run it exactly (edgevlm/cpu.py)
        section["int8_range"] = opts.int8_range
    if counts["int4"]:
        section.update(block_size=opts.block_size, symmetric=opts.symmetric, accuracy_level=opts.accuracy_level)
    if label == "mixed":
        section["levels"] = dict(levels)
    return section


def quantize_bundle(src, dst, scheme: str = "int8", *, overrides: dict[str, str] | None = None,
                    opts: Options = Options(), budget: float = 0.99, calib_seed: int = calib.CALIB_SEED,
                    calib_n: int = 32, dataset: str | None = None, eval_seed: int = shapes.VALIDATION_SEED,
                    eval_n: int = 200, confirm_n: int | None = None, overwrite: bool = False, progress: Progress | None = None,
                    report: str | Path | None = None, threads: int = 1) -> Manifest:
    """Quantize bundle `src` into a new bundle `dst` (the source is never written to).

    scheme: one of SCHEMES; `overrides` sets a component's level (e.g. {"vision": "fp16"}). With
    dataset="shapes", the new bundle's accuracy is measured next to the fp32 one (and, for "mixed",
    drives the search: the smallest bundle with accuracy >= budget x fp32 on `eval_n` questions and on
    `confirm_n` further ones, default as many). `dst` appears only when
    complete and verified.
    """
    if scheme not in SCHEMES:
        raise QuantError(f"unknown scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    check_target(dst, overwrite, QuantError)  # fail fast, before the long work
    overrides = dict(overrides or {})
    progress = progress or (lambda *a: None)
    source = open_bundle(src)
    m = source.manifest
    if opts.target == "auto":  # a static bundle is made for NPU providers: plain QDQ
        opts = dataclasses.replace(opts, target="npu" if m.is_static else "cpu")
    unknown = sorted(set(overrides) - set(m.components))
    if unknown:
        raise QuantError(f"no component {unknown[0]!r} in this bundle (it has {', '.join(m.components)})")
    if "decoder" in overrides and "prefill" in m.components:  # a static bundle's two decoder graphs, one level
        overrides.setdefault("prefill", overrides["decoder"])
    graphs = {name: bundle_io.load_graph(source, comp) for name, comp in m.components.items()}
    tokenizer = source.read(m.tokenizer.file)  # hashed again as read
    vlm = edgevlm.load(src, threads=threads)
    prompts = calib.examples(calib_seed, calib_n)
    feeds = calib.record_feeds(vlm, prompts)
    search_info = None
    with tempfile.TemporaryDirectory(prefix="edgevlm-calib-") as cache:
        def quantize_component(name: str, levels: dict[str, str], copy: bool = True) -> onnx.ModelProto:
            return quantize(graphs[name], levels, opts, calibration=lambda: iter(feeds[name]),
                            cache=Path(cache) / f"{name}.json", copy=copy)

        if scheme == "mixed":
            plan, labels, search_info = _search(vlm, graphs, quantize_component, opts, prompts, overrides, report,
                                                progress, budget=budget, dataset=dataset, eval_seed=eval_seed,
                                                eval_n=eval_n, confirm_n=confirm_n, extra_bytes=len(tokenizer))
        else:
            plan, labels = resolve(graphs, scheme, overrides)
        # What the fp32 runtime still has to answer, asked now: it is released before the graphs are quantized
        # (its sessions hold the weights once more), and each graph is dropped once its quantized copy is
        # written, smallest first -- on a 0.5B model the peak resident memory was 19 GB with all of them held.
        ref = fp32_reference(vlm, prompts[:8], dataset, eval_seed, eval_n, progress)
        vlm = None
        sizes = {c: sum(bundle_io.bundle_path_size(source.root, r.file) for r in (comp, *comp.data_files))
                 for c, comp in m.components.items()}
        with atomic_dir(Path(dst), overwrite, error=QuantError) as tmp:
            comps, total = _write_graphs(tmp, m, graphs, plan, labels, opts, quantize_component, sizes, progress)
            total += len(tokenizer)
            (tmp / m.tokenizer.file).write_bytes(tokenizer)
            src_bytes = sum(bundle_io.bundle_path_size(source.root, r.file) for r in m.files())
            details = {"components": labels, "bytes": total, "source_bytes": src_bytes,
                       "bytes_ratio": round(total / src_bytes, 4), "options": dataclasses.asdict(opts),
                       "calibration": {"dataset": "shapes", "seed": calib_seed, "n": calib_n}}
            if search_info:
                details["search"] = search_info
            top = "mixed" if scheme == "mixed" else (scheme if not overrides else "custom")
            new = dataclasses.replace(m, components=comps, quant=Quant(scheme=top, details=details))
            write_atomic(bundle_io.manifest_path(tmp), new.to_json())
            progress("verify", 0, 1)
            figures = verify(ref["logits"], tmp, prompts[:8], threads)
            if dataset:
                figures["accuracy"] = accuracy(ref["accuracy"], tmp, dataset, eval_seed, eval_n, threads, progress)
            new = dataclasses.replace(new, quant=Quant(scheme=top, details={**details, **figures}))
            write_atomic(bundle_io.manifest_path(tmp), new.to_json())
            open_bundle(tmp)  # the final manifest's hashes hold
            progress("verify", 1, 1)
    return new


def _search(vlm, graphs, quantize_component, opts, prompts, overrides, report, progress, **kw) -> tuple:
    """The mixed scheme: (plan, labels, search summary) of the smallest bundle meeting the budget; pinned
    components (overrides) keep their level."""
    from .search import search

    fixed, fixed_labels = resolve({c: graphs[c] for c in overrides}, "fp32", overrides)
    result = search(vlm, graphs, quantize_component, opts, prompts, fixed=fixed, progress=progress, **kw)
    if report:
        from .report import write_report

        write_report(result, Path(report))
    return result.plan, {**result.labels, **fixed_labels}, result.summary


def _write_graphs(tmp: Path, m, graphs: dict, plan: dict, labels: dict, opts, quantize_component, sizes: dict,
                  progress) -> tuple[dict, int]:
    """Quantize and write each component, smallest first, dropping each source graph once its copy is written
    (a 0.5B model peaked at 19 GB with all held). -> (components in the manifest's order, bytes written)."""
    comps, total = {}, 0
    progress("quantize", 0, len(graphs))
    for i, name in enumerate(sorted(m.components, key=sizes.get)):
        comp = m.components[name]
        nodes = [n.name for n in weight_nodes(graphs[name])]
        out = quantize_component(name, plan[name], copy=False) if plan[name] else graphs[name]
        del graphs[name]
        path = tmp / comp.file
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = bundle_io.write_graph(out, path)
        size = path.stat().st_size
        total += size
        section = component_quant(out, nodes, plan[name], labels[name], opts, size)
        del out
        comps[name] = dataclasses.replace(comp, sha256=sha, data_files=(), precision=labels[name], quant=section)
        progress("quantize", i + 1, len(m.components))
    return {name: comps[name] for name in m.components}, total


def fp32_reference(vlm, prompts: list[tuple], dataset: str | None, seed: int, n: int, progress: Progress) -> dict:
    """The source's first-token logits on the verify prompts and, with an eval set, its accuracy."""
    ref = {"logits": [calib.first_logits(vlm, image, question) for image, question, *_ in prompts]}
    if dataset:
        from edgevlm.evaluate import evaluate

        progress("eval", 0, 2)
        ref["accuracy"] = evaluate(vlm, dataset, seed, n)
        progress("eval", 1, 2)
    return ref


def verify(ref_logits: list[np.ndarray], root: Path, prompts: list[tuple], threads: int) -> dict:
    """Load the written bundle through edgevlm.load, answer, and compare first-token logits with fp32's."""
    q = edgevlm.load(root, threads=threads)
    diffs, kls = [], []
    for a, (image, question, *_) in zip(ref_logits, prompts):
        b = calib.first_logits(q, image, question)
        diffs.append(float(np.abs(a - b).max()))
        kls.append(calib.kl(a[None], b[None]))
    q.generate(prompts[0][0], prompts[0][1], max_tokens=4)
    return {"fidelity": {"prompts": len(prompts), "max_abs_logit_diff": round(max(diffs), 6),
                         "mean_kl": round(float(np.mean(kls)), 6)}}


def accuracy(a0: dict, root: Path, dataset: str, seed: int, n: int, threads: int, progress: Progress) -> dict:
    """Exact-match accuracy of the new bundle next to the fp32 source's (a0), on the same questions."""
    from edgevlm.evaluate import evaluate

    q = edgevlm.load(root, threads=threads)
    a1 = evaluate(q, dataset, seed, n)
    progress("eval", 2, 2)
    return {"dataset": dataset, "seed": seed, "n": n, "fp32": a0["accuracy"], "quantized": a1["accuracy"],
            "ratio": round(a1["accuracy"] / a0["accuracy"], 4) if a0["accuracy"] else None,
            "per_type": {"fp32": a0["per_type"], "quantized": a1["per_type"]}}
