"""Interactive `edgevlm chat` as a user runs it: commands piped to a subprocess, and keys typed into a pty (the
program's controlling terminal, so Ctrl-C is a SIGINT as in a shell)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import edgevlm

EXAMPLE = Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"
CMD = [sys.executable, "-m", "edgevlm.apps.cli", "chat"]
DEMO_NOTE = "The demo model knows only a procedural world of colored shapes"


def env(tmp_path) -> dict:
    return {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120"}


class Terminal:
    """A program on a pty that is its controlling terminal: keys in, the screen (all bytes so far) out."""

    def __init__(self, args: list[str], environ: dict):
        master, slave = pty.openpty()

        def take_terminal():  # a session of its own, with the pty as its controlling terminal
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=take_terminal, env={**environ, "TERM": "xterm"})
        os.close(slave)
        self.master, self.seen = master, b""

    def read(self, timeout: float = 0.5) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # the program ended and closed the pty
                pass

    def read_until(self, pred, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not pred(self.seen):
            assert time.monotonic() < end, f"timed out; screen so far: {self.seen[-2000:]!r}"
            assert self.proc.poll() is None or select.select([self.master], [], [], 0)[0], \
                f"the program ended ({self.proc.returncode}); screen: {self.seen[-2000:]!r}"
            self.read()

    @property
    def text(self) -> str:
        """The screen as text: colours and cursor moves dropped, line ends as \\n."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.seen.decode(errors="replace")).replace("\r\n", "\n")

    def prompt(self) -> bool:
        return self.seen.rstrip().endswith(b">")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self.read(0.1)
        self.read(0.1)
        return self.proc.poll()  # None: still running after `timeout` (the caller's assertion shows the screen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(tmp_path):
    opened = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(CMD + list(args), env(tmp_path)))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_commands_piped(tmp_path):
    script = "\n".join([
        "/stats",
        f"/image {EXAMPLE}",
        "What color is the star?",
        "/stats",
        "How many objects are there?",
        f"/save {tmp_path / 'first.json'}",
        "/image /nonexistent/picture.png",
        "/reset",
        "/stats",
        "What color is the star?",
        f"/save {tmp_path / 'second.txt'}",
        "/reset all",
        "What color is the star?",
        f"/save {tmp_path / 'third.json'}",
        "/bogus",
        "/help",
        "/quit",
    ]) + "\n"
    p = subprocess.run(CMD, input=script, capture_output=True, text=True, timeout=300, env=env(tmp_path))
    print(p.stdout, p.stderr, sep="\n---\n")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    out = p.stdout
    assert out.count("no answer yet") == 2  # before the first answer, and after /reset
    assert "blue" in out and "TTFT" in out and "image cache hits" in out and "prefill" in out
    assert out.count("(image encoded at /image)") == 1  # /stats after the answer that used the attached image
    assert "error: cannot read image" in p.stderr  # a bad path does not end the session
    assert out.count("unknown command /bogus; commands: /image PATH") == 1  # and /help shows the help alone
    assert out.count("commands: /image PATH") == 2 and "/reset all (new conversation, images dropped too)" in out
    assert "new conversation about image shapes-1.png (kept for the next question; /reset all drops it)" in out
    assert "new conversation; image shapes-1.png dropped" in out
    assert p.stderr.count(DEMO_NOTE) == 1 and "edgevlm chat --bundle B" in p.stderr  # once, at the start

    first = json.loads((tmp_path / "first.json").read_text())
    assert [t["user"] for t in first["turns"]] == ["What color is the star?", "How many objects are there?"]
    assert first["turns"][0]["assistant"] == "blue" and first["turns"][0]["image"] == str(EXAMPLE)
    assert first["turns"][0]["stats"]["image_cache_hits"] == 1  # /image encoded it; the answer hit the cache
    assert first["turns"][1]["image"] is None
    assert first["turns"][1]["stats"]["prefilled_tokens"] < first["turns"][1]["stats"]["prompt_tokens"]  # KV kept

    # /reset: a new conversation (turns 1-2 gone) about the same picture, which goes with the next question
    second = (tmp_path / "second.txt").read_text()
    assert second == f"[image: {EXAMPLE}]\n> What color is the star?\nblue\n\n"
    third = json.loads((tmp_path / "third.json").read_text())  # /reset all: no image any more
    assert [(t["user"], t["image"]) for t in third["turns"]] == [("What color is the star?", None)]


def test_arrow_up_recalls_the_last_question(tmp_path, terminal):
    """A real terminal: readline's history brings the question back with the up arrow."""
    t = terminal("--image", str(EXAMPLE))
    t.read_until(lambda s: b"ready" in s and t.prompt())
    t.type(b"What color is the star?\r")
    done = b"tokens prefilled"  # the figures line that ends each answer
    t.read_until(lambda s: s.count(done) == 1 and t.prompt())
    t.type(b"\x1b[A\r")  # up arrow, Enter
    t.read_until(lambda s: s.count(done) == 2 and t.prompt())
    assert t.seen.count(b"> What color is the star?") == 2 and t.seen.count(b"blue") == 2
    t.type(b"/quit\r")
    assert t.wait() == 0
    history = (tmp_path / "state" / "edgevlm" / "chat_history").read_text()
    assert "What color is the star?" in history  # kept for the next session


