"""The CPU benchmarks still run (smallest settings): CI checks they work, not their figures,
which only mean something on an idle machine (benchmarks/RESULTS.md)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def run_benchmark(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pipeline_efficiency_benchmark_prints_its_ratio():
    out = run_benchmark(
        "benchmarks/pipeline_efficiency.py",
        "--smoke",
        "--model",
        "tiny",
        "--size",
        "64",
        "--steps",
        "1",
    )
    # Both layouts, each against its bare twin, and the headline ratio: n/a where no rate
    # was measured (a smoke run makes one pipeline run per layout; a run lost in noise).
    layouts = re.findall(r"^efficiency ([AB])\s+([0-9.]+|n/a) ", out, re.M)
    assert [name for name, _ in layouts] == ["A", "B"], out
    headline = re.search(r"^efficiency\s+([0-9.]+|n/a) ", out, re.M).group(1)
    measured = [float(value) for _, value in layouts if value != "n/a"]
    assert (float(headline) > 0) if measured else (headline == "n/a"), out
    bare = re.findall(r"^bare (?:loop|processes)\s+([0-9.]+) images/s", out, re.M)
    assert len(bare) == 2 and all(float(b) > 0 for b in bare), out


def test_streaming_memory_benchmark_prints_its_ratios():
    out = run_benchmark("benchmarks/streaming_memory.py", "--rows", "40", "120")
    ratios = re.findall(r"^peak ratio .*: ([0-9.]+) \(target", out, re.M)
    assert len(ratios) == 3 and all(float(r) > 0 for r in ratios)


def test_time_to_first_image_benchmark_reports_it():
    out = run_benchmark("benchmarks/time_to_first_image.py", "--steps", "2")
    assert float(re.search(r"Time to first image .*?: ([0-9.]+) s", out).group(1)) > 0


def test_kandinsky22_flops_gives_the_priors_share():
    # Why the prior shares the decoder's actor (docs/kandinsky22.md): a small share.
    out = run_benchmark("benchmarks/kandinsky22_flops.py", "--size", "256", "--steps", "10")
    share = float(re.search(r"^prior share ([0-9.]+) of", out, re.M).group(1))
    assert 0 < share < 1


def test_scale_benchmark_measures_a_half_finished_output_and_a_no_op_rerun(tmp_path):
    import json

    out = run_benchmark("benchmarks/scale.py", "--smoke", "--json", str(tmp_path / "scale.json"))
    assert "instant stand-in, no model ran" in out
    growth = re.search(r"^rerun before first image s\s+([0-9.e+]+)", out, re.M)
    assert growth and float(growth.group(1)) > 0, out
    (result,) = json.loads((tmp_path / "scale.json").read_text())
    resume, noop = result["resume"], result["noop"]
    assert (resume["skipped"], resume["rows_this_run"]) == (150, 150)
    assert resume["filter"]["rows_left"] == 150 and resume["filter"]["committed"] == 150
    assert resume["ray_checkpoint_load_s"] > 0 and resume["driver"] > 0
    assert (noop["rows_this_run"], noop["rows_out"]) == (0, 300)
    assert noop["first_image_s"] is None  # nothing generated: no pool was started
    # images/ holds the 300 images and the Hugging Face image folder's metadata.parquet.
    assert result["output"]["files"]["images"] == 301 and result["report"]["seconds"] > 0
