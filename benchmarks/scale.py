"""Scale: how k3batch's own costs grow with the row count, measured on the real pipeline with
a zero-cost model stage.

Every run is `run_job` as `k3batch run` calls it: the same stages, actor pools, crash
journal, progress tally, Ray Data checkpointing, writers, accounting and run.json. Only the
model call is replaced, by the INSTANT STAND-IN of `k3batch.testing.standin` (set through
the pipeline's one override point, `K3BATCH_TEST_INSTANT_MODEL=1`): a grey 64x64 image per
record, no weights loaded. Nothing here measures a model; everything else is measured.

For each row count N and output format (`files`: images + metadata Parquet; `webdataset`:
tar shards + Parquet index):

1. `first half`: a fresh run over an input folder holding N/2 rows (one Parquet file).
2. A second file of N/2 rows joins the folder; `resume`: the same job run again, which
   finds half of its rows finished (a half-finished output, as a preempted run leaves one:
   Ray's row hash is the file and the row's place in it, so the first file's rows are
   done) and generates the other half.
3. `no-op`: the same job once more, with every row finished.
4. `k3batch report` over the finished output (`files`: the report reads metadata/).

Reported per N: driver and worker peak RSS (sampled every 0.2 s; workers: every process
under the run's own raylet), the resume filter (the committed ids loaded from the checkpoint
and `resume.filter_images` over the input, timed on the driver: the code Ray's filter actor
runs; and the seconds Ray itself spends loading the checkpoint when the rerun starts), the time the rerun spends
before its first image (from `run_job`'s call to the first generation batch the progress
tally counts), write throughput (records per second of each run: with a model that costs
nothing, the writers and k3batch's stages are the ceiling), files per output folder, the
checkpoint's volume, and the report's time. Then the growth of each figure between the
smallest and largest N (log-log slope: flat < 0.3, linear 0.7-1.3, worse above).

    .venv/bin/python benchmarks/scale.py --rows 100000 300000 1000000 --json scale.json
    .venv/bin/python benchmarks/scale.py --smoke          # 300 rows, files (CI)

Each run is a process of its own with a fresh local Ray (2 CPUs unless --cpus), so peaks do
not carry over. Disk: ~4.3 KiB a row for `files` (one small PNG each), ~0.6 KiB for
`webdataset`; `--keep` leaves the outputs for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import tiny_model_dir  # noqa: E402

WORDS = ["red", "blue", "misty", "cat", "owl", "castle", "robot", "forest", "river", "night"]
STANDIN = "K3BATCH_TEST_INSTANT_MODEL"


def write_prompts(path: str, start: int, n: int) -> None:
    """n synthetic prompts (rows start .. start+n-1), written in row groups of 100k."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for lo in range(start, start + n, 100_000):
            hi = min(lo + 100_000, start + n)
            prompts = [
                f"a {WORDS[i % 10]} {WORDS[(i // 10) % 10]} by the {WORDS[(i // 100) % 10]} #{i}"
                for i in range(lo, hi)
            ]
            writer.write_table(pa.table({"prompt": prompts}))


def config(input_dir: str, output: str, fmt: str, cpus: int):
    from k3batch.config import load_config

    return load_config(
        data={
            "input": {"uri": input_dir},
            "model": {
                "path": tiny_model_dir(),
                "dtype": {"unet": "float32", "text_encoder": "float32", "movq": "float32"},
                "device": "cpu",
            },
            "generation": {"num_inference_steps": 1, "width": 64, "height": 64, "seed": 0},
            # Batches of 64: per-batch costs (Ray tasks, the journal, the tally) are paid
            # per 64 rows, as a GPU job's generation batches would be (8-32 rows).
            "resources": {
                "batch_size": 64,
                "num_actors": 1,
                "num_cpus_per_actor": 0.5,
                "write_num_cpus": 0.25,
            },
            "output": {"uri": output, "format": fmt},
            "ray": {"num_cpus": cpus},
        }
    )


class FirstImage:
    """A progress reporter that notes when the progress tally first counts a generated batch."""

    def __init__(self, t0: float):
        from k3batch.progress import Reporter

        self.t0 = t0
        self.at: float | None = None
        first = self

        class Watch(Reporter):
            def show(self, snap, final=False):
                generated = snap.stages.get("generate", {}).get("rows", 0)
                if generated and first.at is None:
                    first.at = time.perf_counter() - first.t0

        self.reporter = Watch(stream=open(os.devnull, "w"), interval=0.2, tty=False)  # noqa: SIM115


class CheckpointLoad:
    """The seconds Ray Data spends loading the checkpoint when the rerun's dataset starts
    (`CheckpointManager.load_checkpoint`, on the driver: list, read every checkpoint file,
    gather the ids into one block, sort them)."""

    def __init__(self):
        from ray.data.checkpoint.checkpoint_filter import CheckpointManager

        self.seconds: float | None = None
        load = CheckpointManager.load_checkpoint
        watch = self

        def timed(manager, *args, **kwargs):
            start = time.perf_counter()
            try:
                return load(manager, *args, **kwargs)
            finally:
                watch.seconds = (watch.seconds or 0.0) + time.perf_counter() - start

        CheckpointManager.load_checkpoint = timed