def question_filling_the_context() -> str:
    """A question whose prompt (template included, no image) is one token short of the demo's context: the
    answer's first token takes the last position."""
    vlm = edgevlm.load()
    q = "What color is the star?"

    def tokens(text):
        return len(vlm.prompt_ids([{"role": "user", "content": [{"type": "text", "text": text}]}], []))

    while tokens(q + " Please answer.") < vlm.context_length - 1:
        q += " Please answer."
    while tokens(q + ".") < vlm.context_length:
        q += "."
    assert tokens(q) == vlm.context_length - 1
    return q


def test_answers_cut_short_say_why_in_a_terminal(terminal):
    t = terminal("--max-tokens", "1")
    t.read_until(lambda s: t.prompt())
    screen = t.text
    assert screen.count(DEMO_NOTE) == 1 and "edgevlm chat --bundle B" in screen  # the default bundle says so once
    t.type(f"/image {EXAMPLE}\r".encode())
    t.read_until(lambda s: b"ready" in s and t.prompt())
    t.type(b"What color is the star?\r")
    t.read_until(lambda s: b"tokens prefilled" in s and t.prompt())
    answer = t.text.rsplit("What color is the star?", 1)[1]
    print(answer)
    assert "\nblue [stopped: max tokens]\n" in answer and "· 1 token\n" in answer and "1 tokens" not in answer
    t.type(b"/reset all\r")
    t.read_until(lambda s: b"image shapes-1.png dropped" in s and t.prompt())
    n = t.seen.count(b"tokens prefilled")
    t.type(question_filling_the_context().encode() + b"\r")
    t.read_until(lambda s: s.count(b"tokens prefilled") == n + 1 and t.prompt())
    tail = t.text.rsplit("Please answer.", 1)[1]
    print(tail)
    assert "[stopped: context full] /reset starts a new conversation" in tail and "[stopped: max tokens]" not in tail
    t.type(b"/quit\r")
    assert t.wait() == 0


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=timeout)


def test_one_answer_says_on_stderr_why_it_was_cut():
    p = run("--image", str(EXAMPLE), "--prompt", "What color is the star?", "--max-tokens", "1")
    assert (p.returncode, p.stdout, p.stderr) == (0, "blue\n", "[stopped: max tokens]\n")
    p = run("--max-tokens", "100000", "--prompt", question_filling_the_context())
    print(p.stderr)
    assert p.returncode == 0 and len(p.stdout.strip()) > 0 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == ["note: --max-tokens 100000 is more than this model's context holds: capped to "
                                     "512 (prompt included); a longer answer ends with [stopped: context full]",
                                     "[stopped: context full]"]
    p = run("--image", str(EXAMPLE), "--prompt", "What color is the star?")  # the model ended it: no note
    assert (p.returncode, p.stdout, p.stderr) == (0, "blue\n", "")


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "error: --prompt is empty: give a question, or leave --prompt out for an interactive chat"),
    (["--prompt", "  "], "error: --prompt is empty: give a question, or leave --prompt out for an interactive chat"),
    (["--prompt", "hi", "--max-tokens", "0"], "error: --max-tokens must be at least 1"),
])
def test_arguments_that_cannot_work_are_refused_in_one_line(args, message):
    p = run(*args)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", message + "\n")


def test_a_missing_provider_is_named_once():
    p = run("--providers", "NoSuchExecutionProvider,CPUExecutionProvider", "--image", str(EXAMPLE),
            "--prompt", "What color is the star?")
    print(p.stderr)
    assert (p.returncode, p.stdout) == (0, "blue\n")
    assert p.stderr.count("NoSuchExecutionProvider") == 1 and "not available" in p.stderr


def mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
@pytest.mark.parametrize("when", ["_multiarray_umath", "onnxruntime_pybind11_state", "tokenizers", 0.5])
def test_ctrl_c_while_starting_ends_quietly(terminal, when):
    """Ctrl-C while Python loads numpy / onnxruntime / tokenizers (an interrupted C extension raises ImportError, a
    traceback), or half a second in: exit status 130, and no more than what the start had shown."""
    t = terminal()
    end = time.monotonic() + 60
    if isinstance(when, str):  # the moment the extension's shared library is mapped: its initialisation runs next
        while not mapped(t.proc.pid, when):
            assert time.monotonic() < end and t.proc.poll() is None, f"{when} never loaded: {t.seen!r}"
            time.sleep(0.001)
    else:
        time.sleep(when)
    t.type(b"\x03")
    t.read_until(lambda s: t.proc.poll() is not None or t.prompt(), timeout=60)
    if t.proc.poll() is None:  # the whole start took under `when`: Ctrl-C at the prompt clears the line
        for _ in range(3):  # a /quit typed before that Ctrl-C reached input() is cleared with the line
            t.type(b"/quit\r")
            if t.wait(10) is not None:
                break
        assert t.proc.poll() == 0 and b"Traceback" not in t.seen, t.text[-2000:]
        return
    rc = t.wait()
    screen = t.text
    print(when, rc, repr(screen))
    assert rc == 130 and "Traceback" not in screen and "Error" not in screen
    # beside ^C: the loading bar's frames (transient: the terminal erased them), and the banner and the demo note
    # when the load had just ended
    shown = [line for line in screen.replace("^C", "").splitlines() if line.strip()]
    assert [line for line in shown if not line.startswith(("edgevlm chat — loaded", DEMO_NOTE))
            and "loading the embedded demo" not in line] == []
