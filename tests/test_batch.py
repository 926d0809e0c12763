"""`edgevlm batch` and `edgevlm eval --dataset FILE`: the local process pool and a real local Ray instance answer
~200 demo images exactly as a single-process loop does; bad rows are reported, not fatal; a job killed with
SIGKILL and rerun ends with every row once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgevlm
from edgevlm.apps import batch_cmd, batch_io, eval_cmd
from edgevlm.apps.common import requires
from edgevlm.apps.eval_file import normalize
from edgevlm.data import shapes

N = 200
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """N demo images as PNG files, rows naming them (relative paths), bad rows after them, and the answers of a
    plain single-process loop over the same files."""
    root = tmp_path_factory.mktemp("batch")
    (root / "img").mkdir()
    rows, labelled = [], []
    for i, ex in enumerate(shapes.examples(shapes.TEST_SEED, N)):
        ex.image.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prompt": ex.question, "qtype": ex.qtype})
        labelled.append({"image": f"img/{i}.png", "question": ex.question, "answer": ex.answer, "category": ex.qtype})
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    bad = [{"image": "img/corrupt.png", "prompt": "What color is the star?"},
           {"image": "img/missing.png", "prompt": "What color is the star?"},
           {"image": "img/0.png", "prompt": ""}]
    _write_jsonl(root / "rows.jsonl", rows + bad)
    _write_jsonl(root / "labelled.jsonl", labelled)
    vlm = edgevlm.load()
    reference = [vlm.generate(str(root / r["image"]), r["prompt"], max_tokens=MAX_TOKENS) for r in rows]
    return {"root": root, "rows": rows, "labelled": labelled, "reference": reference, "bad": len(bad)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _batch(capsys, *argv) -> dict:
    assert batch_cmd.main([*argv, "--max-tokens", str(MAX_TOKENS), "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def _say(capsys, text: str) -> None:
    with capsys.disabled():  # the figure shows in -s runs although the command's output is captured
        print(text)


def _check(demo, out_rows: list[dict], capsys) -> None:
    """Every input row exactly once; demo rows answered as the single-process loop answered; bad rows failed."""
    ids = [r["id"] for r in out_rows]
    assert sorted(ids) == list(range(N + demo["bad"])), "each row once"
    by_id = {r["id"]: r for r in out_rows}
    got = [by_id[i]["answer"] for i in range(N)]
    same = sum(a == b for a, b in zip(got, demo["reference"]))
    _say(capsys, f"answers identical to the single-process loop: {same}/{N}")
    assert same == N
    for i in range(N):
        r = by_id[i]
        assert r["error"] is None and r["finish_reason"] in ("stop", "length") and r["ttft_s"] > 0
        assert r["encode_s"] > 0 and r["prefill_s"] > 0 and r["qtype"] == demo["rows"][i]["qtype"]
    corrupt, missing, no_prompt = (by_id[N + k] for k in range(3))
    assert corrupt["error"].startswith("ImageError") and corrupt["answer"] is None, corrupt
    assert missing["error"] and "missing.png" in missing["error"], missing
    assert "no prompt" in no_prompt["error"], no_prompt


def test_local_pool_matches_single_process(demo, capsys):
    out = demo["root"] / "local.jsonl"
    summary = _batch(capsys, "--input", str(demo["root"] / "rows.jsonl"), "--output", str(out), "--workers", "2")
    assert summary["rows"] == N + demo["bad"] and summary["errors"] == demo["bad"] and summary["workers"] == 2
    assert all(v > 0 for v in summary["worker_peak_rss_bytes"].values())
    _check(demo, batch_io.read_output(out), capsys)
    again = _batch(capsys, "--input", str(demo["root"] / "rows.jsonl"), "--output", str(out))
    assert again["rows"] == 0 and again["skipped"] == N + demo["bad"]  # a finished job reruns as a no-op


def test_ray_actor_pool_matches_single_process(demo, capsys):
    requires("the Ray tests", "ray")  # a missing extra fails here, naming it
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        out = demo["root"] / "ray.parquet"
        summary = _batch(capsys, "--input", str(demo["root"] / "rows.jsonl"), "--output", str(out),
                         "--engine", "ray", "--workers", "2", "--batch-size", "16")
        assert ray.is_initialized(), "a Ray instance the caller started is left running"
    finally:
        ray.shutdown()
    assert summary["rows"] == N + demo["bad"] and summary["workers"] == 2, summary
    assert all(p.suffix == ".parquet" for p in out.iterdir()), "no temp parts left"
    _check(demo, batch_io.read_output(out), capsys)


def test_parquet_output_resumes(demo, capsys):
    rows = demo["root"] / "rows.jsonl"
    head = demo["root"] / "head.jsonl"
    head.write_text("".join(rows.read_text().splitlines(keepends=True)[:50]))
    out = demo["root"] / "resume.parquet"
    first = _batch(capsys, "--input", str(head), "--output", str(out), "--workers", "1")
    rest = _batch(capsys, "--input", str(rows), "--output", str(out), "--workers", "2")
    assert first["rows"] == 50 and rest["skipped"] == 50 and rest["rows"] == N + demo["bad"] - 50
    _check(demo, batch_io.read_output(out), capsys)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_job_reruns_to_completion_without_duplicates(demo, capsys):
    root, out = demo["root"], demo["root"] / "killed.jsonl"
    cmd = [sys.executable, "-m", "edgevlm.apps.cli", "batch", "--input", str(root / "rows.jsonl"), "--output",
           str(out), "--workers", "2", "--batch-size", "4", "--max-tokens", str(MAX_TOKENS)]
    job = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _lines(out) < 12 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, f"the job ended before it was killed: {job.stderr.read().decode()[-2000:]}"
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the command and its pool processes
        job.wait()
    kept = out.read_bytes()
    done = kept.count(b"\n")
    _say(capsys, f"killed after {done} of {N + demo['bad']} rows")
    assert 12 <= done < N + demo["bad"]
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves: a torn last line
        f.write(b'{"id": 199, "image": "img/199.png", "ans')
    summary = _batch(capsys, "--input", str(root / "rows.jsonl"), "--output", str(out), "--workers", "2")
    assert out.read_bytes().startswith(kept), "rows written before the kill are kept as they were"
    assert summary["skipped"] == done
    _check(demo, batch_io.read_output(out), capsys)


def test_eval_on_a_dataset_file(demo, capsys):
    path = demo["root"] / "labelled.jsonl"
    _write_jsonl(path, demo["labelled"])
    assert eval_cmd.main(["--dataset", str(path), "--workers", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    answers = [r["answer"] for r in demo["labelled"]]
    exact = sum(p.strip() == a for p, a in zip(demo["reference"], answers)) / N
    match = sum(normalize(p) == normalize(a) for p, a in zip(demo["reference"], answers)) / N
    plain = sum(shapes.normalize_answer(p) == shapes.normalize_answer(a) for p, a in zip(demo["reference"], answers)) / N
    _say(capsys, f"eval: exact {result['exact_match']:.4f}, normalised {result['normalized_match']:.4f} "
          f"(shapes' own normalisation: {plain:.4f})")
    assert result["n"] == N and result["errors"] == 0
    assert result["exact_match"] == exact and result["normalized_match"] == match
    assert result["normalized_match"] >= plain > 0.5  # the demo model answers its own held-out set
    assert set(result["per_category"]) == set(shapes.QTYPES)


def test_eval_resumes_from_its_output(demo, capsys):
    path, out = demo["root"] / "labelled20.jsonl", demo["root"] / "preds.jsonl"
    _write_jsonl(path, demo["labelled"][:20])
    assert eval_cmd.main(["--dataset", str(path), "--output", str(out), "--workers", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert eval_cmd.main(["--dataset", str(path), "--output", str(out), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["skipped"] == 20 and second["run"]["rows"] == 0
    assert {k: second[k] for k in ("n", "exact_match", "normalized_match")} == \
        {k: first[k] for k in ("n", "exact_match", "normalized_match")}
    rows = batch_io.read_output(out)
    assert [r["prediction"] for r in sorted(rows, key=lambda r: r["id"])] == demo["reference"][:20]


def test_normalize():
    assert normalize("The RED circle.") == normalize("red  circle") == "red circle"
    assert normalize("(B)") == "b" and normalize("A") == "a" and normalize("a cat") == "cat"


def test_refusals_are_one_line(demo, capsys, tmp_path):
    rows = str(demo["root"] / "rows.jsonl")
    cases = [(["--json-schema", str(tmp_path / "missing.json")], "cannot read"), (["--bundle", str(tmp_path)], "manifest.json"),
             (["--engine", "local", "--ray-address", "auto"], "--engine ray"), (["--workers", "0"], "at least 1")]
    for extra, words in cases:
        assert batch_cmd.main(["--input", rows, "--output", str(tmp_path / "o.jsonl"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert batch_cmd.main(["--input", rows, "--output", rows]) == 1
    assert "is the input file" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("")
    assert batch_cmd.main(["--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert ".jsonl/.csv/.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("argv,extra,missing", [
    (["batch", "--input", "{rows}", "--output", "{tmp}/o.jsonl", "--engine", "ray"], "ray", "ray"),
    (["batch", "--input", "{rows}", "--output", "{tmp}/o.parquet"], "parquet", "pyarrow"),
    (["eval", "--dataset", "{rows}", "--output", "{tmp}/o.jsonl", "--engine", "ray"], "ray", "ray"),
])
def test_without_its_extra_a_command_says_which_to_install(demo, argv, extra, missing, tmp_path):
    """In a fresh interpreter where the module cannot be imported (a venv without the extra), the command refuses
    in one line naming the extra, before writing anything."""
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from edgevlm.apps.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [a.format(tmp=tmp_path, rows=demo["root"] / "rows.jsonl") for a in argv]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 1 and p.stdout == "" and err.splitlines() == [err], err
    assert f"pip install 'edgevlm[{extra}]'" in err and missing in err
    assert not any(tmp_path.iterdir())


def test_batch_with_a_json_schema(demo, tmp_path):
    """--json-schema: every row's answer is JSON of the schema, on the local engine (200 tokens: three objects take
    ~115 in the schema's compact form; a cap that cuts an answer cuts its JSON too)."""
    from edgevlm.data import shapes

    schema = tmp_path / "scene.json"
    schema.write_text(json.dumps(shapes.scene_schema()))
    out = tmp_path / "structured.jsonl"
    rows = str(demo["root"] / "rows.jsonl")
    assert batch_cmd.main(["--input", rows, "--output", str(out), "--json-schema", str(schema), "--workers", "1",
                           "--prompt", "Describe the image as JSON.", "--max-tokens", "200"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    answered = [r for r in got if r["error"] is None]
    assert len(answered) >= len(got) - 3  # the three bad rows of the fixture fail, the rest answer
    for r in answered:
        objs = json.loads(r["answer"])["objects"]  # parses, and has the schema's shape
        assert 1 <= len(objs) <= 3 and all(set(o) == {"size", "color", "shape"} for o in objs)
