"""Write the demo's example pictures and their sidecars (scene + questions with the generator's answers).

    python -m edgevlm.export.dev.demo_examples [--out edgevlm/assets/examples]

Two hand-placed scenes on the shapes world's grid; each sidecar lists the objects and a few questions
whose answers come from `edgevlm.data.shapes.answer`, so README examples can be checked against them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from edgevlm.data import shapes
from edgevlm.data.shapes import Obj, Question, Ref, Scene


def _at(row: int, col: int) -> dict:
    return {"cx": (col + 0.5) / shapes.GRID, "cy": (row + 0.5) / shapes.GRID}


SCENES = {
    "shapes-1": (
        Scene((Obj("circle", "red", "large", **_at(1, 1)), Obj("star", "blue", "small", **_at(0, 2)),
               Obj("square", "yellow", "large", **_at(2, 3))), (222, 222, 222)),
        [Question("count"), Question("color", Ref(shape="star")),
         Question("position", Ref(shape="circle"), Ref(shape="square"), "x"), Question("describe")],
    ),
    "shapes-2": (
        Scene((Obj("triangle", "green", "small", **_at(0, 0)), Obj("star", "purple", "large", **_at(1, 2)),
               Obj("circle", "orange", "large", **_at(3, 1)), Obj("square", "blue", "small", **_at(2, 3))),
              (214, 220, 226)),
        [Question("count"), Question("shape", Ref(color="purple")),
         Question("bigger", Ref(shape="triangle", color="green"), Ref(shape="circle", color="orange")),
         Question("position", Ref(shape="triangle"), Ref(shape="circle"), "y")],
    ),
}


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (scene, questions) in SCENES.items():
        shapes.render(scene).save(out / f"{name}.png", optimize=True)
        spec = {"objects": [{k: v for k, v in asdict(o).items() if k != "r"} for o in scene.objects],
                "background": list(scene.background),
                "qa": [{"qtype": q.qtype, "question": shapes.question_text(q), "answer": shapes.answer(scene, q)}
                       for q in questions]}
        (out / f"{name}.json").write_text(json.dumps(spec, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevlm.export.dev.demo_examples", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "edgevlm" / "assets" / "examples")
    write(p.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
