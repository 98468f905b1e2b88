"""Streaming memory: peak RSS of the driver and of the Ray workers for a 5,000-row and a
50,000-row job (beautify off, tiny model, 64x64, 1 step), the report page included as
`k3batch run` writes it. The larger run's peaks must be within 1.25x of the smaller's:
nothing may hold the whole table.

Memory is sampled every 0.2 s: the driver's RSS, and the RSS of every process under this
benchmark's own raylet (workers and actors), per process and summed. Each run has a process
of its own, so the larger run's driver does not start from what the smaller one left.

    .venv/bin/python benchmarks/streaming_memory.py            # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/streaming_memory.py --quick    # 500 vs 5,000 rows
    .venv/bin/python benchmarks/streaming_memory.py --rows 50 200   # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(__file__))
import contextlib

from common import job, prompt_table, tiny_model_dir  # noqa: E402


class PeakSampler:
    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.driver = self.worker_max = self.worker_sum = 0
        self.processes = 0  # worker processes alive at the sum's peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _raylet(self):
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd and self.temp_dir in cmd:
                return p
        return None

    def _run(self):
        me, raylet = psutil.Process(), None
        while not self._stop.is_set():
            raylet = raylet or self._raylet()
            self.driver = max(self.driver, me.memory_info().rss)
            if raylet:
                rss = []
                for child in raylet.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss.append(child.memory_info().rss)
                if rss:
                    self.worker_max = max(self.worker_max, max(rss))
                    if sum(rss) > self.worker_sum:
                        self.worker_sum, self.processes = sum(rss), len(rss)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def one_run(n: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {n}-row run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(n: int, model_dir: str, tmp: str) -> dict:
    import ray

    from k3batch.job.run import run_job
    from k3batch.report.page import write_report

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=512 * 2**20,
        _temp_dir=ray_tmp,
    )
    cfg = job(
        prompt_table(f"{tmp}/p{n}.parquet", n),
        f"{tmp}/out{n}",
        model_dir,
        size=64,
        steps=1,
        batch_size=32,
        num_cpus_per_actor=1,
        write_num_cpus=0.5,
    )
    start = time.perf_counter()
    with PeakSampler(ray_tmp) as peaks:
        result = run_job(cfg)
        # What `k3batch run` does next in the same process: the report page.
        write_report(cfg.output.uri)
    seconds = time.perf_counter() - start
    ray.shutdown()
    assert result.ok and result.run["rows_out"] == n, result.run
    return {
        "rows": n,
        "seconds": seconds,
        "driver": peaks.driver,
        "worker_max": peaks.worker_max,
        "worker_sum": peaks.worker_sum,
        "processes": peaks.processes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single run, as JSON
    args = parser.parse_args()
    model_dir = tiny_model_dir()
    tmp = tempfile.mkdtemp(prefix="k3batch-mem-")
    if args.one:
        print(json.dumps(run(args.one, model_dir, tmp)))
        return
    small, large = args.rows or ((500, 5_000) if args.quick else (5_000, 50_000))
    a, b = (one_run(n) for n in (small, large))
    mib = 2**20
    print(f"\nStreaming memory: tiny model, 64x64, 1 step, batch 32, {os.cpu_count()} CPUs")
    print(
        f"{'rows':>7} {'seconds':>8} {'driver MiB':>11} {'largest worker MiB':>19} "
        f"{'all workers MiB':>16} {'(processes)':>12}"
    )
    for r in (a, b):
        print(
            f"{r['rows']:>7} {r['seconds']:>8.1f} {r['driver'] / mib:>11.0f} {r['worker_max'] / mib:>19.0f} "
            f"{r['worker_sum'] / mib:>16.0f} {r['processes']:>12}"
        )
    for key, name in (
        ("driver", "driver"),
        ("worker_max", "largest worker"),
        ("worker_sum", "all workers"),
    ):
        print(
            f"peak ratio {large:,} / {small:,} rows, {name}: {b[key] / a[key]:.2f} (target <= 1.25)"
        )


if __name__ == "__main__":
    main()
