"""GPU accounting before work starts, zero-GPU actors, GPUs without CUDA, device records.

No GPU here: Ray advertises fake ones (`ray.init(num_gpus=N)`, or `ray.num_gpus` for the
local Ray a job starts); torch is the CPU build, so a GPU Ray gives finds no CUDA.
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import yaml

from k3batch import gpus
from k3batch.config import ConfigError, load_config
from k3batch.job import kinds

from .conftest import job_config
from .test_cli import REPO, k3batch


def config(tmp_path, **sections):
    return load_config(data=job_config(tmp_path, "in.parquet", "tiny", **sections))


def test_gpus_needed_counts_every_pool_at_its_starting_size(tmp_path):
    cfg = config(tmp_path)
    assert gpus.gpus_needed(cfg, kinds.get(cfg.job)) == 0
    cfg = config(
        tmp_path,
        resources={
            "num_actors": 2,
            "max_actors": 4,  # autoscaling room is not needed to start
            "num_gpus_per_actor": 1,
            "text_encoder_pool": {"enabled": True, "num_actors": 3, "num_gpus_per_actor": 0.5},
        },
        beautify={"enabled": True, "backend": "vllm", "model": "m", "vllm": {"num_engines": 2}},
    )
    assert gpus.gpus_needed(cfg, kinds.get(cfg.job)) == 2 * 1 + 3 * 0.5 + 2 * 1
    assert [p.describe() for p in gpus.gpu_pools(cfg, kinds.get(cfg.job))] == [
        "resources (generation) 2 x 1",
        "resources.text_encoder_pool 3 x 0.5",
        "beautify.vllm 2 x 1",
    ]
    # A disabled pool, or the OpenAI backend, holds no GPU.
    cfg = config(
        tmp_path,
        resources={"num_gpus_per_actor": 0.25, "text_encoder_pool": {"num_gpus_per_actor": 1}},
        beautify={"enabled": True, "backend": "openai", "model": "m"},
    )
    assert gpus.gpus_needed(cfg, kinds.get(cfg.job)) == 0.25


def test_local_gpu_check_names_the_pools_and_the_numbers(tmp_path):
    fits = config(tmp_path, resources={"num_actors": 2, "num_gpus_per_actor": 0.5})
    fits.ray.num_gpus = 1
    gpus.check_local_gpus(fits, kinds.get(fits.job), local=True)
    short = config(tmp_path, resources={"num_actors": 3, "num_gpus_per_actor": 0.5})
    short.ray.num_gpus = 1
    with pytest.raises(ConfigError, match=r"need 1\.5 GPUs \(resources \(generation\) 3 x 0\.5\)"):
        gpus.check_local_gpus(short, kinds.get(short.job), local=True)
    gpus.check_local_gpus(
        short, kinds.get(short.job), local=False
    )  # a cluster is checked once joined
    wide = config(tmp_path, resources={"num_gpus_per_actor": 2})
    wide.ray.num_gpus = 1
    with pytest.raises(ConfigError, match="but the local Ray has 1 "):
        gpus.check_local_gpus(wide, kinds.get(wide.job), local=True)
    with pytest.raises(ConfigError, match="a fraction of a GPU only below 1"):
        fraction = config(tmp_path, resources={"num_gpus_per_actor": 1.5})
        gpus.check_local_gpus(fraction, kinds.get(fraction.job), True)


@pytest.mark.slow
def test_a_cluster_short_of_gpus_warns_and_one_that_cannot_grow_enough_fails(
    ray_local, tmp_path, caplog, monkeypatch
):
    cfg = config(tmp_path, resources={"num_gpus_per_actor": 1})
    with caplog.at_level(logging.WARNING, logger="k3batch.gpus"):
        gpus.check_cluster_gpus(
            cfg, kinds.get(cfg.job)
        )  # the test Ray has no GPU and no autoscaler config
    assert "the Ray cluster has 0 GPUs (at most 0 on a node) and this job's pools need 1" in (
        caplog.text
    )
    assert "wait for the autoscaler" in caplog.text
    # An autoscaler (v2) whose node groups hold 8 GPUs, at most 1 a node: 2 per actor never fits.
    monkeypatch.setattr(gpus, "autoscaler_limits", lambda: (8, 1))
    gpus.check_cluster_gpus(cfg, kinds.get(cfg.job))
    with pytest.raises(ConfigError, match="needs 2 on one node.*at most 1 on a node"):
        wide = config(tmp_path, resources={"num_gpus_per_actor": 2})
        gpus.check_cluster_gpus(wide, kinds.get(wide.job))


ZERO_GPU_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import pyarrow as pa
    import ray, ray.data
    from k3batch.dataflow import map_stage
    from k3batch.stages.base import Stage

    class SeeDevices(Stage):
        needs = ("id",)
        adds = {"seen": pa.string()}

        def __call__(self, batch):
            seen = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
            return {"seen": [seen] * len(batch["id"])}

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=sys.argv[1],
             object_store_memory=100 * 2**20, logging_level="WARNING")
    ds = ray.data.from_items([{"id": str(i)} for i in range(4)])
    out = {}
    for gpus in (0, 1):
        rows = map_stage(ds, SeeDevices, {}, batch_size=2, num_cpus=0.25, num_gpus=gpus,
                         actors=(1, 1)).take_all()
        out[gpus] = sorted({r["seen"] for r in rows})
    # Ray's own behaviour, as a control: a plain zero-GPU task keeps the node's devices.
    out["plain task"] = ray.get(
        ray.remote(num_gpus=0)(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).remote())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_a_zero_gpu_stage_actor_sees_no_gpu():
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "0",
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    # A short temp dir: Ray's socket paths must stay under 107 characters.
    with tempfile.TemporaryDirectory(prefix="k3gpu-") as temp:
        proc = subprocess.run(
            [sys.executable, "-c", ZERO_GPU_SCRIPT, temp],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    seen = json.loads(line.removeprefix("RESULT "))
    assert seen == {"0": [""], "1": ["0"], "plain task": "0"}


def gpu_job(tmp_path, **resources):
    """A tiny CLI job on a local Ray that advertises one (fake) GPU; device auto."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["input"]["uri"] = str(REPO / "data" / "demo_prompts.parquet")
    data["output"]["uri"] = str(tmp_path / "out")
    data["model"].update(path=str(tmp_path / "tiny"), device="auto")
    data["generation"].update(num_inference_steps=2, width=64, height=64)
    data["resources"].update(num_cpus_per_actor=0.5, write_num_cpus=0.25, **resources)
    data["ray"].update(num_gpus=1, num_cpus=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_job_needing_more_gpus_than_the_local_ray_has_fails_at_start(tmp_path):
    proc = k3batch("run", str(gpu_job(tmp_path, num_actors=2, num_gpus_per_actor=1)))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "k3batch: GPUs: the job's pools need 2 GPUs (resources (generation) 2 x 1) but the "
        "local Ray has 1 (ray.num_gpus); lower the pools' GPU requests or sizes, or join a "
        "cluster with ray.address"
    ]
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny").exists()


@pytest.mark.slow
def test_an_actor_given_a_gpu_without_cuda_fails_the_job_with_one_line(tmp_path):
    proc = k3batch("run", str(gpu_job(tmp_path, num_gpus_per_actor=1)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "k3batch: job failed: generation actor was given GPU [0] by Ray but torch "
    ), last
    assert last.endswith(
        "sees no CUDA device: install a CUDA build of torch or set resources.num_gpus_per_actor: 0"
    ), last
