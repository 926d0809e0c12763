"""The house rules that keep the runtime readable, checked on the source: no import cycles in edgevlm/, one file
per decoder backend, the llama.cpp decoder free of onnxruntime, small files and functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "edgevlm"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """edgevlm modules a runtime module imports at import time (not inside functions, not for type checking)."""
    tree = ast.parse(path.read_text())
    pkg = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else []:
            if isinstance(n, ast.ImportFrom) and n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - n.level + 1]
                target = ".".join(base + ([n.module] if n.module else []))
                named = [f"{target}.{a.name}" for a in n.names]  # `from . import x`: the submodule x, not the package
                out |= {t for t in ([target] if n.module else []) + named if _exists(t)}
            elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("edgevlm"):
                out |= {t for t in [n.module] + [f"{n.module}.{a.name}" for a in n.names] if _exists(t)}
            elif isinstance(n, ast.Import):
                out |= {a.name for a in n.names if a.name.startswith("edgevlm") and _exists(a.name)}
    return out


def _exists(module: str) -> bool:
    if not module.startswith("edgevlm"):
        return False
    p = ROOT / Path(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def test_no_import_cycles_in_the_runtime():
    graph = {_module(p): _imports(p) for p in RUNTIME.rglob("*.py") if "assets" not in p.parts}
    cycles = []

    def visit(node, stack, seen):
        for nxt in graph.get(node, ()):
            if nxt == stack[0]:
                cycles.append(stack + [nxt])
            elif nxt not in seen and nxt in graph:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for mod in graph:
        visit(mod, [mod], {mod})
    # a package importing its own submodules is not a cycle; a submodule importing its package back is
    real = [c for c in cycles if not all(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    print(f"{len(graph)} runtime modules, {sum(map(len, graph.values()))} imports between them")
    assert not real, real[:5]


def test_one_file_per_decoder_backend():
    from edgevlm.decoders import REGISTRY

    files = {spec.split(":")[0] for spec in REGISTRY.values()}
    assert len(files) == len(REGISTRY)  # each backend its own module
    for module in files:
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), module


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else []:
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
                out.add(n.module.split(".")[0])
    return out


def test_the_llama_cpp_decoder_and_import_edgevlm_stay_light():
    code = ("import sys, edgevlm\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'coremltools', 'llama_cpp', 'llguidance', "
            "'onnxruntime_genai', 'starlette', 'rich') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    # what the llama.cpp decoder's module imports, transitively (packages' __init__ aside): no onnxruntime
    graph = {_module(p): _imports(p) for p in RUNTIME.rglob("*.py")}
    reach, todo = set(), ["edgevlm.decoders.gguf"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo += [x for x in graph.get(m, ()) if x not in ("edgevlm", "edgevlm.decoders")]
    libs = set().union(*(_third_party(ROOT / Path(*m.split(".")).with_suffix(".py")) for m in reach))
    print("the llama.cpp decoder imports", sorted(reach), "and", sorted(libs - {"__future__"}))
    assert "onnxruntime" not in libs


def test_small_files_and_functions():
    """Runtime files under 400 lines and functions under 60, unless a comment on the def line says why."""
    big = []
    for p in sorted(RUNTIME.rglob("*.py")):
        src = p.read_text()
        lines = src.splitlines()
        if len(lines) > MAX_FILE_LINES:
            big.append(f"{p.relative_to(ROOT)}: {len(lines)} lines")
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= MAX_FUNCTION_LINES:
                if "# long:" not in lines[n.lineno - 1]:
                    big.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert not big, big
