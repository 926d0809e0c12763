"""`edgevlm` — one entry point, a subcommand per job; each subcommand's `main(argv)` runs in-process too."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading

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


def _end_now(signum, frame) -> None:
    os.write(2, b"\n")
    os._exit(130)  # as the shell's Ctrl-C would: nothing has been written yet


@contextlib.contextmanager
def interrupt_ends_at_once():
    """Ctrl-C while Python loads a command's modules ends the process at once, quietly, with status 130. (A
    KeyboardInterrupt inside a C extension's initialisation -- numpy, onnxruntime -- surfaces as an ImportError
    and a traceback, which no `except KeyboardInterrupt` catches.)"""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield  # (ignored: a background job's, which the shell's Ctrl-C must not end)
        return
    previous = signal.signal(signal.SIGINT, _end_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    with interrupt_ends_at_once():
        command = importlib.import_module(COMMANDS[name][0])
        importlib.import_module("edgevlm.model")  # the runtime: numpy, onnxruntime, tokenizers, Pillow, jinja2
    return command.main(rest)  # from here on, Ctrl-C is a KeyboardInterrupt: each command ends in one line


if __name__ == "__main__":
    sys.exit(main())
