"""How many steps each `generation.scheduler` needs to land near the reference sampler at 50.

The reference sampler is DDIM with eta=1: ancestral, it adds fresh noise at every step, so
a deterministic solver (DPM-Solver++, UniPC, Euler) started from the same seed does not
converge to the same image as steps grow: the two sample the same distribution along
different paths. So the distance used is between distributions, on the final latents
(float32, before MoVQ decode) of `seeds` rows per prompt:

- `moments`: sqrt(mean over prompts and latent positions of (delta mean)^2 + (delta std)^2),
  mean and std taken over the seeds, solver at N steps against the reference at 50 steps;
- its yardstick, `floor`: the same distance between the reference at 50 steps on two
  disjoint seed sets (what sampling noise alone gives at this number of seeds);
- `per_seed`: latent RMSE per row against the reference at 50 steps, same seed (shown to
  make the point above: it stays at the distance between two different seeds);
- `self`: latent RMSE per row against the same solver at `--converged` steps (the solver's
  own discretisation error, which does fall with steps).

A scheduler's `needed` steps: the fewest steps tried from which every larger count tried has
its `moments` distance within `--tolerance` x `floor` (one count that happens to land inside
would be sampling noise). Random weights (the tiny or bench checkpoint of
`k3batch make-tiny`) make the figures indicative only: a trained model's trajectories are
smoother than a random UNet's.

    python benchmarks/scheduler_steps.py --json steps.json           # tiny model, CPU, minutes
    python benchmarks/scheduler_steps.py --model bench --seeds 8     # the bench model (slower)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import FP32, tiny_model_dir  # noqa: E402
from benchmarks.gpu_bench import PROMPTS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "bench"], default="tiny")
    p.add_argument("--schedulers", default="dpmsolver++,unipc,euler")
    p.add_argument("--steps", default="5,8,10,15,20,30,50", help="step counts tried")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--seeds", type=int, default=16, help="rows per prompt")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--converged", type=int, default=100, help="steps of the `self` yardstick")
    p.add_argument("--tolerance", type=float, default=1.25, help="x floor")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.schedulers = args.schedulers.split(",")
    args.steps = [int(s) for s in args.steps.split(",")]
    return args


def moments_distance(a, b) -> float:
    """a, b: [prompts, seeds, C, H, W] latents."""
    dm = a.mean(dim=1) - b.mean(dim=1)
    ds = a.std(dim=1) - b.std(dim=1)
    return float((dm.pow(2).mean() + ds.pow(2).mean()).sqrt())


def rmse(a, b) -> list[float]:
    """Per row, a, b: [prompts, seeds, ...]."""
    return (a - b).pow(2).flatten(2).mean(-1).sqrt().flatten().tolist()


def needed_steps(rows: list[dict], limit: float) -> int | None:
    """The fewest steps from which every larger count tried is within `limit`."""
    needed = None
    for row in reversed(rows):
        if row["moments"] > limit:
            break
        needed = row["steps"]
    return needed


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
    from k3batch.rows.seeds import derive_seed

    model = Kandinsky3.from_pretrained(tiny_model_dir(args.model), dtype=FP32, device="cpu")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]

    def latents(scheduler: str, steps: int, seed_set: int = 0):
        rows = [
            Request(
                p,
                None,
                derive_seed(seed_set, f"{i}/{s}"),
                args.size,
                args.size,
                steps,
                3.0,
                scheduler=scheduler,
            )
            for i, p in enumerate(prompts)
            for s in range(args.seeds)
        ]
        out = [
            model.sample(rows[i : i + args.batch_size])
            for i in range(0, len(rows), args.batch_size)
        ]
        return torch.cat(out).view(args.prompts, args.seeds, *out[0].shape[1:])

    start = time.perf_counter()
    ref = latents("reference", 50)
    floor = moments_distance(ref, latents("reference", 50, seed_set=1))
    ref_seconds = time.perf_counter() - start
    different_seed = sum(rmse(ref[:, 1:], ref[:, :-1])) / (args.prompts * (args.seeds - 1))
    print(
        f"{args.model} model, {args.size}x{args.size}, {args.prompts} prompts x {args.seeds} "
        f"seeds; reference at 50 steps: moments floor {floor:.4f} (two seed sets), per-row "
        f"latent RMSE between neighbouring seeds {different_seed:.3f}",
        flush=True,
    )
    results = {}
    for name in args.schedulers:
        converged = latents(name, args.converged)
        rows = []
        for steps in args.steps:
            x = latents(name, steps)
            d = moments_distance(x, ref)
            per_seed, own = rmse(x, ref), rmse(x, converged)
            rows.append(
                {
                    "steps": steps,
                    "moments": d,
                    "per_seed": sum(per_seed) / len(per_seed),
                    "self": sum(own) / len(own),
                }
            )
            print(
                f"{name:<12} {steps:>3} steps: moments {d:.4f} ({d / floor:.2f} x floor), "
                f"per-seed RMSE to reference {rows[-1]['per_seed']:.3f}, to own "
                f"{args.converged}-step result {rows[-1]['self']:.4f}",
                flush=True,
            )
        needed = needed_steps(rows, args.tolerance * floor)
        results[name] = {"needed": needed, "rows": rows}
        print(f"{name}: needs {needed} steps (moments within {args.tolerance} x floor)")
    out = {
        "model": args.model,
        "size": args.size,
        "prompts": args.prompts,
        "seeds": args.seeds,
        "tolerance": args.tolerance,
        "floor": floor,
        "different_seed_rmse": different_seed,
        "reference_seconds": ref_seconds,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
