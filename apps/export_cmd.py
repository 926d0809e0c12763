"""`edgevlm export --from HF_DIR --to BUNDLE`: checkpoint -> bundle, with a parity check."""

from __future__ import annotations

import argparse
import json

from .common import one_line_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm export", description=(
        "Export a transformers VLM checkpoint directory (fast_vlm, llava) to an edgevlm bundle. "
        "A parity check against PyTorch runs after the export and its figures go into the manifest."))
    p.add_argument("--from", dest="src", required=True, metavar="HF_DIR", help="checkpoint directory")
    p.add_argument("--to", dest="dst", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="graph format (default: onnx)")
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    p.add_argument("--parity-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens compared with transformers generate (default: 16)")
    p.add_argument("--max-logit-diff", type=float, default=1e-3, metavar="X",
                   help="fail when the fp32 logits differ from PyTorch by more than X (default: 1e-3)")
    return p


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from edgevlm.export.exporter import export  # torch is imported only here

    m = export(args.src, args.dst, overwrite=args.force, parity_tokens=args.parity_tokens,
               max_logit_diff=args.max_logit_diff)
    print(f"wrote {args.dst} ({m.family}); parity: {json.dumps(m.source.parity)}")
    return 0
