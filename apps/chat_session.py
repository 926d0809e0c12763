"""The interactive chat's state and its commands: the attached image, /reset, /stats, /save, the notes after an answer."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.markup import escape

HELP = ("commands: /image PATH (attach an image to the next question; repeat it for several), /video PATH (attach a "
        "video), /reset (new conversation about the same images), /reset all (new conversation, images dropped too), "
        "/stats (the last answer's TTFT breakdown and cache hits), /save FILE (the transcript; .json or text), /help, "
        "/quit")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def stop_note(r, context_length: int) -> str | None:
    """Why an answer was cut, as shown after it: "[stopped: max tokens]" or "[stopped: context full]"; None when
    the model ended it (or a stop string did). The runtime says "length" for both: the context is full when the
    prompt and the answer fill it (the last token then had no position left)."""
    if r is None or r.finish_reason != "length":
        return None
    if r.prompt_tokens + r.generated_tokens >= context_length:
        return "[stopped: context full]"
    return "[stopped: max tokens]"


class Session:
    """The interactive loop's state: the Chat, the attached images and video, the transcript, the last answer's
    figures."""

    def __init__(self, vlm, chat, gen: dict, console, bundle_name: str, video_options: dict | None = None):
        self.vlm, self.chat, self.gen, self.console, self.bundle_name = vlm, chat, gen, console, bundle_name
        self.video_options = video_options or {}
        self.pending: list[tuple[str, str]] = []  # ("image" | "video", path): attached to the next question
        self.current: list[tuple[str, str]] = []  # the conversation's latest attachments (what /reset keeps)
        self.encoded_ms: float | None = None  # time /image spent encoding (the next answer then hits the cache)
        self.turns: list[dict] = []
        self.last = None
        self.last_encode_ms: float | None = None

    def attach(self, path: str, video: bool = False) -> None:
        from edgevlm import Video

        t = time.perf_counter()
        self.vlm.prepare(Video(path, **self.video_options) if video else path)  # encode now, while the user types
        ms = (time.perf_counter() - t) * 1000
        self.encoded_ms = (self.encoded_ms or 0.0) + ms
        self.pending.append(("video" if video else "image", path))
        self.current = list(self.pending)
        what = "video" if video else "image"
        n = len(self.pending)
        self.console.print(f"[dim]{what} {escape(Path(path).name)} ready ({ms:.1f} ms)"
                           + (f"; {n} attached" if n > 1 else "") + "; ask about it[/]")

    def _media(self) -> dict:
        from edgevlm import Video

        videos = [Video(p, **self.video_options) for k, p in self.pending if k == "video"]
        if len(videos) > 1:
            self.pending = [(k, p) for k, p in self.pending if k == "image"] + [("video", videos[-1].source)]
        return {"images": [p for k, p in self.pending if k == "image"], "video": videos[-1] if videos else None}

    def answer(self, text: str) -> None:
        out, last = [], None
        stream = self.chat.stream(text, **self._media(), **self.gen)
        try:
            for r in stream:
                self.console.print(r.text, end="", markup=False, highlight=False)
                out.append(r.text)
                last = r
        except KeyboardInterrupt:
            self.console.print(" [stopped: Ctrl-C]", style="dim", end="", markup=False)
        finally:
            stream.close()
        note = stop_note(last, self.vlm.context_length)
        if note == "[stopped: context full]":
            note += " /reset starts a new conversation"
        self.console.print(f" {note}" if note else "", style="dim", markup=False)
        attached = [p for _, p in self.pending]
        self.turns.append({"user": text, "image": attached[0] if len(attached) == 1 else (attached or None),
                           "assistant": "".join(out), "stats": last.figures() if last else None})
        self.last_encode_ms = self.encoded_ms if self.pending else None  # /stats shows it for this answer only
        self.pending, self.encoded_ms = [], None  # encoded once: later turns see them through the conversation
        if last is not None:
            self.last = last
            hit = " · image from cache" if last.image_cache_hits else ""
            self.console.print(f"[dim]TTFT {last.ttft_s * 1000:.1f} ms · {last.prefilled_tokens}/{last.prompt_tokens} "
                               f"prompt tokens prefilled{hit} · {plural(last.generated_tokens, 'token')}"
                               + (f", {last.decode_tps:.0f} tok/s" if last.generated_tokens > 1 else "") + "[/]")
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
            table.add_row("prefix KV cache", f"{plural(r.prefix_cache_hit_tokens, 'token')} ({r.prefix_cache_source})")
        if r.peak_rss_bytes:
            table.add_row("peak RSS", f"{r.peak_rss_bytes / 2**20:.0f} MB")
        table.add_row("generated", f"{plural(r.generated_tokens, 'token')}, {r.decode_tps:.1f} tok/s")
        self.console.print(table)

    def save(self, path: str) -> None:
        p = Path(path).expanduser()
        if p.suffix.lower() == ".json":
            data = json.dumps({"bundle": self.bundle_name, "turns": self.turns}, indent=2) + "\n"
        else:
            data = "".join("".join(f"[image: {p}]\n" for p in _listed(t["image"]))
                           + f"> {t['user']}\n{t['assistant']}\n\n" for t in self.turns)
        from edgevlm.atomic import write_atomic

        try:
            write_atomic(p, data)  # never a half-written transcript
        except OSError as e:
            self.console.print(f"error: cannot write {path!r}: {e.strerror or e}", markup=False)
            return
        self.console.print(f"[dim]saved {plural(len(self.turns), 'turn')} to {escape(path)}[/]")

    def reset(self, arg: str = "") -> None:
        """/reset: a new conversation about the same images (they go with the next question); /reset all: without
        them."""
        if arg not in ("", "all"):
            self.console.print("usage: /reset (keeps the images) or /reset all (drops them too)")
            return
        self.chat.reset()
        self.turns, self.last, self.last_encode_ms, self.encoded_ms = [], None, None, None
        names = ", ".join(f"{k} {Path(p).name}" for k, p in self.current)
        them = "it" if len(self.current) == 1 else "them"
        if arg == "all" or not self.current:
            dropped, self.pending, self.current = names, [], []
            self.console.print(f"[dim]new conversation{f'; {escape(dropped)} dropped' if dropped else ''}[/]")
            return
        self.pending = list(self.current)  # encoded already: the next question finds them in the image cache
        self.console.print(f"[dim]new conversation about {escape(names)} (kept for the next question; /reset all "
                           f"drops {them})[/]")

    def run(self, line: str) -> bool:
        """One line of input -> False when the session ends."""
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.reset(rest)
        elif cmd == "/image":
            self.attach(rest) if rest else self.console.print("usage: /image PATH")
        elif cmd == "/video":
            self.attach(rest, video=True) if rest else self.console.print("usage: /video PATH")
        elif cmd == "/stats":
            self.stats()
        elif cmd == "/save":
            self.save(rest) if rest else self.console.print("usage: /save FILE (.json for JSON, else text)")
        elif cmd == "/help":
            self.console.print(HELP)
        elif cmd.startswith("/"):
            self.console.print(f"unknown command {cmd}; {HELP}", markup=False)
        else:
            self.answer(line)
        return True


def _listed(x) -> list:
    return [] if x is None else x if isinstance(x, list) else [x]


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
