"""`edgevlm export --from HF_DIR --to BUNDLE`: checkpoint -> bundle, with a parity check; `--format ort-genai`
also converts an existing ONNX bundle (`--bundle B`) into a model directory for onnxruntime-genai."""

from __future__ import annotations

import argparse
import json

from .common import one_line_errors, requires


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm export", description=(
        "Export a VLM checkpoint (FastVLM in transformers' or Apple's layout, LLaVA, LLaVA-OneVision, SmolVLM / "
        "Idefics3, MobileVLM) to an edgevlm bundle. "
        "A parity check against PyTorch runs after the export and its figures go into the manifest."))
    p.add_argument("--from", dest="src", metavar="HF_DIR", help=(
        "checkpoint directory, or a Hugging Face hub id (org/name[@revision]) resolved through huggingface_hub's "
        "cache: downloaded when online, read from the cache with HF_HUB_OFFLINE=1 (--format ort-genai: or "
        "--bundle)"))
    p.add_argument("--to", dest="dst", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--format", choices=["onnx", "gguf", "coreml", "ort-genai"], default="onnx", help=(
        "onnx: every graph in ONNX; gguf: vision in ONNX, the language model as GGUF run by llama.cpp; "
        "coreml: CoreML mlpackages next to the ONNX bundle; ort-genai: a model directory for onnxruntime-genai "
        "(native apps: C, C#, Java/Kotlin, Objective-C/Swift), from --bundle B (any ONNX bundle, quantized too) "
        "or from --from HF_DIR (exported first); see docs/native-apps.md (default: onnx)"))
    p.add_argument("--gguf-quant", choices=["F32", "Q8_0", "Q4_0", "Q4_K_M"], default="F32",
                   help="--format gguf: llama.cpp quantization of the language model (default: F32)")
    p.add_argument("--bundle", dest="base", metavar="B", help=(
        "--format gguf/coreml: reuse the vision graph of this ONNX bundle of the same checkpoint "
        "instead of exporting it again; --format ort-genai: the ONNX bundle to convert"))
    p.add_argument("--coreml-quant", choices=["none", "int8", "int4", "palette4", "palette6"], default="none",
                   help="--format coreml: weight compression (linear int8/int4 or k-means palettes)")
    p.add_argument("--static", action="store_true", help=(
        "NPU-ready ONNX bundle: no dynamic dim in any graph (fixed image size; the decoder runs over a fixed-"
        "capacity KV cache driven by attention_mask and position_ids, the prompt in fixed-size chunks), as "
        "providers that need static shapes (QNN, NNAPI, CoreML EP) require"))
    p.add_argument("--kv-capacity", type=int, default=512, metavar="N",
                   help="--static: KV cache slots = the longest conversation in tokens (default: 512, at most "
                        "the model's context)")
    p.add_argument("--prefill-chunk", type=int, default=64, metavar="N",
                   help="--static: prompt positions per prefill call; the last chunk is padded (default: 64)")
    p.add_argument("--decoder", choices=["auto", "gqa", "torch"], default="auto", help=(
        "onnx: how the language model's graph is written. gqa: directly in ONNX on ONNX Runtime's fused kernels "
        "(GroupQueryAttention with rotary positions, RMSNorm fused with the residual add, packed q|k|v and "
        "gate|up GEMMs), for Llama/Qwen2-style models; torch: torch.onnx export of the transformers module; "
        "auto: gqa where it applies, else torch (default)"))
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    p.add_argument("--parity-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens compared with transformers generate (default: 16)")
    p.add_argument("--max-logit-diff", type=float, default=1e-3, metavar="X",
                   help="fail when the fp32 logits differ from PyTorch by more than X (default: 1e-3)")
    return p


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from edgevlm.errors import ArgumentError

    if args.static and args.format != "onnx":
        raise ArgumentError("--static applies to --format onnx only")
    if args.format == "ort-genai" and (args.src is None) == (args.base is None):
        raise ArgumentError("--format ort-genai takes one of --from HF_DIR and --bundle B")
    if args.format != "ort-genai" and args.src is None:
        raise ArgumentError("--from HF_DIR is required")
    if args.format == "ort-genai":
        return _ort_genai(args)
    requires("export", "export")
    if args.format in ("gguf", "coreml"):
        requires(f"export --format {args.format}", args.format)
    from edgevlm.errors import EdgeVLMError, ExportError
    from edgevlm.export.exporter import unexpected

    try:
        m = _export(args)
    except EdgeVLMError:
        raise
    except Exception as e:  # never a traceback: one line naming what failed
        raise ExportError(unexpected({"stage": f"--format {args.format} export", "model_type": None,
                                      "src": args.src}, e)) from e
    print(f"wrote {args.dst} ({m.family}, {m.quant.scheme}); parity: {json.dumps(m.source.parity)}")
    return 0


def _export(args):
    if args.format in ("gguf", "coreml"):  # they read the checkpoint directory themselves
        from edgevlm.export.hub import resolve

        args.src = str(resolve(args.src))
    if args.format == "gguf":
        from edgevlm.export.gguf import export_gguf  # torch is imported only here

        return export_gguf(args.src, args.dst, quant=args.gguf_quant, base_bundle=args.base, overwrite=args.force,
                           parity_tokens=args.parity_tokens, max_logit_diff=args.max_logit_diff)
    if args.format == "coreml":
        from edgevlm.export.coreml import export_coreml

        return export_coreml(args.src, args.dst, quant=args.coreml_quant, base_bundle=args.base, overwrite=args.force)
    from edgevlm.export.exporter import StaticOptions, export

    static = StaticOptions(args.kv_capacity, args.prefill_chunk) if args.static else None
    return export(args.src, args.dst, overwrite=args.force, parity_tokens=args.parity_tokens,
                  max_logit_diff=args.max_logit_diff, static=static, decoder=args.decoder)


def _ort_genai(args) -> int:
    requires("export --format ort-genai", "export", ("onnx",) if args.base else None)
    from edgevlm.export.ort_genai import export_ort_genai

    spec = export_ort_genai(args.src, args.dst, base_bundle=args.base, overwrite=args.force,
                            parity_tokens=args.parity_tokens, max_logit_diff=args.max_logit_diff,
                            decoder=args.decoder)
    print(f"wrote {args.dst} (onnxruntime-genai; {spec['family']}, {spec['quant']}); the app's part: "
          f"{args.dst}/preprocessing.json and docs/native-apps.md")
    return 0
