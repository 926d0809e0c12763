"""The engines behind `edgevlm batch` and `edgevlm eval --dataset FILE`: rows of (image path, prompt) -> answers.

    answer_rows(vlm, tasks, gen)   the work of every engine: one model, its rows one after another
    run_local(tasks, ...)          a process pool on this machine, one model per process, one thread each
    run_ray(tasks, ...)            Ray Data `map_batches` over an actor pool, one model per actor
    run(tasks, options, engine)    either; yields batches of results as they complete (in any order)

Models load with one intra-op thread (N processes of one thread beat one process of N threads, and N
processes of N threads oversubscribe the cores) and no image or prefix cache (distinct images never hit).
Tasks carry image paths, not decoded images: a worker reads its own files, so paths must resolve there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Iterator

from edgevlm.errors import ArgumentError, BackendError, ImageError

from .common import requires

Task = tuple  # (index into the input rows, image path, prompt)
ENGINES = ("local", "ray")


def _stage_keys() -> list[str]:
    # `<stage>_s` for every stage the runtime times, read off a Response's own profile record
    from edgevlm import Response

    probe = Response(text="", token=0, finish_reason=None, ttft_s=0.0).profile
    return [k for k in probe if k.endswith("_s") and k != "ttft_s"]


STAGE_KEYS = _stage_keys()
# the fields each output row gets (pyarrow type names for a Parquet output)
RESULT_TYPES = {"answer": "string", "finish_reason": "string", "error": "string", "ttft_s": "double",
                **{k: "double" for k in STAGE_KEYS}, "prompt_tokens": "int64", "generated_tokens": "int64",
                "total_s": "double"}


@dataclass(frozen=True)
class Options:
    """What every row is generated with: the bundle, sampling, the image-token budget."""

    bundle: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # each row's sampler is seeded with it: a row's answer does not depend on its worker
    stop: tuple[str, ...] = ()
    max_image_tokens: int | None = None
    response_format: str | None = None  # JSON text of a response_format (plain data: it travels to the workers)

    def generation(self) -> dict:
        d = asdict(self)
        del d["bundle"]
        d["stop"] = list(self.stop) or None
        d["response_format"] = json.loads(self.response_format) if self.response_format else None
        return d


def load_model(bundle: str | None):
    """A model for one worker: one intra-op thread, image and prefix caches off."""
    import edgevlm

    return edgevlm.load(bundle, threads=1, cache_bytes={"image_bytes": 0, "prefix_bytes": 0})


def _peak_rss() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def answer_one(vlm, image, prompt, gen: dict) -> dict:
    """One row's result fields; a row that fails gets its error (type: message) and nulls, and the job goes on."""
    t0 = time.perf_counter()
    try:
        if not isinstance(image, str) or not image:
            raise ImageError("the row has no image path")
        if not isinstance(prompt, str) or not prompt:
            raise ArgumentError("the row has no prompt (give it one, or pass --prompt)")
        parts, last = [], None
        for r in vlm.stream(image, prompt, **gen):
            parts.append(r.text)
            last = r
        profile = last.profile
        return {"answer": "".join(parts), "finish_reason": last.finish_reason, "error": None,
                "ttft_s": last.ttft_s, **{k: profile[k] for k in STAGE_KEYS}, "prompt_tokens": last.prompt_tokens,
                "generated_tokens": last.generated_tokens, "total_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 -- any failure is this row's, reported in its output row
        return {**{k: None for k in RESULT_TYPES}, "error": f"{type(e).__name__}: {e}",
                "total_s": time.perf_counter() - t0}


def answer_rows(vlm, tasks: list[Task], gen: dict) -> list[dict]:
    """Results of tasks: {"_i": row index, result fields..., "_t": when it was done (epoch seconds), "_cpu": CPU
    seconds it took (of this thread: the model runs on one), "_worker": host:pid, "_rss": peak bytes}."""
    out = []
    for i, image, prompt in tasks:
        cpu = time.thread_time()
        r = answer_one(vlm, image, prompt, gen)
        out.append({"_i": i, **r, "_cpu": time.thread_time() - cpu, "_t": time.time()})
    meta = {"_worker": f"{socket.gethostname()}:{os.getpid()}", "_rss": _peak_rss()}
    return [{**r, **meta} for r in out]


def _chunks(tasks: list[Task], size: int) -> Iterator[list[Task]]:
    for k in range(0, len(tasks), size):
        yield tasks[k:k + size]


# ---------------------------------------------------------------- local: a process pool

_VLM = None  # the pool process's model
_LOAD_ERROR: Exception | None = None


def _init_worker(bundle: str | None) -> None:
    global _VLM, _LOAD_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    try:
        _VLM = load_model(bundle)
    except Exception as e:  # noqa: BLE001 -- handed to the parent by the first task, which raises it there
        _LOAD_ERROR = e


def _work(tasks: list[Task], gen: dict) -> list[dict]:
    if _LOAD_ERROR is not None:
        raise _LOAD_ERROR
    return answer_rows(_VLM, tasks, gen)


def run_local(tasks: list[Task], options: Options, workers: int, batch_size: int) -> Iterator[list[dict]]:
    """Batches of results from a pool of `workers` processes (spawned: no runtime state is forked)."""
    gen, chunks = options.generation(), _chunks(tasks, batch_size)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(options.bundle,)) as pool:
        pending: set = set()
        try:
            while True:
                while len(pending) < 2 * workers and (chunk := next(chunks, None)) is not None:
                    pending.add(pool.submit(_work, chunk, gen))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