def committed_ids(checkpoint_dir: str):
    """The record hashes a checkpoint has committed (pending writes excluded), sorted."""
    import numpy as np
    import pyarrow.parquet as pq

    from k3batch import schema

    files = sorted(
        os.path.join(checkpoint_dir, f)
        for f in os.listdir(checkpoint_dir)
        if f.endswith(".parquet") and not f.endswith(".pending.parquet")
    )
    parts = [pq.read_table(f, columns=[schema.RECORD_HASH]).column(0).to_numpy() for f in files]
    return np.sort(np.concatenate(parts)) if parts else np.array([], np.uint64)


def resume_filter(cfg) -> dict:
    """The resume filter as Ray's filter actor runs it, on the driver: load the committed ids,
    then `resume.filter_images` over every input block."""
    from k3batch import resume, schema
    from k3batch.dataflow import read_input
    from k3batch.job import kinds

    start = time.perf_counter()
    ids = committed_ids(resume.state_uri(cfg.output.uri, "checkpoint"))
    loaded = time.perf_counter() - start
    rules = kinds.get(cfg.job).record_rules(cfg)
    blocks = read_input(cfg).select_columns([schema.ROW_HASH])
    left = rows = 0
    filtering = 0.0
    for block in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        t = time.perf_counter()
        left += resume.filter_images(block, ids, rules).num_rows
        filtering += time.perf_counter() - t
        rows += block.num_rows
    return {
        "committed": int(ids.size),
        "load_s": loaded,
        "filter_s": filtering,
        "rows": rows,
        "rows_left": left,
        "ids_mib": ids.nbytes / 2**20,
    }


def one(mode: str, input_dir: str, output: str, fmt: str, cpus: int) -> dict:
    """One run in this process (`--one`): `run` (run_job) or `report` (write_report)."""
    from streaming_memory import PeakSampler

    if mode == "report":
        from k3batch.report.page import write_report

        with PeakSampler("no raylet") as peaks:
            start = time.perf_counter()
            write_report(output)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "driver": peaks.driver, "driver_cpu_s": driver_cpu_seconds()}

    import ray

    from k3batch import resume
    from k3batch.job import kinds
    from k3batch.job.run import run_job
    from k3batch.ray_start import budget

    os.environ[STANDIN] = "1"
    cfg = config(input_dir, output, fmt, cpus)
    resumed = os.path.exists(resume.state_uri(output, "job.json"))
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    # Started here, as `k3batch run` would size it (a resumed run counts Ray's checkpoint
    # filter), with a temp dir of its own so the sampler finds this run's workers.
    ray.init(
        num_cpus=budget.local_num_cpus(cfg, kinds.get(cfg.job), resumed),
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=512 * 2**20,
        _temp_dir=ray_tmp,
    )
    checkpoint = CheckpointLoad()
    result: dict = {}
    if mode == "resume":
        result["filter"] = resume_filter(cfg)
    t0 = time.perf_counter()
    first = FirstImage(t0)
    with PeakSampler(ray_tmp) as peaks:
        run = run_job(cfg, first.reporter).run
        seconds = time.perf_counter() - t0
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run["accounting"]["ok"], run["accounting"]
    result.update(
        seconds=seconds,
        first_image_s=first.at,
        ray_checkpoint_load_s=checkpoint.seconds,
        driver_cpu_s=driver_cpu_seconds(),
        rows_this_run=run["rows_this_run"],
        skipped=run["skipped_by_resume"],
        rows_out=run["rows_out"],
        driver=peaks.driver,
        worker_max=peaks.worker_max,
        worker_sum=peaks.worker_sum,
        model=STANDIN,
    )
    return result


