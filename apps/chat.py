"""`edgevlm chat`: stream answers about an image — one answer with --prompt, else an interactive loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import one_line_errors

HELP = ("commands: /image PATH (attach an image to the next question), /reset (new conversation), /stats (the last "
        "answer's TTFT breakdown and cache hits), /save FILE (the transcript; .json or text), /help, /quit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm chat", description=(
        "Chat about an image. With --prompt, stream one answer and exit; otherwise read questions from the "
        f"terminal, with arrow-key history ({HELP}). Without --bundle the embedded demo bundle is used."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--image", metavar="I", help="image file (JPEG, PNG, WebP, GIF, BMP)")
    p.add_argument("--prompt", metavar="P", help="ask this, print the answer, exit")
    p.add_argument("--system", metavar="S", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cap on generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the image and prefix KV caches on disk here too: a later run with the same image "
                        "and prompt prefix skips the encoder and the shared part of the prefill")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="K",
                   help="image-token budget per image: keep at most K image rows, spread over the picture "
                        "(default: the bundle's generation.max_image_tokens, else all)")
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


class Session:
    """The interactive loop's state: the Chat, the attached image, the transcript, the last answer's figures."""

    def __init__(self, vlm, chat, gen: dict, console, bundle_name: str):
        self.vlm, self.chat, self.gen, self.console, self.bundle_name = vlm, chat, gen, console, bundle_name
        self.image: str | None = None
        self.encoded_ms: float | None = None  # time /image spent encoding (the next answer then hits the cache)
        self.turns: list[dict] = []
        self.last = None
        self.last_encode_ms: float | None = None

    def attach(self, path: str) -> None:
        t = time.perf_counter()
        self.vlm.prepare(path)  # encode now, while the user types the question; errors show here
        self.encoded_ms = (time.perf_counter() - t) * 1000
        self.image = path
        self.console.print(f"[dim]image {Path(path).name} ready ({self.encoded_ms:.1f} ms); ask about it[/]")

    def answer(self, text: str) -> None:
        out, last = [], None
        stream = self.chat.stream(text, image=self.image, **self.gen)
        try:
            for r in stream:
                self.console.print(r.text, end="", markup=False, highlight=False)
                out.append(r.text)
                last = r
        except KeyboardInterrupt:
            self.console.print("[dim] (stopped)[/]", end="")
        finally:
            stream.close()
        self.console.print()
        self.turns.append({"user": text, "image": self.image, "assistant": "".join(out),
                           "stats": last.figures() if last else None})
        self.last_encode_ms = self.encoded_ms if self.image else None  # /stats shows it for this answer only
        self.image = None  # encoded once: later turns see it through the kept conversation
        if last is not None:
            self.last = last
            hit = " · image from cache" if last.image_cache_hits else ""
            self.console.print(f"[dim]TTFT {last.ttft_s * 1000:.1f} ms · {last.prefilled_tokens}/{last.prompt_tokens} "
                               f"prompt tokens prefilled{hit} · {last.generated_tokens} tokens, "
                               f"{last.decode_tps:.0f} tok/s[/]")
        self.chat.prepare()  # the next turn's separator and header run now, while the user reads and types

    def stats(self) -> None:
        from rich.table import Table

        r = self.last
        if r is None:
            self.console.print("no answer yet")
            return
        table = Table(title="last answer", show_header=False, box=None, pad_edge=False)
        table.add_row("TTFT", f"{r.ttft_s * 1000:.2f} ms")
        for name, s in r.stages.items():
            table.add_row(f"  {name}", f"{s * 1000:.2f} ms")
        if self.last_encode_ms is not None and "encode" not in r.stages:
            table.add_row("  (image encoded at /image)", f"{self.last_encode_ms:.2f} ms")
        table.add_row("prompt tokens", f"{r.prompt_tokens} ({r.prefilled_tokens} prefilled, "
                                        f"{r.prompt_tokens - r.prefilled_tokens} from the KV cache)")
        table.add_row("image cache hits", f"{r.image_cache_hits} {r.image_cache_source}".strip())
        if r.prefix_cache_hit_tokens:
            table.add_row("prefix KV cache", f"{r.prefix_cache_hit_tokens} tokens ({r.prefix_cache_source})")
        if r.peak_rss_bytes:
            table.add_row("peak RSS", f"{r.peak_rss_bytes / 2**20:.0f} MB")
        table.add_row("generated", f"{r.generated_tokens} tokens, {r.decode_tps:.1f} tok/s")
        self.console.print(table)

    def save(self, path: str) -> None:
        p = Path(path).expanduser()
        if p.suffix.lower() == ".json":
            data = json.dumps({"bundle": self.bundle_name, "turns": self.turns}, indent=2) + "\n"
        else:
            data = "".join((f"[image: {t['image']}]\n" if t["image"] else "") + f"> {t['user']}\n{t['assistant']}\n\n"
                           for t in self.turns)
        from edgevlm.atomic import write_atomic

        try:
            write_atomic(p, data)  # never a half-written transcript
        except OSError as e:
            self.console.print(f"error: cannot write {path!r}: {e.strerror or e}", markup=False)
            return
        self.console.print(f"[dim]saved {len(self.turns)} turn(s) to {path}[/]")

    def reset(self) -> None:
        self.chat.reset()
        self.image, self.encoded_ms, self.turns, self.last, self.last_encode_ms = None, None, [], None, None
        self.console.print("[dim]new conversation[/]")


def history_file() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "edgevlm" / "chat_history"


def setup_readline():
    """Arrow-key editing and history (persisted between sessions) when reading from a terminal."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline, path


def save_history(rl) -> None:
    if rl:
        readline, path = rl
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from rich.console import Console

    from edgevlm.errors import EdgeVLMError

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False)
    providers = args.providers.split(",") if args.providers else None
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, stop=args.stop, max_image_tokens=args.max_image_tokens)
    vlm, load_s = load(args.bundle, providers, err, args.cache_dir)
    chat = vlm.chat(system=args.system)
    if args.prompt is not None:
        for r in chat.stream(args.prompt, image=args.image, **gen):
            sys.stdout.write(r.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    s = Session(vlm, chat, gen, console, Path(args.bundle).name if args.bundle else "shapes-fastvlm")
    err.print(f"[bold]edgevlm chat[/] — loaded in {load_s:.1f} s. {HELP}")
    rl = setup_readline()
    try:
        if args.image:
            s.attach(args.image)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                console.print()
                return 0
            except KeyboardInterrupt:
                console.print()
                continue
            cmd, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if not line:
                    continue
                elif cmd in ("/quit", "/exit"):
                    return 0
                elif cmd == "/reset":
                    s.reset()
                elif cmd == "/image":
                    s.attach(rest) if rest else console.print("usage: /image PATH")
                elif cmd == "/stats":
                    s.stats()
                elif cmd == "/save":
                    s.save(rest) if rest else console.print("usage: /save FILE (.json for JSON, else text)")
                elif cmd.startswith("/"):
                    console.print(HELP)
                else:
                    s.answer(line)
            except EdgeVLMError as e:  # a bad image or an overlong prompt does not end the session
                err.print(f"error: {e}", markup=False)
    finally:
        save_history(rl)
