"""`edgevlm quant --bundle B --to B2 --scheme int8|int8-static|int4|fp16|mixed`: a smaller, verified bundle."""

from __future__ import annotations

import argparse
import json
import sys

from .common import one_line_errors, requires

from edgevlm.quant.schemes import INT8_RANGES, LEVELS, SCHEMES, TARGETS
COMPONENTS = ("vision", "embed", "decoder", "prefill", "compressor", "prefusion")

EPILOG = """schemes (every weight goes through onnxruntime's own quantizers):
  fp16         fp16 weights and arithmetic, fp32 inputs/outputs (convert_float_to_float16, keep_io_types)
  int8         dynamic int8: MatMulInteger / ConvInteger after DynamicQuantizeLinear; int8 embeddings; with
               --target cpu a MatMul of one row per run (a decoder's lm_head) is 8-bit MatMulNBits instead
  int8-static  QDQ (QuantizeLinear/DequantizeLinear), int8 per-channel weights and activations calibrated on
               --calib-n shapes scenes: the form NPU providers (QNN, NNAPI) take (--target npu, the default
               for a static bundle); with --target cpu (the default otherwise) a Gelu between quantized
               nodes runs in uint8 too (onnxruntime's CPU kernels QLinearSigmoid and QLinearMul)
  int4         block-wise 4-bit MatMulNBits (--block-size, --symmetric) and GatherBlockQuantized token
               embeddings; Conv has no 4-bit kernel, so a Conv vision encoder becomes fp16
  mixed        a level per layer: the smallest bundle whose measured accuracy is >= --budget x fp32
               on --eval-n questions and on --confirm-n further ones (per-layer sensitivity, greedy order,
               bisection); writes the Pareto set to --report

--vision / --embed / --decoder (and --compressor / --prefusion for LLaVA-Mini bundles, --prefill for static
bundles) set one component's level, e.g. --scheme int4 --vision fp16; with --scheme mixed they pin that
component out of the search. A static bundle (export --static) stays static: int8-static (QDQ) on it gives
the fixed-shape, fully quantized graphs NPU providers take.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm quant", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=(
        "Quantize a bundle into a new bundle: new graphs and sha256s, each component's `quant` section in the "
        "manifest, the bundle's bytes and, with an eval set, its accuracy next to fp32's. The source is never "
        "modified; the new bundle appears only once complete and verified."))
    p.add_argument("--bundle", metavar="B", help="source bundle (default: the embedded demo)")
    p.add_argument("--to", dest="dst", required=True, metavar="B2", help="bundle directory to write")
    p.add_argument("--scheme", required=True, choices=SCHEMES[1:], help="what the weights become (see below)")
    for c in COMPONENTS:
        p.add_argument(f"--{c}", choices=LEVELS, metavar="LEVEL", help=f"level of the {c} component ({', '.join(LEVELS)})")
    p.add_argument("--block-size", type=int, default=32, metavar="N", help="int4: weights per scale, a power of two >= 16 (32)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", help="int4 without zero points")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="int4 with zero points (default)")
    p.set_defaults(symmetric=False)
    p.add_argument("--target", choices=TARGETS, default="auto", help=(
        "int8-static: cpu = a Gelu between quantized nodes runs in uint8 on onnxruntime's CPU kernels "
        "(QLinearSigmoid x QLinearMul, x*sigmoid(1.773x): max |diff| from Gelu 0.014; FastViTHD encode 0.81x "
        "of plain QDQ); "
        "npu = plain QDQ, what NPU providers take; auto = npu for a static bundle, else cpu. int8: cpu = a "
        "decoder's lm_head (one row per run) as 8-bit MatMulNBits"))
    p.add_argument("--int8-range", choices=INT8_RANGES, default="portable", help=(
        "int8 / int8-static weights: portable = 7 bits, exact on every CPU's int8 kernels (x86 with or without "
        "VNNI, ARM); full = 8 bits, one bit more precision on VNNI / ARM, but x86 CPUs without VNNI (AVX2 only) "
        "saturate their int16 sums and lose accuracy -- edgevlm warns when it loads such a bundle there "
        "(default: portable)"))
    p.add_argument("--budget", type=float, default=0.99, metavar="X", help="mixed: keep accuracy >= BUDGET x fp32 (0.99)")
    p.add_argument("--calib-seed", type=int, default=None, metavar="S", help="seed of the calibration scenes")
    p.add_argument("--calib-n", type=int, default=32, metavar="N", help="calibration prompts (32)")
    p.add_argument("--dataset", choices=["auto", "shapes", "none"], default="auto", help=(
        "eval set for accuracy; auto = shapes for the embedded demo bundle and bundles quantized from it, "
        "else none (mixed then keeps agreement with fp32's greedy answers >= budget)"))
    p.add_argument("--eval-seed", type=int, default=None, metavar="S", help="seed of the search/eval questions (validation seed)")
    p.add_argument("--eval-n", type=int, default=300, metavar="N", help="questions per accuracy measurement (300)")
    p.add_argument("--confirm-n", type=int, default=None, metavar="N", help=(
        "mixed: a point is accepted only if it also meets the budget on N further questions of the same seed "
        "(default: as many as --eval-n; 0 = no confirmation)"))
    p.add_argument("--report", metavar="PREFIX", help="mixed: write PREFIX.{json,md,png} (default: B2-search/pareto)")
    p.add_argument("--force", action="store_true", help="replace B2 if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest's quant section as JSON")
    return p


def _dataset(choice: str, bundle) -> str | None:
    if choice != "auto":
        return None if choice == "none" else choice
    from pathlib import Path

    from edgevlm.bundle import open_bundle
    from edgevlm.model import DEFAULT_BUNDLE

    root = Path(bundle) if bundle else DEFAULT_BUNDLE
    if root.resolve() == DEFAULT_BUNDLE.resolve():
        return "shapes"
    details = open_bundle(root).manifest.quant.details or {}
    return (details.get("accuracy") or {}).get("dataset")


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    requires("quant", "quant")
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgevlm.data import shapes
    from edgevlm.model import DEFAULT_BUNDLE
    from edgevlm.quant import Options, quantize_bundle
    from edgevlm.quant.calib import CALIB_SEED

    src = args.bundle or DEFAULT_BUNDLE
    overrides = {c: getattr(args, c) for c in COMPONENTS if getattr(args, c)}
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        from edgevlm.errors import ArgumentError

        raise ArgumentError(f"--block-size must be a power of two >= 16, got {args.block_size}")
    report = args.report or (str(Path(args.dst)) + "-search/pareto" if args.scheme == "mixed" else None)
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=not sys.stderr.isatty(), console=Console(stderr=True),
                  disable=not sys.stderr.isatty()) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        m = quantize_bundle(src, args.dst, args.scheme, overrides=overrides,
                            opts=Options(block_size=args.block_size, symmetric=args.symmetric, target=args.target,
                                         int8_range=args.int8_range),
                            budget=args.budget,
                            calib_seed=CALIB_SEED if args.calib_seed is None else args.calib_seed, calib_n=args.calib_n,
                            dataset=_dataset(args.dataset, args.bundle),
                            eval_seed=shapes.VALIDATION_SEED if args.eval_seed is None else args.eval_seed,
                            eval_n=args.eval_n, confirm_n=args.confirm_n, overwrite=args.force, progress=progress, report=report)
    d = m.quant.details
    if args.json:
        print(json.dumps({"scheme": m.quant.scheme, **d}))
        return 0
    comps = ", ".join(f"{c} {lv}" for c, lv in d["components"].items())
    print(f"wrote {args.dst}: {m.quant.scheme} ({comps}); {d['bytes'] / 1e6:.2f} MB = {d['bytes_ratio']:.3f} x source; "
          f"first-token logits max |diff| {d['fidelity']['max_abs_logit_diff']:.3g}")
    if "accuracy" in d:
        a = d["accuracy"]
        print(f"accuracy on {a['dataset']} (seed {a['seed']}, n={a['n']}): {a['quantized']:.4f} vs fp32 {a['fp32']:.4f}"
              f" ({a['ratio']})")
    if report:
        print(f"Pareto set: {report}.json / .md / .png")
    return 0