# ---------------------------------------------------------------- ray: Ray Data over an actor pool

class _Actor:
    """A Ray Data callable class: the model is loaded once per actor, in __init__."""

    def __init__(self, bundle: str | None, gen: dict):
        self.vlm, self.gen = load_model(bundle), gen

    def __call__(self, batch: dict) -> dict:  # {"i", "image", "prompt"} -> {"result": one JSON per row}
        import numpy as np

        tasks = list(zip(batch["i"].tolist(), batch["image"].tolist(), batch["prompt"].tolist()))
        return {"result": np.array([json.dumps(r) for r in answer_rows(self.vlm, tasks, self.gen)], dtype=object)}


def _ray_init(address: str | None, workers: int | None) -> bool:
    """Connect to (address) or start (None) a Ray instance unless this process has one; True if we did."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    local = address is None and not os.environ.get("RAY_ADDRESS")  # else Ray joins a running cluster
    kwargs = {"num_cpus": workers or os.cpu_count()} if local else {}
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **kwargs)
    return True


def _quiet_ray_data() -> None:
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the command draws its own
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def run_ray(tasks: list[Task], options: Options, workers: int | None, batch_size: int,
            address: str | None = None) -> Iterator[list[dict]]:
    """Batches of results from Ray Data: `map_batches` over ActorPoolStrategy(size=workers) actors of one CPU
    each (workers=None: every CPU of the cluster)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    started = _ray_init(address, workers)
    try:
        _quiet_ray_data()
        blocks = -(-len(tasks) // batch_size)
        size = min(workers or max(1, int(ray.cluster_resources().get("CPU", 1))), blocks)
        items = [{"i": i, "image": image, "prompt": prompt} for i, image, prompt in tasks]
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(_Actor, fn_constructor_kwargs={"bundle": options.bundle, "gen": options.generation()},
                            compute=ActorPoolStrategy(size=size), num_cpus=1, batch_size=batch_size,
                            batch_format="numpy")
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield [json.loads(s) for s in batch["result"]]
        except ray.exceptions.RayError as e:
            raise BackendError(f"the Ray job failed: {_first_line(e)}") from None
    finally:
        if started:
            ray.shutdown()


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    errs = [s for s in lines if "Error:" in s]  # the innermost cause Ray quotes, e.g. "BundleError: ..."
    return (errs[-1] if errs else lines[0] if lines else type(e).__name__)[:500]


def run(tasks: list[Task], options: Options, engine: str = "local", workers: int | None = None,
        batch_size: int = 32, address: str | None = None) -> Iterator[list[dict]]:
    """Batches of results ({"_i": row index, ...}) of every task, on the chosen engine."""
    if engine not in ENGINES:
        raise ArgumentError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers < 1 or batch_size < 1:
        raise ArgumentError("--workers and --batch-size must be at least 1")
    if not tasks:
        return iter(())
    if engine == "ray":
        requires("batch --engine ray", "ray")  # (the commands check first, naming themselves)
        return run_ray(tasks, options, workers, batch_size, address)
    if address is not None:
        raise ArgumentError("--ray-address needs --engine ray")
    chunks = -(-len(tasks) // batch_size)  # no more workers than there are chunks of work: each loads a model
    return run_local(tasks, options, min(workers or os.cpu_count() or 1, chunks), batch_size)
