"""Serve throughput and latency, dynamic batching vs batch size 1, measured side by side.

Starts local Ray + Serve with the tiny model, deploys the app twice (max_batch_size=8, then
1, everything else equal), and drives each with 1, 4 and 16 concurrent clients over real
HTTP. Prints requests/s, p50/p99 latency, and the batching/no-batching throughput ratio at
16 clients.

    .venv/bin/python benchmarks/serve_bench.py            # full run (~2-3 min on 2 cores)
    .venv/bin/python benchmarks/serve_bench.py --quick    # smoke run for CI-like checks
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(
    url: str, clients: int, requests_per_client: int, body: dict
) -> tuple[float, list[float]]:
    import httpx

    latencies: list[float] = []

    async def client(http):
        for _ in range(requests_per_client):
            t = time.perf_counter()
            r = await http.post(url, json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(timeout=300) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return len(latencies) / wall, latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few requests: checks it works")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    import ray
    from ray import serve

    from k3batch.serve.app import build_app
    from k3batch.testing.tiny import make_tiny

    model_dir = make_tiny(os.path.join(tempfile.gettempdir(), "k3batch-bench-tiny"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {
        "prompt": "a lighthouse in a storm",
        "num_inference_steps": args.steps,
        "size": f"{args.size}x{args.size}",
    }
    per_client = {1: 4, 4: 4, 16: 3} if args.quick else {1: 16, 4: 12, 16: 8}
    results = {}
    for batch in (8, 1):
        app = build_app(
            {
                "model": {
                    "path": model_dir,
                    "dtype": {"unet": "float32", "text_encoder": "float32", "movq": "float32"},
                    "device": "cpu",
                },
                "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.02},
                "generator": {"num_cpus": 1, "max_ongoing_requests": 16, "max_queued_requests": 64},
            }
        )
        serve.run(app, name=f"bench{batch}", route_prefix="/")
        asyncio.run(drive(url, 2, 2, body))  # warm-up
        for clients, n in per_client.items():
            rps, lat = asyncio.run(drive(url, clients, n, body))
            results[(batch, clients)] = (rps, pct(lat, 0.5), pct(lat, 0.99), statistics.mean(lat))
        serve.delete(f"bench{batch}")
    serve.shutdown()
    ray.shutdown()

    print(
        f"\nServe benchmark: tiny model, {args.size}x{args.size}, {args.steps} steps, 1 replica (1 CPU), 2-core machine"
    )
    print(f"{'max_batch_size':>14} {'clients':>7} {'req/s':>8} {'p50 s':>8} {'p99 s':>8}")
    for (batch, clients), (rps, p50, p99, _) in results.items():
        print(f"{batch:>14} {clients:>7} {rps:>8.2f} {p50:>8.3f} {p99:>8.3f}")
    ratio = results[(8, 16)][0] / results[(1, 16)][0]
    print(f"\nthroughput ratio at 16 clients, dynamic batching / batch size 1: {ratio:.2f}x")


if __name__ == "__main__":
    main()
