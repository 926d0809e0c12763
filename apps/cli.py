"""`edgevlm` — one entry point, a subcommand per job; each subcommand's `main(argv)` runs in-process too."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "chat": ("edgevlm.apps.chat", "chat about an image (one answer with --prompt, else interactive)"),
    "export": ("edgevlm.apps.export_cmd", "export a transformers checkpoint to a bundle"),
    "quant": ("edgevlm.apps.quant_cmd", "quantize a bundle: int8, int8-static, int4, fp16, mixed under a budget"),
    "eval": ("edgevlm.apps.eval_cmd", "accuracy of a bundle on a held-out procedural set"),
    "batch": ("edgevlm.apps.batch_cmd", "answer a file of (image, prompt) rows: local process pool or Ray Data, resumable"),
    "bench": ("edgevlm.apps.bench_cmd", "TTFT per stage, cold and warm, per input resolution (table, JSON, plot)"),
    "serve": ("edgevlm.apps.serve", "OpenAI-compatible local server and web chat page (loopback by default)"),
}

USAGE = "usage: edgevlm <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<8} {help}" for name, (_, help) in COMMANDS.items()) + "\n\nRun `edgevlm <command> --help` for its options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from edgevlm import __version__

        print(f"edgevlm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edgevlm: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
