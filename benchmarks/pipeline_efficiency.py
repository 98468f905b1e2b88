"""Pipeline efficiency: images/s of a full k3batch run (steady state, model loaded) divided
by images/s of a bare in-process loop calling the same generation code with the same model,
batch size and settings. Target >= 0.85 on a 2-core machine.

The pipeline's steady-state rate is marginal: two runs of different lengths, (N_long -
N_short) / (t_long - t_short), which cancels Ray start-up, actor start and model load. The
bare loop runs before and after the pipeline runs; their mean is the reference.

The model is the benchmark-sized random one (`make_tiny(size="bench")`: the tiny
architecture widened so that a batch of 4 at 128x128 and 8 steps takes about a second here,
in few large operations like the real model's); `--model tiny` uses the tests' model, whose
batch at 192x192 is the same second spent in many tiny operations. The run also reads the
generation actor's own seconds per batch (`generate_seconds` in the metadata): the part of
the loss that is the model running slower inside the pipeline (CPU taken by Ray's processes
and the other stages) rather than waiting between batches.

    .venv/bin/python benchmarks/pipeline_efficiency.py           # ~3 min on 2 cores
    .venv/bin/python benchmarks/pipeline_efficiency.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import job, prompt_table, tiny_model_dir  # noqa: E402


def bare_loop(model_dir: str, n: int, batch: int, size: int, steps: int, threads: int) -> float:
    import torch

    from k3batch.model.kandinsky3 import Kandinsky3, Request
    from k3batch.rows import derive_seed

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
    start = time.perf_counter()
    for i in range(0, n, batch):
        model.generate(requests[i : i + batch])
    return n / (time.perf_counter() - start)


def pipeline_seconds(
    model_dir: str, tmp: str, n: int, batch: int, size: int, steps: int, threads: int
) -> tuple[float, float]:
    """(wall seconds of a whole run of `n` rows, the actor's mean seconds per batch)."""
    import pyarrow.dataset as pads

    from k3batch.runner import run_job

    cfg = job(
        prompt_table(f"{tmp}/p{n}.parquet", n),
        f"{tmp}/out{n}",
        model_dir,
        size=size,
        steps=steps,
        batch_size=batch,
        num_cpus_per_actor=1,
        torch_threads=threads,
        write_num_cpus=0.25,
    )
    start = time.perf_counter()
    result = run_job(cfg)
    seconds = time.perf_counter() - start
    assert result.ok and result.run["ok"] == n, result.run
    records = pads.dataset(f"{tmp}/out{n}/metadata", format="parquet").to_table()
    per_row = records.column("generate_seconds").to_pylist()
    return seconds, sum(per_row) / len(per_row) * batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--size", type=int, default=None, help="default: bench 128, tiny 192")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    size = args.size or (128 if args.model == "bench" else 192)
    short, long = (4, 12) if args.quick else (16, 64)
    run = (args.batch, size, args.steps, args.threads)

    import ray

    model_dir = tiny_model_dir(args.model)
    tmp = tempfile.mkdtemp(prefix="k3batch-eff-")
    bare1 = bare_loop(model_dir, long - short, *run)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    # The same bare loop inside a Ray actor, with Ray started and idle: what Ray's own
    # processes cost the model before any pipeline runs.
    here = os.path.dirname(os.path.abspath(__file__))
    in_ray = ray.get(
        ray.remote(num_cpus=1)(bare_loop)
        .options(runtime_env={"env_vars": {"PYTHONPATH": here}})
        .remote(model_dir, long - short, *run)
    )
    pipeline_seconds(model_dir, tmp, short, *run)  # warm caches
    t_short, _ = pipeline_seconds(model_dir, tmp, short, *run)
    t_long, in_actor = pipeline_seconds(model_dir, tmp, long, *run)
    ray.shutdown()
    bare2 = bare_loop(model_dir, long - short, *run)

    bare = (bare1 + bare2) / 2
    pipe = (long - short) / (t_long - t_short)
    bare_batch, pipe_batch = args.batch / bare, args.batch / pipe
    print(
        f"\nPipeline efficiency: {args.model} model, {size}x{size}, {args.steps} steps, "
        f"batch {args.batch}, {args.threads} torch threads, {os.cpu_count()} CPUs"
    )
    print(
        f"bare loop        {bare:7.3f} images/s  (before {bare1:.3f}, after {bare2:.3f}; "
        f"{bare_batch:.2f} s per batch)"
    )
    print(
        f"in a Ray actor   {in_ray:7.3f} images/s  (the bare loop as a Ray task, Ray idle: "
        f"{in_ray / bare:.3f} of the bare loop)"
    )
    print(
        f"k3batch run      {pipe:7.3f} images/s  (marginal: {long - short} images in "
        f"{t_long - t_short:.1f} s; runs of {short} and {long} rows took {t_short:.1f} s "
        f"and {t_long:.1f} s; {pipe_batch:.2f} s per batch)"
    )
    print(
        f"in the actor     {in_actor:7.2f} s per batch in the model ({in_actor / bare_batch:.2f}x "
        f"the bare loop's), {pipe_batch - in_actor:.2f} s per batch outside it"
    )
    print(
        f"efficiency       {pipe / bare:7.3f}  (target >= 0.85; {pipe / in_ray:.3f} of the "
        "bare loop run inside Ray)"
    )


if __name__ == "__main__":
    main()
