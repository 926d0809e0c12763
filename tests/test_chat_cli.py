"""Interactive `edgevlm chat` as a user runs it: commands piped to a subprocess, and arrow keys through a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import edgevlm

EXAMPLE = Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"
CMD = [sys.executable, "-m", "edgevlm.apps.cli", "chat"]


def env(tmp_path) -> dict:
    return {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120"}


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
        "/bogus",
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
    assert "commands: /image PATH" in out  # /bogus shows the help

    first = json.loads((tmp_path / "first.json").read_text())
    assert [t["user"] for t in first["turns"]] == ["What color is the star?", "How many objects are there?"]
    assert first["turns"][0]["assistant"] == "blue" and first["turns"][0]["image"] == str(EXAMPLE)
    assert first["turns"][0]["stats"]["image_cache_hits"] == 1  # /image encoded it; the answer hit the cache
    assert first["turns"][1]["image"] is None
    assert first["turns"][1]["stats"]["prefilled_tokens"] < first["turns"][1]["stats"]["prompt_tokens"]  # KV kept

    second = (tmp_path / "second.txt").read_text()
    assert second.startswith("> What color is the star?\n") and "[image:" not in second  # /reset dropped turn 1-2


def test_arrow_up_recalls_the_last_question(tmp_path):
    """A real terminal: readline's history brings the question back with the up arrow."""
    master, slave = pty.openpty()
    p = subprocess.Popen(CMD + ["--image", str(EXAMPLE)], stdin=slave, stdout=slave, stderr=slave,
                         env={**env(tmp_path), "TERM": "xterm"}, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(pred, timeout=120.0):
        nonlocal seen
        end = time.monotonic() + timeout
        while not pred(seen):
            assert time.monotonic() < end, f"timed out; screen so far: {seen[-2000:]!r}"
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(lambda s: b"ready" in s and s.rstrip().endswith(b">"))
        os.write(master, b"What color is the star?\r")
        done = b"tokens prefilled"  # the figures line that ends each answer
        read_until(lambda s: s.count(done) == 1 and s.rstrip().endswith(b">"))
        os.write(master, b"\x1b[A\r")  # up arrow, Enter
        read_until(lambda s: s.count(done) == 2 and s.rstrip().endswith(b">"))
        assert seen.count(b"> What color is the star?") == 2 and seen.count(b"blue") == 2
        os.write(master, b"/quit\r")
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    history = (tmp_path / "state" / "edgevlm" / "chat_history").read_text()
    assert "What color is the star?" in history  # kept for the next session
