"""Pipeline efficiency: images/s of a full k3batch run (steady state, model loaded) divided
by images/s of a bare in-process loop calling the same generation code with the same model,
batch size and settings. Target >= 0.85 on a 2-core machine.

Two CPU layouts, each measured against a bare twin of the same layout, in one run:

A. one actor with a torch thread per core, against the bare loop with as many threads;
B. one single-thread actor per core (the CPU layout docs/running-jobs.md's Scaling out recommends),
   against as many single-thread bare loops in processes of their own, running at once.

The headline is the faster layout's k3batch rate over the bare in-process loop (A's twin):
what a user gets from k3batch against the plain script; A and B say what the pipeline
itself costs in each layout.

The pipeline's steady-state rate is marginal: two runs of different lengths, (N_long -
N_short) / (t_long - t_short), which cancels Ray start-up, actor start and model load. The
bare loops run before and after the pipeline runs; their mean is the reference (this VM's
speed drifts).

The model is the benchmark-sized random one (`make_tiny(size="bench")`: the tiny
architecture widened so that a batch of 4 at 128x128 and 8 steps takes about a second here,
in few large operations like the real model's); `--model tiny` uses the tests' model, whose
batch at 192x192 is the same second spent in many tiny operations. The run also reads the
generation actors' own seconds per batch (`generate_seconds` in the metadata): the part of
the loss that is the model running slower inside the pipeline (CPU taken by Ray's processes
and the other stages) rather than waiting between batches.

    .venv/bin/python benchmarks/pipeline_efficiency.py           # ~6 min on 2 cores
    .venv/bin/python benchmarks/pipeline_efficiency.py --quick   # a quick run
    .venv/bin/python benchmarks/pipeline_efficiency.py --smoke --model tiny --size 64 --steps 1  # CI
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from common import job, prompt_table, tiny_model_dir  # noqa: E402


def bare_loop(
    model_dir: str, n: int, batch: int, size: int, steps: int, threads: int, barrier=None
) -> float:
    """Images/s of `model.generate` in a plain loop; `barrier`: wait there after warm-up
    (several loops at once start timing together)."""
    import torch

    from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
    from k3batch.rows.seeds import derive_seed

    torch.set_num_threads(threads)
    model = Kandinsky3.from_pretrained(
        model_dir,
        dtype={"unet": "float32", "text_encoder": "float32", "movq": "float32"},
        device="cpu",
    )
    requests = [
        Request(f"prompt {i}", None, derive_seed(0, str(i)), size, size, steps, 3.0)
        for i in range(n)
    ]
    model.generate(requests[:batch])  # warm-up
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for i in range(0, n, batch):
        model.generate(requests[i : i + batch])
    return n / (time.perf_counter() - start)


def _bare_worker(args) -> float:
    return bare_loop(*args)


def bare_processes(model_dir: str, n: int, run: tuple, workers: int) -> float:
    """Images/s of `workers` bare loops at once, each in a process of its own with `n /
    workers` images: the same layout as that many single-thread actors, without Ray."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        barrier = manager.Barrier(workers)
        jobs = [(model_dir, n // workers, *run, barrier)] * workers
        return sum(pool.map(_bare_worker, jobs))


def pipeline_seconds(
    model_dir: str, tmp: str, n: int, actors: int, batch: int, size: int, steps: int, threads: int
) -> tuple[float, float]:
    """(wall seconds of a whole run of `n` rows, the actors' mean seconds per batch)."""
    import pyarrow.dataset as pads

    from k3batch.job.run import run_job

    out = f"{tmp}/out{n}-{actors}"
    cfg = job(
        prompt_table(f"{tmp}/p{n}.parquet", n),
        out,
        model_dir,
        size=size,
        steps=steps,
        batch_size=batch,
        num_actors=actors,
        num_cpus_per_actor=1,
        torch_threads=threads,
        write_num_cpus=0.25,
    )
    start = time.perf_counter()
    result = run_job(cfg)
    seconds = time.perf_counter() - start
    assert result.ok and result.run["ok"] == n, result.run
    records = pads.dataset(f"{out}/metadata", format="parquet").to_table()
    per_row = records.column("generate_seconds").to_pylist()
    return seconds, sum(per_row) / len(per_row) * batch


def marginal(
    model_dir: str, tmp: str, short: int, long: int, actors: int, run: tuple, warm: bool = True
):
    """(images/s of a k3batch run in steady state, the actors' seconds per batch, the two
    runs' seconds): two runs of different lengths, (long - short) / (t_long - t_short),
    which cancels Ray start-up, actor start and model load. `warm`: a first run to warm
    caches. A smoke run (not `warm`) makes the long run only: its figures mean nothing
    anyway, and it reports no rate."""
    if not warm:
        t_long, in_actor = pipeline_seconds(model_dir, tmp, long, actors, *run)
        return None, in_actor, 0.0, t_long
    pipeline_seconds(model_dir, tmp, short, actors, *run)
    t_short, _ = pipeline_seconds(model_dir, tmp, short, actors, *run)
    t_long, in_actor = pipeline_seconds(model_dir, tmp, long, actors, *run)
    # A long run no slower than the short one means noise swamped the rows between them
    # (a smoke run's few tiny rows): no rate, rather than a negative or huge one.
    rate = (long - short) / (t_long - t_short) if t_long > t_short else None
    return rate, in_actor, t_short, t_long


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI's check that it runs: --quick with one pipeline run per layout (no rate) "
        "and no bare loops after the pipeline runs (figures not comparable)",
    )
    parser.add_argument("--model", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--size", type=int, default=None, help="default: bench 128, tiny 192")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    size = args.size or (128 if args.model == "bench" else 192)
    short, long = (cpus * 2, cpus * 6) if args.quick or args.smoke else (16, 64)
    warm = not args.smoke
    n = long - short
    shared = (args.batch, size, args.steps)
    one = (*shared, cpus)  # one actor, every core's thread
    per_core = (*shared, 1)  # one single-thread actor per core

    import ray

    model_dir = tiny_model_dir(args.model)
    tmp = tempfile.mkdtemp(prefix="k3batch-eff-")
    # Bare loops before and after the pipeline runs; their mean is the reference (the
    # machine's speed drifts).
    bare_a = [bare_loop(model_dir, n, *one)]
    bare_b = [bare_processes(model_dir, n, per_core, cpus)]
    # A smoke run (no figures) starts Ray once, with layout B's CPUs (below) for both.
    ray.init(num_cpus=cpus + (not warm), include_dashboard=False, logging_level="ERROR")
    # The same bare loop inside a Ray actor, with Ray started and idle: what Ray's own
    # processes cost the model before any pipeline runs.
    here = os.path.dirname(os.path.abspath(__file__))
    in_ray = ray.get(
        ray.remote(num_cpus=1)(bare_loop)
        .options(runtime_env={"env_vars": {"PYTHONPATH": here}})
        .remote(model_dir, n, *one)
    )
    pipe_a, actor_a, short_a, long_a = marginal(model_dir, tmp, short, long, 1, one, warm)
    if warm:
        ray.shutdown()
        # One actor per core leaves no CPU for Ray Data's tasks: start Ray as `k3batch run`
        # would (ray_start.budget.local_num_cpus), the actors' CPUs plus one.
        ray.init(num_cpus=cpus + 1, include_dashboard=False, logging_level="ERROR")
    pipe_b, actor_b, short_b, long_b = marginal(model_dir, tmp, short, long, cpus, per_core, warm)
    ray.shutdown()
    if warm:
        bare_a.append(bare_loop(model_dir, n, *one))
        bare_b.append(bare_processes(model_dir, n, per_core, cpus))
    else:
        bare_a.append(bare_a[0])
        bare_b.append(bare_b[0])
    bare, bare_many = sum(bare_a) / 2, sum(bare_b) / 2

    print(
        f"\nPipeline efficiency: {args.model} model, {size}x{size}, {args.steps} steps, "
        f"batch {args.batch}, {cpus} CPUs; marginal rate of runs of {short} and {long} rows"
    )
    print(f"\nA. one actor with {cpus} torch threads (num_actors 1, torch_threads {cpus})")
    print(
        f"bare loop        {bare:7.3f} images/s  (before {bare_a[0]:.3f}, after "
        f"{bare_a[1]:.3f}; {args.batch / bare:.2f} s per batch)"
    )
    print(
        f"in a Ray actor   {in_ray:7.3f} images/s  (the bare loop as a Ray task, Ray idle: "
        f"{in_ray / bare:.3f} of the bare loop)"
    )
    print(
        f"k3batch run      {rate(pipe_a)} images/s  ({short_a:.1f} s and {long_a:.1f} s; "
        f"{actor_a:.2f} s per batch in the model: "
        f"{actor_a / (args.batch / bare):.2f}x the bare loop's)"
    )
    print(f"efficiency A     {ratio(pipe_a, bare)}  (k3batch / bare loop, same layout)")
    print(f"\nB. {cpus} single-thread actors (num_actors {cpus}, torch_threads 1)")
    print(
        f"bare processes   {bare_many:7.3f} images/s  ({cpus} single-thread bare loops at once; "
        f"before {bare_b[0]:.3f}, after {bare_b[1]:.3f})"
    )
    print(
        f"k3batch run      {rate(pipe_b)} images/s  ({short_b:.1f} s and {long_b:.1f} s; "
        f"{actor_b:.2f} s per batch in the model, {actor_b / (args.batch * cpus / bare_many):.2f}x "
        "the bare processes')"
    )
    print(f"efficiency B     {ratio(pipe_b, bare_many)}  (k3batch / bare processes, same layout)")
    measured = {name: r for name, r in (("A", pipe_a), ("B", pipe_b)) if r is not None}
    best = max(measured, key=measured.get) if measured else None
    print(
        f"\nefficiency       {ratio(measured.get(best), bare)}  (target >= 0.85: k3batch's "
        f"faster layout, {best or 'none measured'}, / the bare in-process loop)"
    )


def rate(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else "    n/a"


def ratio(value: float | None, bare: float) -> str:
    """n/a where the marginal rate was lost in noise (see `marginal`)."""
    return f"{value / bare:7.3f}" if value is not None else "    n/a"


if __name__ == "__main__":
    main()
    # Every figure is printed; skip the interpreter's teardown, where the Ray and torch
    # threads this process started once segfaulted (CI: exit -11 after the last line).
    sys.stdout.flush()
    os._exit(0)