def driver_cpu_seconds() -> float:
    """CPU seconds this (driver) process has used: steadier than wall time on a busy machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def subprocess_one(mode: str, input_dir: str, output: str, fmt: str, cpus: int) -> dict:
    args = [sys.executable, __file__, "--one", mode, input_dir, output, fmt, str(cpus)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {fmt} {output} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folders(output: str) -> dict:
    """Files per folder of the output (relative name -> count), and bytes under each top
    folder."""
    counts, sizes = {}, {}
    for here, _, files in os.walk(output):
        rel = os.path.relpath(here, output)
        if files:
            counts[rel] = len(files)
        top = rel.split(os.sep)[0]
        sizes[top] = sizes.get(top, 0) + sum(os.path.getsize(os.path.join(here, f)) for f in files)
    return {"files": counts, "bytes": sizes}


def measure(n: int, fmt: str, root: str, cpus: int) -> dict:
    input_dir = os.path.join(root, "in")
    output = os.path.join(root, "out")
    os.makedirs(input_dir)
    half = n // 2
    write_prompts(os.path.join(input_dir, "part-0.parquet"), 0, half)
    first = subprocess_one("run", input_dir, output, fmt, cpus)
    write_prompts(os.path.join(input_dir, "part-1.parquet"), half, n - half)
    resumed = subprocess_one("resume", input_dir, output, fmt, cpus)
    noop = subprocess_one("run", input_dir, output, fmt, cpus)
    # `k3batch report` reads metadata/ (the files format's); webdataset has none.
    report = subprocess_one("report", input_dir, output, fmt, cpus) if fmt == "files" else None
    assert resumed["skipped"] == half and resumed["rows_this_run"] == n - half, resumed
    assert noop["rows_this_run"] == 0 and noop["rows_out"] == n, noop
    return {
        "rows": n,
        "format": fmt,
        "first_half": first,
        "resume": resumed,
        "noop": noop,
        "report": report,
        "output": folders(output),
    }


# ---------------------------------------------------------------------------- the table

MIB = 2**20


def figures(r: dict) -> dict[str, float]:
    """The figures whose growth is judged, for one (rows, format) result."""
    out = r["output"]
    half = r["rows"] - r["rows"] // 2
    most = max(out["files"].values())
    return {
        "driver peak MiB (resume run)": r["resume"]["driver"] / MIB,
        "driver peak MiB (no-op rerun)": r["noop"]["driver"] / MIB,
        "largest worker peak MiB": max(r[k]["worker_max"] for k in ("first_half", "resume")) / MIB,
        "all workers peak MiB": max(r[k]["worker_sum"] for k in ("first_half", "resume")) / MIB,
        "resume filter: load ids s": r["resume"]["filter"]["load_s"],
        "resume filter: filter s": r["resume"]["filter"]["filter_s"],
        "Ray checkpoint load s": r["resume"]["ray_checkpoint_load_s"] or float("nan"),
        "rerun before first image s": r["resume"]["first_image_s"] or float("nan"),
        "no-op rerun s": r["noop"]["seconds"],
        "driver CPU s (resume run)": r["resume"]["driver_cpu_s"],
        "records/s (resume run)": half / r["resume"]["seconds"],
        "most files in one folder": most,
        "checkpoint MiB": out["bytes"].get("_k3batch", 0) / MIB,
        "report s": r["report"]["seconds"] if r["report"] else float("nan"),
        "report driver peak MiB": r["report"]["driver"] / MIB if r["report"] else float("nan"),
    }


def growth(small: float, large: float, ratio: float) -> str:
    """flat / linear / worse from the log-log slope between two row counts `ratio` apart."""
    if not (small > 0 and large > 0) or math.isnan(small) or math.isnan(large):
        return "n/a"
    slope = math.log(large / small) / math.log(ratio)
    kind = (
        "flat"
        if slope < 0.3
        else "sub-linear"
        if slope < 0.7
        else "linear"
        if slope <= 1.3
        else "WORSE than linear"
    )
    return f"{kind} (slope {slope:.2f})"


def print_table(results: list[dict]) -> None:
    for fmt in sorted({r["format"] for r in results}):
        rows = sorted((r for r in results if r["format"] == fmt), key=lambda r: r["rows"])
        print(f"\nScale, format {fmt}, model: {STANDIN} (instant stand-in, no model ran)")
        names = list(figures(rows[0]))
        header = f"{'figure':<32}" + "".join(f"{r['rows']:>12,}" for r in rows) + "  growth"
        print(header)
        for name in names:
            values = [figures(r)[name] for r in rows]
            cells = "".join(f"{v:>12.3g}" for v in values)
            ratio = rows[-1]["rows"] / rows[0]["rows"]
            print(
                f"{name:<32}{cells}  {growth(values[0], values[-1], ratio) if len(rows) > 1 else ''}"
            )
        for r in rows:
            top = sorted(r["output"]["files"].items(), key=lambda kv: -kv[1])[:4]
            print(
                f"  {r['rows']:,} rows: files per folder " + ", ".join(f"{k}/ {v}" for k, v in top)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--formats", nargs="+", default=["files", "webdataset"])
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of each run's Ray")
    parser.add_argument("--smoke", action="store_true", help="300 rows, files (CI)")
    parser.add_argument("--json", help="write every measurement here (and after each N)")
    parser.add_argument("--work", help="folder for inputs and outputs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep inputs and outputs")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, input_dir, output, fmt, cpus = args.one
        print(json.dumps(one(mode, input_dir, output, fmt, int(cpus))))
        return
    rows = [300] if args.smoke else sorted(args.rows)
    if args.smoke:
        args.formats = ["files"]
    tiny_model_dir()  # built once, before the runs (pre-flight checks the path)
    work = args.work or tempfile.mkdtemp(prefix="k3batch-scale-")
    results = []
    for n in rows:
        for fmt in args.formats:
            root = os.path.join(work, f"{fmt}-{n}")
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            results.append(measure(n, fmt, root, args.cpus))
            print(f"{fmt} {n:,} rows measured in {time.perf_counter() - start:.0f} s", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    print_table(results)
    if not args.keep and not args.work:
        with contextlib.suppress(OSError):
            os.rmdir(work)


if __name__ == "__main__":
    main()
