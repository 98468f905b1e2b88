"""The GPU benchmark's CPU mode runs end to end (the GPU figures come from a GPU machine)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_small_mode_runs_both_paths_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_bench.py",
            "--small",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kandinsky3: k3batch / diffusers images/s =" in proc.stdout
    assert "kandinsky3-flash: k3batch / diffusers images/s =" in proc.stdout
    data = json.loads(out.read_text())
    runs = {(r["member"], r["impl"]) for r in data["results"]}
    assert runs == {
        (m, i) for m in ("kandinsky3", "kandinsky3-flash") for i in ("k3batch", "diffusers")
    }
    for r in data["results"]:
        assert r["images_per_second"] > 0 and r["unet"] > 0 and r["decode"] > 0
    base, flash = data["flops_per_image"]["kandinsky3"], data["flops_per_image"]["kandinsky3-flash"]
    # 4 steps x cond + uncond vs Flash's 4 steps without guidance: twice the UNet FLOPs.
    assert base["unet"] == 2 * flash["unet"] > 0
    assert base["image"] == base["text"] + base["unet"] + base["decode"]
