"""The README and docs/ say what the code does, and keep saying it.

- No sentence narrates the project's own work history ("session 8", "run 14", "two demos ago"); CHANGELOG.md is
  history by design and is not checked.
- Every code block fenced as ```python run or ```bash run runs as written: in a subprocess, from a temporary
  directory holding the repository's example images at their paths (edgevlm/assets/examples/), with this
  interpreter's `edgevlm`. Blocks without `run` (installs, servers, hour-long benchmarks) are not run.
- docs/bundle-format.md's schema is what scripts/bundle_format.py writes from edgevlm/manifest.py.
- The README's CLI synopsis (the block fenced ```text synopsis) names exactly the options each command's parser
  has, and every command.
- Claims that drifted before: the error types, the extras in the layout, the families, links, machine paths.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.md"))

# Wording that narrates the project's history instead of describing the product.
HISTORY = [
    r"\bsessions? \d", r"\b(this|that|previous|last|next|earlier|later) session\b", r"\brun #?\d+\b(?!\.\d)",
    r"\bruns \d+ ?(?:[–-]|and|to) ?\d+", r"\b(?:one|two|three|\d+) demos? ago\b", r"\b(?:previous|last|earlier) demo\b",
    r"\bnew in this (?:demo|run|version)\b", r"\b(?:committed|final) run\b",
]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)


def blocks(path: Path, info: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in `path` whose info string is `info`."""
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).strip() == info]


@pytest.mark.parametrize("path", DOCS + RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_history_narration(path):
    text = path.read_text(encoding="utf-8")
    found = [(text[:m.start()].count("\n") + 1, m.group(0)) for pat in HISTORY
             for m in re.finditer(pat, text, re.I)]
    assert not found, f"{path.name}: history narration at lines {found}; describe the product as it is " \
                      "(what changed when goes in CHANGELOG.md)"


RUNNABLE = [(p, n, code, info.split()[0]) for p in DOCS for info in ("python run", "bash run")
            for n, code in blocks(p, info)]


@pytest.mark.parametrize("path,line,code,lang", RUNNABLE,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in RUNNABLE])
def test_runnable_block(path, line, code, lang, tmp_path):
    examples = ROOT / "edgevlm" / "assets" / "examples"
    shutil.copytree(examples, tmp_path / "edgevlm" / "assets" / "examples")
    # the block runs from a file outside the working directory: sys.path[0] is that file's directory, so the
    # edgevlm/ directory of example images cannot shadow the installed package (at the repository root, where
    # a reader runs these, edgevlm/ is the package itself)
    script = tmp_path / ".block" / ("block.py" if lang == "python" else "block.sh")
    script.parent.mkdir()
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, str(script)] if lang == "python" else ["bash", "-euo", "pipefail", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{path.name}:{line} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_runnable_blocks_exist():
    assert any(p == README for p, *_ in RUNNABLE), "the README's Python quick start is fenced ```python run"


def test_bundle_format_is_generated_from_the_manifest():
    spec = importlib.util.spec_from_file_location("bundle_format", ROOT / "scripts" / "bundle_format.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    current = mod.DOC.read_text(encoding="utf-8")
    assert mod.expected(current) == current, "docs/bundle-format.md is stale: run python scripts/bundle_format.py"
    import edgevlm.manifest as manifest
    import dataclasses

    for name in ("Manifest", "Component", "Preprocess", "Generation", "ImageLayout"):
        for f in dataclasses.fields(getattr(manifest, name)):
            assert f"| `{f.name}` |" in current, (name, f.name)


def synopsis() -> dict[str, set[str]]:
    """command -> the options the README's synopsis names for it."""
    found = blocks(README, "text synopsis")
    assert len(found) == 1, "the README has one CLI synopsis, fenced ```text synopsis"
    out: dict[str, set[str]] = {}
    command = None
    for line in found[0][1].splitlines():
        m = re.match(r"edgevlm (\w+)", line)
        if m:
            command = m.group(1)
        if command and line.strip():
            code = line.split("  #", 1)[0]  # a trailing comment may name other commands' options
            out.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", code))
    return out


def test_cli_synopsis_matches_every_parser():
    from edgevlm.apps import cli

    names = synopsis()
    assert set(names) == set(cli.COMMANDS), "the synopsis covers every `edgevlm` command and no other"
    for command, (module, _) in cli.COMMANDS.items():
        parser = importlib.import_module(module).parser()
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        assert names[command] == options, (f"edgevlm {command}: in the synopsis only {names[command] - options}, "
                                           f"in --help only {options - names[command]}")


def test_every_error_type_is_named():
    import edgevlm.errors as errors

    text = README.read_text(encoding="utf-8")
    types = [n for n, v in vars(errors).items()
             if isinstance(v, type) and issubclass(v, errors.EdgeVLMError) and v is not errors.EdgeVLMError]
    assert len(types) >= 9
    assert [t for t in types if f"`{t}`" not in text] == []


def test_layout_names_every_extra():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([a-z][a-z0-9-]*) = ", section, re.M))
    line = next(ln for ln in README.read_text(encoding="utf-8").splitlines()
                if ln.startswith("pyproject.toml") and "extras:" in ln)
    assert set(re.findall(r"[a-z][a-z0-9-]*", line.split("extras:", 1)[1])) == extras


def test_family_values_are_the_adapters():
    families = set()
    for path in (ROOT / "export" / "adapters").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["family"] \
                    and isinstance(node.value, ast.Constant) and node.value.value:
                families.add(node.value.value)
    assert len(families) >= 5
    for doc in (README, ROOT / "docs" / "bundle-format.md", ROOT / "docs" / "export.md"):
        text = doc.read_text(encoding="utf-8")
        assert [f for f in families if f"`{f}`" not in text] == [], doc.name


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("path", DOCS + [ROOT / "CHANGELOG.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths(path):
    text = path.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        dest = path.parent / target if target else path
        assert dest.exists(), f"{path.name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: no heading #{anchor} in {dest.name}"
    assert not re.search(r"/work/|/root/|/home/\w|/tmp/x\b", text), f"{path.name}: a path of one machine"


def test_readme_stays_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300
