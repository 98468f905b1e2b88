"""The GPU benchmark's CPU mode runs end to end (the GPU figures come from a GPU machine)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_small_mode_runs_the_gpu_bench_and_the_drift_check(tmp_path):
    """The GPU check script's CPU mode: both benchmarks run end to end, results as JSON."""
    import math
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--small"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = (tmp_path / "check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "== bench rc=0" in log and "== drift rc=0" in log, log[-3000:]
    assert "kandinsky3: k3batch / diffusers images/s =" in log
    assert "kandinsky3-flash: k3batch / diffusers images/s =" in log
    data = json.loads((tmp_path / "bench.json").read_text())
    runs = {(r["member"], r["impl"]) for r in data["results"]}
    assert "kandinsky2.2: k3batch / diffusers images/s =" in log
    assert runs == {
        (m, i)
        for m in ("kandinsky3", "kandinsky3-flash", "kandinsky2.2")
        for i in ("k3batch", "diffusers")
    }
    for r in data["results"]:
        assert r["images_per_second"] > 0 and r["unet"] > 0 and r["decode"] > 0
    base, flash = data["flops_per_image"]["kandinsky3"], data["flops_per_image"]["kandinsky3-flash"]
    # 10 steps x cond + uncond vs Flash's 4 steps without guidance.
    assert base["unet"] == 10 * 2 / 4 * flash["unet"] > 0
    assert base["image"] == base["text"] + base["unet"] + base["decode"]
    # Kandinsky 2.2 (its small defaults: 2 prior and 4 decoder steps, both guided): the
    # decoder's FLOPs are its 8 UNet evaluations, the `text` stage holds the prior's 4.
    k22, args = data["flops_per_image"]["kandinsky2.2"], data["args"]
    assert (args["prior_steps"], args["k22_steps"]) == (2, 4)
    call = data["flops_per_call_kandinsky2.2"]
    assert k22["unet"] == 4 * 2 * call["unet"] > 0
    assert k22["text"] == 2 * call["text"] + 2 * 2 * call["prior"] > 0
    assert k22["image"] == k22["text"] + k22["unet"] + k22["decode"]
    assert k22["decode"] == call["decode"] > 0

    # KandiSuperRes x4 (small: 16 px -> 64 px, 32 px windows every 24: 3 x 3 windows, 5 steps):
    # 4 windows per UNet call take ceil(9 / 4) calls a step, 1 per call takes 9.
    sr = data["superres"]
    assert sr["windows"] == 9 and sr["steps"] == 5 and sr["flops_per_image"] > 0
    calls = {r["max_tiles_per_call"]: r["unet_calls"] for r in sr["runs"]}
    assert calls == {4: 15, 1: 45} and all(r["seconds"] > 0 for r in sr["runs"])
    assert "kandisuperres-x4: 4 tiles/call vs 1 (the reference's loop) images/s =" in log

    drift = json.loads((tmp_path / "drift.json").read_text())["results"]
    assert list(drift) == ["fp32", "fp32+tf32", "reference", "bfloat16"]
    assert drift["fp32"]["psnr_db"] == [math.inf, math.inf]
    # Reduced precision moves the images, by a finite amount (no NaN latents: they would
    # decode to the same black image and read as equal).
    bf16 = drift["bfloat16"]
    assert all(0 < e < 1 for e in bf16["final_latent_rel_error"])
    assert all(20 < p < math.inf for p in bf16["psnr_db"])
    assert 0 < drift["reference"]["eps_rel_error"] < bf16["eps_rel_error"]


@pytest.mark.slow
def test_device_check_smoke_mode_runs_every_gpu_step_on_the_tiny_model(tmp_path):
    """`--smoke`: each step of the GPU check on CPU (compiled with Dynamo's `eager`
    backend), a JSON line per measurement and per step in results.jsonl."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=4 * 3600,
        env=env,
    )
    log = (tmp_path / "check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "rc" in r}
    expected = ["eager", "profile", "compile", "images", "fp8", "fp8_drift", "decode", "batch"]
    assert list(steps) == [*expected, "switches"]
    assert all(s["rc"] == 0 and s["records"] > 0 for s in steps.values()), steps
    # The step lines reach stdout too (the device tool returns the output's tail).
    assert '"step": "switches", "rc": 0' in proc.stdout

    (unet,) = [r for r in records if r.get("model") == "unet"]
    assert {"convolution", "group_norm"} <= set(unet["groups_ms"]) and unet["ms_per_call"] > 0
    compiled = [r for r in records if r.get("variant") == "regional" and "blocks" in r]
    for r in compiled:  # the compile step's and the fp8 step's bfloat16 run
        assert r["blocks"]["compiled"] == r["blocks"]["blocks"] == 36
        assert r["recompiles_at_another_timestep"] == 0 and r["rel_error_vs_eager_t500"] < 1e-5
    images = {(r["member"], r["impl"]) for r in records if r.get("impl")}
    assert {("kandinsky3", i) for i in ("diffusers", "k3batch", "k3batch-compiled")} <= images
    assert ("kandinsky3", "diffusers-best") in images
    (fp8_eager,) = [r for r in records if r.get("variant") == "fp8_eager"]
    assert fp8_eager["fp8_gemms"] > 0 and 0 < fp8_eager["eps_rel_error_vs_bf16_t999"] < 0.5
    decodes = [r for r in records if "attention" in r and "ms_per_decode" in r]
    assert {(r["attention"], r["compiled"]) for r in decodes} == {
        (k, c) for k in ("sdpa", "chunked", "split_heads") for c in (False, True)
    }
    assert all(r["max_abs_diff_vs_sdpa"] < 1e-3 for r in decodes)
    drift = json.loads((tmp_path / "drift_fp8.json").read_text())
    assert drift["yardstick"] == "bfloat16" and list(drift["results"]) == ["bfloat16", "fp8"]
    assert all(20 < p < math.inf for p in drift["results"]["fp8"]["psnr_db"])
