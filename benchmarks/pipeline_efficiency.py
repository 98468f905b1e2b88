"""Pipeline efficiency: images/s of a full k3batch run (steady state, model loaded) divided
by images/s of a bare in-process loop calling the same generation code with the same model,
batch size and settings. Target >= 0.85 on a 2-core machine.

The pipeline's steady-state rate is marginal: two runs of different lengths, (N_long -
N_short) / (t_long - t_short), which cancels Ray start-up, actor start and model load. The
bare loop runs before and after the pipeline runs; their mean is the reference.

    .venv/bin/python benchmarks/pipeline_efficiency.py           # ~4 min on 2 cores
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
) -> float:
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
    assert result.ok and result.run["ok"] == n, result.run
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    short, long = (4, 12) if args.quick else (16, 64)

    import ray

    model_dir = tiny_model_dir()
    tmp = tempfile.mkdtemp(prefix="k3batch-eff-")
    bare1 = bare_loop(model_dir, long - short, args.batch, args.size, args.steps, args.threads)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    pipeline_seconds(
        model_dir, tmp, short, args.batch, args.size, args.steps, args.threads
    )  # warm caches
    t_short = pipeline_seconds(
        model_dir, tmp, short, args.batch, args.size, args.steps, args.threads
    )
    t_long = pipeline_seconds(model_dir, tmp, long, args.batch, args.size, args.steps, args.threads)
    ray.shutdown()
    bare2 = bare_loop(model_dir, long - short, args.batch, args.size, args.steps, args.threads)

    bare = (bare1 + bare2) / 2
    pipe = (long - short) / (t_long - t_short)
    print(
        f"\nPipeline efficiency: tiny model, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
        f"{args.threads} torch threads, {os.cpu_count()} CPUs"
    )
    print(
        f"bare loop        {bare:7.3f} images/s  (before {bare1:.3f}, after {bare2:.3f}; "
        f"{args.batch / bare:.2f} s per batch)"
    )
    print(
        f"k3batch run      {pipe:7.3f} images/s  (marginal: {long - short} images in "
        f"{t_long - t_short:.1f} s; runs of {short} and {long} rows took {t_short:.1f} s and {t_long:.1f} s)"
    )
    print(f"efficiency       {pipe / bare:7.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
