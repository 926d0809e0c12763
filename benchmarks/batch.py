"""Throughput and memory of `edgevlm batch`: the local process pool and Ray Data (a local instance), 1 and 2 workers.

    python benchmarks/batch.py [--rows 1000] [--repeats 3]

Each run is the command itself in a fresh process (`edgevlm batch --json` on demo images written as PNG files,
the embedded demo bundle, greedy), so a Ray run pays for `ray.init` and its actor pool as a user does. The
configurations take turns, `--repeats` rounds; medians are reported. Figures: rows/s over the whole command
(startup included), steady rows/s (rows the workers finished between their first and last row: startup left
out), seconds until the command had its first results, CPU ms per row (of the worker thread that ran the model:
unchanged by other jobs on the cores), each worker's peak RSS (as the worker reports it), and the peak RSS of
the command's whole process tree (for Ray: its GCS, raylet and other daemons too), sampled from /proc. Every run's answers are checked against a plain
single-process loop. Writes JSON, a markdown table and a PNG to benchmarks/results (named by the CPU's ISA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def make_rows(root: Path, n: int) -> list[dict]:
    from edgevlm.data import shapes

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(shapes.examples(shapes.TEST_SEED, n)):
        ex.image.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prompt": ex.question})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def reference(root: Path, rows: list[dict]) -> list[str]:
    import edgevlm

    vlm = edgevlm.load()
    return [vlm.generate(str(root / r["image"]), r["prompt"]) for r in rows]


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (from /proc; 0 off Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(frontier)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_once(root: Path, engine: str, workers: int, out: Path) -> dict:
    """One `edgevlm batch` run in a fresh process -> its JSON summary + the process tree's peak RSS."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edgevlm.apps.cli", "batch", "--input", str(root / "rows.jsonl"), "--output",
           str(out), "--engine", engine, "--workers", str(workers), "--json"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample():
        while job.poll() is None:
            peak[0] = max(peak[0], _tree_rss(job.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = job.communicate()
    sampler.join()
    if job.returncode != 0:
        raise SystemExit(f"{engine} x{workers} failed (exit {job.returncode})")
    return {**anonymous(json.loads(stdout.strip().splitlines()[-1])), "tree_peak_rss_bytes": peak[0]}


def anonymous(summary: dict) -> dict:
    """The command's summary without this machine's paths and host name (workers numbered instead)."""
    out = {k: v for k, v in summary.items() if k not in ("input", "output")}
    out["worker_peak_rss_bytes"] = {f"worker {k}": v for k, v in enumerate(summary["worker_peak_rss_bytes"].values())}
    return out


def identical(out: Path, ref: list[str]) -> bool:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return len(rows) == len(ref) and all(r["answer"] == ref[r["id"]] for r in rows)


def summarize(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    worker = statistics.median(max(r["worker_peak_rss_bytes"].values()) for r in runs)
    return {"rows_per_s": med("rows_per_s"), "steady_rows_per_s": med("steady_rows_per_s"),
            "first_result_s": med("first_result_s"), "seconds": med("seconds"),
            "cpu_ms_per_row": round(1000 * med("cpu_s_per_row"), 2),
            "worker_peak_rss_mb": round(worker / 2**20), "tree_peak_rss_mb": round(med("tree_peak_rss_bytes") / 2**20),
            "identical": all(r["identical"] for r in runs), "runs": runs}


def write(results: dict, name: str) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"`edgevlm batch` on {results['rows']} demo images (embedded demo bundle, greedy), CPU {results['cpu']} "
             f"(ISA {results['isa']}, {results['cores']} cores), median of {results['repeats']} runs taking turns; "
             "each run is the command in a fresh process, startup included. Load average (1, 5, 15 min) at the "
             f"start {results['load_average_at_start']}, at the end {results['load_average_at_end']}: other jobs "
             "shared the cores.", "",
             "| engine | workers | rows/s (whole run) | rows/s (steady) | first results (s) | CPU ms per row "
             "| peak RSS per worker (MB) | peak RSS of all processes (MB) | answers = single process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in results["configs"].items():
        engine, workers = key.split(" x")
        lines.append(f"| {engine} | {workers} | {s['rows_per_s']:.1f} | {s['steady_rows_per_s']:.1f} | "
                     f"{s['first_result_s']:.1f} | {s['cpu_ms_per_row']:.1f} | {s['worker_peak_rss_mb']} | {s['tree_peak_rss_mb']} | "
                     f"{'yes' if s['identical'] else 'NO'} |")
    lines += ["", "CPU ms per row: the CPU time of the worker thread that ran the model, per row (other jobs on the "
              "cores do not change it; 1000 / it is the rows/s one uncontended core would give). Wall-clock rates "
              "depend on the cores' other load while each run ran."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(results, out / f"{name}.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["configs"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(keys))
    ax1.bar([x - 0.2 for x in xs], [results["configs"][k]["rows_per_s"] for k in keys], 0.4, label="whole run")
    ax1.bar([x + 0.2 for x in xs], [results["configs"][k]["steady_rows_per_s"] for k in keys], 0.4, label="steady")
    ax1.set_xticks(list(xs), keys)
    ax1.set_ylabel("rows/s")
    ax1.legend()
    ax1.set_title(f"throughput, {results['rows']} rows ({results['isa']})")
    ax2.bar([x - 0.2 for x in xs], [results["configs"][k]["worker_peak_rss_mb"] for k in keys], 0.4, label="per worker")
    ax2.bar([x + 0.2 for x in xs], [results["configs"][k]["tree_peak_rss_mb"] for k in keys], 0.4,
            label="all processes")
    ax2.set_xticks(list(xs), keys)
    ax2.set_ylabel("peak RSS (MB)")
    ax2.legend()
    ax2.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="batch")
    args = p.parse_args()
    from edgevlm.cpu import isa

    load0 = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine share its cores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = make_rows(root, args.rows)
        ref = reference(root, rows)
        runs: dict[str, list[dict]] = {f"{e} x{w}": [] for e, w in CONFIGS}
        for k in range(args.repeats):
            order = CONFIGS[k % len(CONFIGS):] + CONFIGS[:k % len(CONFIGS)]  # a different one goes first each round
            for engine, workers in order:
                out = root / f"out-{engine}-{workers}.jsonl"
                r = run_once(root, engine, workers, out)
                r["identical"] = identical(out, ref)
                runs[f"{engine} x{workers}"].append(r)
                print(f"round {k + 1}: {engine} x{workers}: {r['rows_per_s']:.1f} rows/s "
                      f"(steady {r['steady_rows_per_s']:.1f}), identical={r['identical']}", flush=True)
    results = {"load_average_at_end": [round(x, 2) for x in os.getloadavg()], "load_average_at_start": load0,
               "rows": args.rows, "repeats": args.repeats, "isa": isa(), "cpu": cpu_name(), "cores": os.cpu_count(), "configs": {k: summarize(v) for k, v in runs.items()}}
    write(results, args.name)
    print((HERE / "results" / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
