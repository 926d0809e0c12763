"""Mixed precision under an accuracy budget: per-layer sensitivity, a greedy order, a bisection on accuracy.

1. Sensitivity. Each weight node (MatMul / Conv / Gather) is quantized alone at each of its lower levels
   (int4 / int8 for MatMul and Gather, int8 static QDQ for Conv) and the KL divergence of the first answer
   token's distribution from fp32 is measured on calibration prompts. For the vision encoder this is our
   cheap stand-in for LRP-QViT's layer relevance: instead of propagating relevance backwards from the
   output (which needs gradients the torch-free runtime does not have), a layer's relevance is read at the
   same place LRP reads it, the model's output, as the change quantizing that layer alone causes there.
   Vision and language layers are thus ranked on one scale.
2. Order. From "everything at its lowest level", the next move is always the one-step promotion
   (int4 -> int8 -> fp32) with the largest sensitivity removed per byte added (a greedy knapsack), giving
   configurations c_0 (smallest) ... c_M (fp32), bytes increasing.
3. Bisection. Accuracy is measured (the real eval set, or agreement with fp32's greedy answers when the
   bundle has no eval set) at c_0 and then by bisection for the smallest k that meets the budget: accuracy
   >= budget x fp32 on the search questions AND on a disjoint confirmation set (the next `confirm_n`
   questions of the same seed). Picking the smallest point that passes one noisy estimate favours points
   that passed by luck (at n=300 a 1% budget is about one standard error); the second, independent check
   removes most of them. Every measured configuration is a point (bytes, cold TTFT, accuracy on the search
   questions); the non-dominated ones are the Pareto set, and the smallest accepted point is the answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from . import calib
from .graphs import Options, QuantError, allowed, estimate_bytes, weight_nodes

LADDERS = {"MatMul": ("int4", "int8", "fp32"), "Gather": ("int4", "int8", "fp32"), "Conv": ("int8-static", "fp32")}


def ladder(n) -> tuple[str, ...]:
    """The levels the search tries for a node, smallest first, ending at fp32."""
    return tuple(lv for lv in LADDERS[n.op] if lv == "fp32" or lv in allowed(n))


@dataclass
class Point:
    label: str
    k: int  # promotions applied (0 = smallest)
    bytes: int
    ttft_s: float
    accuracy: float
    levels: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> level -> node count
    pareto: bool = False
    confirm: float | None = None  # accuracy on the confirmation questions (measured when the search set passes)
    accepted: bool = False


@dataclass
class SearchResult:
    plan: dict[str, dict[str, str]]  # chosen: component -> node -> level
    labels: dict[str, str]
    points: list[Point]
    chosen: Point
    baseline: Point
    target: float
    metric: str
    sensitivity: list[dict]
    summary: dict


def _counts(plan):
    return {c: {lv: sum(1 for v in p.values() if v == lv) for lv in sorted(set(p.values()))} for c, p in plan.items()}


def search(vlm, graphs: dict[str, onnx.ModelProto], quantize_component: Callable[[str, dict], onnx.ModelProto],
           opts: Options, prompts: list[tuple], *, budget: float, dataset: str | None, eval_seed: int, eval_n: int,
           fixed: dict[str, dict[str, str]], progress, extra_bytes: int = 0, sens_n: int = 16,
           confirm_n: int | None = None) -> SearchResult:
    """Smallest configuration whose measured accuracy is >= budget x fp32 (see the module docstring).

    `fixed` holds the plans of components the user pinned (not searched)."""
    if not 0 < budget <= 1:
        raise QuantError(f"--budget must be in (0, 1], got {budget}")
    units = [(c, n) for c in graphs if c not in fixed for n in weight_nodes(graphs[c])]
    if not units:
        raise QuantError("nothing to search: every component is pinned or has no weight nodes")
    sens = sensitivity(vlm, units, quantize_component, prompts[:sens_n], progress)
    order = Order(units, sens, opts, fixed, list(graphs))
    bench = Bench(vlm, graphs, quantize_component, order, prompts, dataset, eval_seed, eval_n,
                  eval_n if confirm_n is None else confirm_n, extra_bytes, budget)
    bisect(bench, len(order.configs), progress)
    pts = pareto(list(bench.points.values()))
    chosen = min((p for p in pts if p.accepted), key=lambda p: p.bytes)
    plan = order.plan(chosen.k)
    table = [{"component": c, "node": name, "op": order.node[(c, name)].op, "level": lv, "kl": round(v, 6),
              "bytes_fp32": order.node[(c, name)].params * 4} for (c, name, lv), v in sens.items()]
    base = bench.points[len(order.configs) - 1]
    summary = {"budget": budget, "metric": bench.metric, "target": round(bench.target, 4), "fp32": base.accuracy,
               "eval": {"dataset": dataset or "agreement with fp32", "seed": eval_seed, "n": eval_n},
               "confirm": {"start": eval_n, "n": bench.confirm_n, "fp32": base.confirm,
                           "target": None if bench.confirm_target is None else round(bench.confirm_target, 4)},
               "sensitivity_prompts": min(sens_n, len(prompts)), "promotions": len(order.configs) - 1,
               "measured": len(bench.points),
               "chosen": {"k": chosen.k, "bytes": chosen.bytes, "accuracy": chosen.accuracy,
                          "confirm": chosen.confirm, "ttft_s": round(chosen.ttft_s, 5)}}
    return SearchResult(plan, _labels(plan, graphs), pts, chosen, base, bench.target, bench.metric, table, summary)


def sensitivity(vlm, units, quantize_component, prompts: list[tuple], progress) -> dict[tuple[str, str, str], float]:
    """KL of the first answer token's distribution from fp32 with one node at one lower level, for each."""
    ref = np.stack([calib.first_logits(vlm, im, q) for im, q, *_ in prompts])
    probes = [(c, n, lv) for c, n in units for lv in ladder(n)[:-1]]
    sens = {}
    for i, (c, n, lv) in enumerate(probes):
        progress("sensitivity", i, len(probes))
        v = calib.swap(vlm, {c: quantize_component(c, {n.name: lv}).SerializeToString()})
        sens[(c, n.name, lv)] = calib.kl(ref, np.stack([calib.first_logits(v, im, q) for im, q, *_ in prompts]))
    progress("sensitivity", len(probes), len(probes))
    return sens


