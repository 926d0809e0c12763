"""`edgevlm chat`: stream answers about an image — one answer with --prompt, else an interactive loop."""

from __future__ import annotations

import argparse
import sys

from .common import one_line_errors

HELP = "commands: /image PATH (attach an image to the next question), /reset, /quit"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm chat", description=(
        "Chat about an image. With --prompt, stream one answer and exit; otherwise read questions from the "
        f"terminal ({HELP}). Without --bundle the embedded demo bundle is used."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--image", metavar="I", help="image file (JPEG, PNG, WebP, GIF, BMP)")
    p.add_argument("--prompt", metavar="P", help="ask this, print the answer, exit")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cap on generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the image and prefix KV caches on disk here too: a later run with the same image "
                        "and prompt prefix skips the encoder and the shared part of the prefill")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="comma-separated onnxruntime execution providers, tried in order; CPU is the fallback")
    return p


def _answer(chat, text, image, gen) -> None:
    for r in chat.stream(text, image=image, **gen):
        sys.stdout.write(r.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import edgevlm
    from edgevlm.errors import EdgeVLMError

    providers = args.providers.split(",") if args.providers else None
    vlm = edgevlm.load(args.bundle, providers=providers, cache_dir=args.cache_dir)
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, stop=args.stop)
    chat = vlm.chat()
    if args.prompt is not None:
        _answer(chat, args.prompt, args.image, gen)
        return 0

    try:
        import readline  # noqa: F401  (arrow-key history for input())
    except ImportError:
        pass
    image = args.image
    print(f"edgevlm chat — {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            image = None
            continue
        if line.startswith("/image"):
            image = line[len("/image"):].strip() or None
            continue
        if line.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        try:
            _answer(chat, line, image, gen)
            image = None  # encoded once: later turns see it through the kept conversation
        except EdgeVLMError as e:
            print(f"error: {e}", file=sys.stderr)
