"""The `edgevlm` CLI, called in-process: answers stream to stdout; errors are one line and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from edgevlm.apps import chat, cli, export_cmd

NAME = "llava-siglip-qwen2"


def test_chat_prompt_prints_the_answer(bundle, images, tmp_path, capsys):
    import edgevlm

    images[0].save(tmp_path / "x.png")
    expected = edgevlm.load(bundle(NAME)).generate(images[0], "what is it?", max_tokens=8)
    assert cli.main(["chat", "--bundle", str(bundle(NAME)), "--image", str(tmp_path / "x.png"),
                     "--prompt", "what is it?", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("args,match", [
    (["--image", "/nonexistent/x.png"], "cannot read image"),
    (["--bundle", "/nonexistent"], "not a directory"),
])
def test_chat_errors_are_one_line(bundle, args, match, capsys):
    argv = ["--bundle", str(bundle(NAME)), "--prompt", "hi"] + args
    assert chat.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err and "Traceback" not in err


def test_interactive_chat(bundle, images, tmp_path, monkeypatch, capsys):
    images[1].save(tmp_path / "y.png")
    lines = iter([f"/image {tmp_path / 'y.png'}", "what is it?", "/reset", "/image /nope.png", "again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--bundle", str(bundle(NAME)), "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip()) > 0
    assert "error: cannot read image" in captured.err  # a bad image in the loop does not end the session


def test_export_command(checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    assert export_cmd.main(["--from", str(checkpoint("llava-clip-llama")), "--to", str(out),
                            "--parity-tokens", "4"]) == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["parity"]["greedy_match"]
    assert export_cmd.main(["--from", str(checkpoint("llava-clip-llama")), "--to", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    assert cli.main(["nope"]) == 2
    assert "chat" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        chat.main(["--help"])


@pytest.mark.parametrize("argv,extra,missing", [
    (["quant", "--to", "{tmp}/q", "--scheme", "int4"], "quant", "onnx_ir"),
    (["quant", "--to", "{tmp}/q", "--scheme", "int8"], "quant", "onnx"),
    (["export", "--from", "{tmp}/ckpt", "--to", "{tmp}/b"], "export", "torch"),
    (["export", "--from", "{tmp}/ckpt", "--to", "{tmp}/b", "--format", "gguf"], "gguf", "llama_cpp"),
    (["bench", "--plot", "{tmp}/b.png"], "plot", "matplotlib"),
    (["serve", "--port", "0"], "server", "uvicorn"),
])
def test_a_command_without_its_extra_says_which_to_install(argv, extra, missing, tmp_path):
    """The module is made unimportable in a fresh interpreter (as in a venv without the extra); the command
    refuses at once, in one line naming the extra, before any work."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from edgevlm.apps.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code] + [a.format(tmp=tmp_path) for a in argv],
                       capture_output=True, text=True, timeout=120)
    print(p.stderr.strip())
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert f"pip install 'edgevlm[{extra}]'" in p.stderr and missing in p.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "b.png").exists()


def test_every_option_of_every_command_says_what_it_does(capsys):
    for name, (module, _) in cli.COMMANDS.items():
        import importlib

        actions = importlib.import_module(module).parser()._actions
        assert [a.option_strings for a in actions if not (a.help or "").strip()] == [], name
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        shown = capsys.readouterr().out
        assert all(a.help.split()[0] in shown for a in actions if a.option_strings), name
    with pytest.raises(SystemExit):
        chat.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, says in [("--top-k K", "sample among the K most likely tokens only"), ("--seed S", "for repeatable answers"),
                         ("--top-p P", "whose probabilities add up to P"), ("--temperature T", "0 = greedy"),
                         ("--max-tokens N", "capped to it, with a note")]:
        assert f"{option} {says}" in shown or (option in shown and says in shown), option


def test_eval_json_names_its_seed(capsys):
    assert cli.main(["eval", "--json", "--n", "4", "--seed", "11"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seed"] == 11 and result["n"] == 4 and result["dataset"] == "shapes" and 0 <= result["accuracy"] <= 1


def test_bench_plot_shows_first_decode_and_keeps_the_legend_off_the_bars(tmp_path, capsys):
    """`edgevlm bench --plot` as run, then its figure drawn again from the JSON it wrote: the legend lies beside
    the axes (no bar under it), and the first decode step is drawn and named."""
    from edgevlm.apps.bench_cmd import figure

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", "--resolutions", "64,256", "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert png.stat().st_size > 10_000 and all(r["cold"]["stages_s"]["first_decode"] > 0 for r in rows)
    fig = figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0]
    box = legend.get_window_extent(renderer)
    labels = [t.get_text() for t in legend.get_texts()]
    print("legend:", labels, box)
    assert "first_decode (after TTFT)" in labels and "encode" in labels
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches if p.get_height() > 0]
    assert bars and not any(box.overlaps(b) for b in bars)
    assert not box.overlaps(fig.axes[0].get_window_extent(renderer))
    width, height = fig.canvas.get_width_height()
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height  # inside the saved picture


def test_chat_structured_output_and_json(tmp_path, capsys):
    """--json-schema / --regex constrain the answer; --json --logprobs print one JSON object with the figures."""
    from pathlib import Path

    import edgevlm

    star = str(Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png")
    schema = tmp_path / "color.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"color": {"enum": ["red", "blue", "green"]}},
                                  "required": ["color"], "additionalProperties": False}))
    assert cli.main(["chat", "--image", star, "--prompt", "What color is the star?", "--json-schema", str(schema)]) == 0
    assert json.loads(capsys.readouterr().out) == {"color": "blue"}
    assert cli.main(["chat", "--image", star, "--prompt", "What color is the star?", "--regex", "red|green"]) == 0
    assert capsys.readouterr().out.strip() in ("red", "green")
    assert cli.main(["chat", "--image", star, "--prompt", "What color is the star?", "--json", "--logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    print({k: out[k] for k in ("answer", "finish_reason", "logprobs")})
    assert out["answer"] == "blue" and out["finish_reason"] == "stop" and out["ttft_s"] > 0
    assert all(e["logprob"] <= 0 and len(e["top"]) == 2 for e in out["logprobs"])
    assert "".join(e["token"] for e in out["logprobs"]).startswith("blue")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert cli.main(["chat", "--prompt", "hi", "--json-schema", str(bad)]) == 1
    assert "not JSON" in capsys.readouterr().err