class Order:
    """The greedy order of one-step promotions (int4 -> int8 -> fp32), largest sensitivity removed per byte
    added first: configs[0] is every node at its lowest level, configs[-1] all fp32."""

    def __init__(self, units, sens: dict, opts: Options, fixed: dict, components: list[str]):
        self.node = {(c, n.name): n for c, n in units}
        self.levels = {key: ladder(n) for key, n in self.node.items()}
        self.fixed, self.components = fixed, components
        step = {key: 0 for key in self.node}

        def err(key, i):
            lv = self.levels[key][i]
            return 0.0 if lv == "fp32" else sens[(key[0], key[1], lv)]

        def gain(key):
            i, lv = step[key], self.levels[key]
            added = estimate_bytes(self.node[key], lv[i + 1], opts) - estimate_bytes(self.node[key], lv[i], opts)
            return (err(key, i) - err(key, i + 1)) / max(added, 1.0)

        self.configs = [dict(step)]
        while any(step[k] < len(self.levels[k]) - 1 for k in step):
            best = max((k for k in step if step[k] < len(self.levels[k]) - 1), key=gain)
            step[best] += 1
            self.configs.append(dict(step))

    def plan(self, k: int) -> dict[str, dict[str, str]]:
        """Configuration k as component -> node -> level (fp32 nodes omitted), pinned components included."""
        plan = {c: dict(p) for c, p in self.fixed.items()}
        for (c, name), i in self.configs[k].items():
            lv = self.levels[(c, name)][i]
            plan.setdefault(c, {})
            if lv != "fp32":
                plan[c][name] = lv
        return {c: plan.get(c, {}) for c in self.components}


