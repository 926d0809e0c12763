"""`edgevlm chat`: stream answers about images or a video — one answer with --prompt, else an interactive loop."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .chat_session import HELP, Session, save_history, setup_readline, stop_note
from .common import one_line_errors

# what the embedded demo model was trained on (edgevlm/data/shapes.py): said once when an interactive chat starts on it
DEMO_NOTE = ("The demo model knows only a procedural world of colored shapes: circles, squares, triangles and stars "
             "in six colors on a grey ground. Ask what color or shape an object is, how many there are, where they "
             "are, which is bigger, or \"Describe the image.\"{example} For other pictures and questions, load "
             "another model: edgevlm chat --bundle B.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm chat", description=(
        "Chat about images or a video. With --prompt, stream one answer and exit; otherwise read questions from the "
        f"terminal, with arrow-key history ({HELP}). An answer cut short ends with [stopped: max tokens] or "
        "[stopped: context full]. Without --bundle the embedded demo bundle is used."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--image", metavar="I", action="append", default=None,
                   help="image file (JPEG, PNG, WebP, GIF, BMP); repeat it for several images, in that order")
    p.add_argument("--video", metavar="V", default=None,
                   help="video file (needs PyAV: pip install 'edgevlm[video]'); its frames follow the images")
    p.add_argument("--fps", type=float, default=None, metavar="F",
                   help="with --video or /video: frames kept per second of video (default: the bundle's)")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="with --video or /video: keep exactly N frames, spread over the video (instead of --fps)")
    p.add_argument("--prompt", metavar="P", help="ask this, print the answer, exit")
    p.add_argument("--system", metavar="S", help="system prompt (the chat template's system message)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="cap on generated tokens per answer (default: the bundle's generation.max_new_tokens); "
                        "more than the model's context holds is capped to it, with a note")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy "
                   "(default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="with --temperature > 0: sample among the K most likely tokens only (default 0: no limit)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="with --temperature > 0: sample among the most likely tokens whose probabilities add up "
                        "to P (default 1: all)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the sampler's random numbers, for repeatable answers at --temperature > 0 "
                        "(default: a new one each run)")
    p.add_argument("--stop", action="append", default=None, metavar="S",
                   help="end the answer where this text would appear (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the image and prefix KV caches on disk here too: a later run with the same image "
                        "and prompt prefix skips the encoder and the shared part of the prefill")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="K",
                   help="image-token budget per image: keep at most K image rows, spread over the picture "
                        "(default: the bundle's generation.max_image_tokens, else all)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="make every answer a JSON value following the JSON Schema in FILE (structured output: "
                        "tokens the schema does not allow are never sampled)")
    p.add_argument("--regex", metavar="RE", default=None, help="make every answer match this regular expression")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="with --prompt --json: each token's log-probability and its K likeliest alternatives (0-20)")
    p.add_argument("--json", action="store_true",
                   help="with --prompt: print one JSON object (answer, finish_reason, figures, logprobs) instead of "
                        "the text")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="comma-separated onnxruntime execution providers, tried in order; CPU is the fallback")
    return p


def load(bundle, providers, console, cache_dir=None):
    """edgevlm.load with a progress bar (verify every sha256, open the graphs, warm them up)."""
    import edgevlm
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    name = Path(bundle).name if bundle else "the embedded demo"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"loading {name}: verifying files, opening graphs, warming up", total=None)
        t = time.perf_counter()
        vlm = edgevlm.load(bundle, providers=providers, cache_dir=cache_dir)
        bar.update(task, total=1, completed=1)
    return vlm, time.perf_counter() - t


def check(args) -> None:
    """Refuse arguments that cannot work, before the model loads."""
    from edgevlm.errors import ArgumentError

    if args.prompt is not None and not args.prompt.strip():
        raise ArgumentError("--prompt is empty: give a question, or leave --prompt out for an interactive chat")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ArgumentError("--max-tokens must be at least 1")
    if (args.json or args.logprobs is not None) and args.prompt is None:
        raise ArgumentError("--json and --logprobs go with --prompt (one answer)")
    if args.json_schema and args.regex:
        raise ArgumentError("give one of --json-schema and --regex")
    if args.fps is not None and args.frames is not None:
        raise ArgumentError("give one of --fps and --frames")
    if args.fps is not None and not 0 < args.fps <= 1000 or args.frames is not None and args.frames < 1:
        raise ArgumentError("--fps must be in (0, 1000] and --frames at least 1")


def response_format(args) -> dict | None:
    """--json-schema FILE / --regex RE as the runtime's response_format."""
    import json

    from edgevlm.errors import ArgumentError

    if args.regex:
        return {"type": "regex", "regex": args.regex}
    if not args.json_schema:
        return None
    try:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
    except OSError as e:
        raise ArgumentError(f"--json-schema: cannot read {args.json_schema!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise ArgumentError(f"--json-schema: {args.json_schema!r} is not JSON: {e}") from None
    return {"type": "json_schema", "json_schema": {"schema": schema}}


def fit_max_tokens(gen: dict, context_length: int, err) -> None:
    """An answer cannot outgrow the context (prompt included): a larger --max-tokens is capped, with a note."""
    if gen["max_tokens"] is not None and gen["max_tokens"] > context_length:
        err.print(f"note: --max-tokens {gen['max_tokens']} is more than this model's context holds: capped to "
                  f"{context_length} (prompt included); a longer answer ends with [stopped: context full]", markup=False)
        gen["max_tokens"] = context_length


def one_answer(chat, args, gen: dict, context_length: int) -> int:
    """--prompt: the answer on stdout (or, with --json, one JSON object); why it was cut, if it was, on stderr."""
    if args.json:
        return json_answer(chat, args, gen)
    last = None
    for last in chat.stream(args.prompt, **media(args), **gen):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    note = stop_note(last, context_length)
    if note:
        print(note, file=sys.stderr)
    return 0


def json_answer(chat, args, gen: dict) -> int:
    import json

    rs = list(chat.stream(args.prompt, **media(args), **gen))
    tok = chat.vlm.tokenizer
    out = {"answer": "".join(r.text for r in rs), "finish_reason": rs[-1].finish_reason, **rs[-1].figures()}
    if args.logprobs is not None:
        out["logprobs"] = [{"token": tok.decode([r.token], skip_special_tokens=False), "id": r.token,
                            "logprob": r.logprob, "top": [{"id": t, "token": tok.decode([t], skip_special_tokens=False),
                                                           "logprob": lp} for t, lp in r.top_logprobs]} for r in rs]
    print(json.dumps(out))
    return 0


def media(args) -> dict:
    """--image (each) and --video as Chat.stream's images= and video=."""
    from edgevlm import Video

    video = Video(args.video, fps=args.fps, frames=args.frames) if args.video else None
    return {"images": args.image or [], "video": video}


def demo_note() -> str:
    import edgevlm

    example = Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"
    return DEMO_NOTE.format(example=f" Try: /image {example}" if example.exists() else "")


def interactive(s: Session, args, err) -> int:
    from edgevlm.errors import EdgeVLMError

    rl = setup_readline()
    try:
        for path in args.image or []:
            s.attach(path)
        if args.video:
            s.attach(args.video, video=True)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                s.console.print()
                return 0
            except KeyboardInterrupt:
                s.console.print()
                continue
            try:
                if line and not s.run(line):
                    return 0
            except EdgeVLMError as e:  # a bad image or an overlong prompt does not end the session
                err.print(f"error: {e}", markup=False)
    finally:
        save_history(rl)


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check(args)
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    providers = args.providers.split(",") if args.providers else None
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, stop=args.stop, max_image_tokens=args.max_image_tokens,
               response_format=response_format(args))
    if args.logprobs is not None:
        gen.update(logprobs=True, top_logprobs=args.logprobs)
    vlm, load_s = load(args.bundle, providers, err, args.cache_dir)
    fit_max_tokens(gen, vlm.context_length, err)
    chat = vlm.chat(system=args.system)
    if args.prompt is not None:
        return one_answer(chat, args, gen, vlm.context_length)
    s = Session(vlm, chat, gen, console, Path(args.bundle).name if args.bundle else "shapes-fastvlm",
                video_options={"fps": args.fps, "frames": args.frames})
    err.print(f"[bold]edgevlm chat[/] — loaded in {load_s:.1f} s. {HELP}")
    if args.bundle is None:
        err.print(demo_note(), markup=False)
    return interactive(s, args, err)