class Bench:
    """Measures configurations (bytes, cold TTFT, accuracy on the search questions) and accepts those that meet
    the budget there and on the confirmation questions."""

    def __init__(self, vlm, graphs, quantize_component, order: Order, prompts, dataset, eval_seed: int, eval_n: int,
                 confirm_n: int, extra_bytes: int, budget: float):
        self.vlm, self.graphs, self.quantize_component, self.order = vlm, graphs, quantize_component, order
        self.prompts, self.dataset, self.eval_seed, self.extra_bytes = prompts, dataset, eval_seed, extra_bytes
        self.confirm_n, self.budget = confirm_n, budget
        self.sets = {"search": (0, eval_n), "confirm": (eval_n, confirm_n)}  # (start, n) in the eval_seed stream
        self.metric = "accuracy" if dataset else "agreement"
        self.fp32_answers = {} if dataset else {
            s: calib.answers(vlm, calib.examples(eval_seed, n, start), max_tokens=8)
            for s, (start, n) in self.sets.items() if n}
        self.points: dict[int, Point] = {}
        self.swapped: dict[int, object] = {}
        self.target = self.confirm_target = None

    def score(self, v, which: str) -> float:
        start, n = self.sets[which]
        if self.dataset:
            from edgevlm.evaluate import evaluate

            return evaluate(v, self.dataset, self.eval_seed, n, start=start)["accuracy"]
        got = calib.answers(v, calib.examples(self.eval_seed, n, start), max_tokens=8)
        return float(np.mean([a == b for a, b in zip(got, self.fp32_answers[which])]))

    def measure(self, k: int, label: str) -> Point:
        if k in self.points:
            return self.points[k]
        plan = self.order.plan(k)
        models = {c: self.quantize_component(c, p) if p else self.graphs[c] for c, p in plan.items()}
        blobs = {c: m.SerializeToString() for c, m in models.items()}
        v = self.swapped[k] = calib.swap(self.vlm, blobs)
        p = self.points[k] = Point(label, k, sum(map(len, blobs.values())) + self.extra_bytes,
                                   calib.cold_ttft(v, self.prompts[:8]), self.score(v, "search"), _counts(plan))
        return p

    def baseline(self) -> Point:
        """fp32 (the last configuration): it sets the targets."""
        base = self.measure(len(self.order.configs) - 1, "fp32")
        self.target = self.budget * base.accuracy
        if self.confirm_n:
            base.confirm = self.score(self.swapped[base.k], "confirm")
            self.confirm_target = self.budget * base.confirm
        base.accepted = True
        self.swapped.pop(base.k, None)
        return base

    def accept(self, k: int, label: str) -> bool:
        p = self.measure(k, label)
        if p.accuracy >= self.target and self.confirm_n and p.confirm is None:
            p.confirm = self.score(self.swapped[k], "confirm")
        p.accepted = p.accuracy >= self.target and (not self.confirm_n or p.confirm >= self.confirm_target)
        self.swapped.pop(k, None)  # sessions of rejected / decided points are not needed again
        return p.accepted


def bisect(bench: Bench, n: int, progress) -> None:
    """The fp32 baseline, configs[0], then bisection for the smallest accepted k; a few more points along
    the order so that the Pareto set shows the trade-off."""
    total = 2 + int(np.ceil(np.log2(max(2, n))))
    progress("search", 0, total)
    bench.baseline()
    progress("search", 1, total)
    lo, hi = 0, n - 1  # invariant: hi is accepted
    if bench.accept(0, "c0"):
        hi = 0
    done = 2
    while hi - lo > 1:
        progress("search", done, total)
        mid = (lo + hi) // 2
        if bench.accept(mid, f"c{mid}"):
            hi = mid
        else:
            lo = mid
        done += 1
    for f in (1 / 8, 1 / 4, 1 / 2):
        progress("search", done, total + 3)
        k = int(round(f * (n - 1)))
        bench.accept(k, f"c{k}")
        done += 1
    progress("search", total + 3, total + 3)


def pareto(points: list[Point]) -> list[Point]:
    """The points by bytes, each marked whether no other is at least as small, accurate and fast."""
    pts = sorted(points, key=lambda p: p.bytes)
    for p in pts:
        p.pareto = not any(q is not p and q.bytes <= p.bytes and q.accuracy >= p.accuracy and q.ttft_s <= p.ttft_s
                           and (q.bytes, q.accuracy, q.ttft_s) != (p.bytes, p.accuracy, p.ttft_s) for q in pts)
    return pts


def _labels(plan: dict, graphs: dict) -> dict[str, str]:
    labels = {}
    for c, p in plan.items():
        lvs = set(p.values())
        n_nodes = len(weight_nodes(graphs[c]))
        labels[c] = "fp32" if not lvs else (lvs.pop() if len(lvs) == 1 and len(p) == n_nodes else "mixed")
    return labels


def as_json(result: SearchResult) -> dict:
    return {"summary": result.summary, "points": [dataclasses.asdict(p) for p in result.points],
            "sensitivity": sorted(result.sensitivity, key=lambda r: -r["kl"])}
