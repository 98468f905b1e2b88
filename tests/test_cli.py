"""The command line as users call it, in subprocesses."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K3BATCH = [sys.executable, "-m", "k3batch.cli"]


def k3batch(*args, cwd=REPO, timeout=600, env=None):
    """`env`: changes to the test environment; a None value removes that variable."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        **(env or {}),
    }
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [*K3BATCH, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def demo_config(tmp_path, **changes):
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["input"]["uri"] = str(REPO / "data" / "demo_prompts.parquet")
    data["output"]["uri"] = str(tmp_path / "out")
    data["model"]["path"] = str(tmp_path / "tiny")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"generation__bogus": 1}, ["generation.bogus", "Extra inputs"]),
        ({"generation__width": 1000}, ["generation.width", "multiple of 64", "1000"]),
        ({"generation__num_inference_steps": "many"}, ["generation.num_inference_steps", "'many'"]),
        (
            {"input__uri": "/nonexistent/prompts.parquet"},
            ["input.uri", "/nonexistent/prompts.parquet"],
        ),
        ({"input__prompt_column": "caption"}, ["input.prompt_column", "'caption'"]),
        (
            {"model__make_tiny": False, "model__path": "./no/such/dir"},
            ["model.path", "./no/such/dir"],
        ),
        (
            {"ray__num_cpus": 2, "resources__num_actors": 2},
            ["ray.num_cpus", "2 CPUs cannot run this job", "set ray.num_cpus to 3"],
        ),
    ],
)
def test_bad_config_fails_at_start_with_one_line_and_writes_nothing(tmp_path, changes, needles):
    proc = k3batch("run", str(demo_config(tmp_path, **changes)))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tiny").exists()


def test_set_overrides_and_unreadable_yaml(tmp_path):
    proc = k3batch(
        "config",
        str(demo_config(tmp_path)),
        "--set",
        "resources.batch_size=8",
        "--set",
        "generation.negative_prompt=dark",
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert (
        shown["resources"]["batch_size"] == 8 and shown["generation"]["negative_prompt"] == "dark"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    assert_one_line_error(k3batch("run", str(bad)), "not valid YAML")
    assert_one_line_error(k3batch("run", str(tmp_path / "missing.yaml")), "cannot read config")
    assert_one_line_error(
        k3batch("run", str(demo_config(tmp_path)), "--set", "nokey"), "key.path=value"
    )


def test_schema_describes_every_field():
    proc = k3batch("config", "--schema")
    schema = json.loads(proc.stdout)

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}{name} has no description"
            ref = prop.get("$ref") or next(
                (a.get("$ref") for a in prop.get("allOf", []) if "$ref" in a), None
            )
            if ref:
                walk(schema["$defs"][ref.split("/")[-1]], f"{path}{name}.")

    walk(schema, "")


@pytest.mark.slow
def test_convert_command(tmp_path, tiny_ref_dir):
    proc = k3batch("convert", tiny_ref_dir, str(tmp_path / "family"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kandinsky3, kandinsky3-flash, kandinsky3-inpaint" in proc.stdout
    for sub in ("unet", "unet_flash", "unet_inpaint", "text_encoder", "tokenizer", "movq"):
        assert (tmp_path / "family" / sub).is_dir()
    assert (tmp_path / "family" / "unet_flash" / "null_embedding.safetensors").exists()
    bad = k3batch("convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert_one_line_error(bad, "no reference-layout checkpoint")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("via", ["ray.address", "RAY_ADDRESS"])
def test_unreachable_ray_address_is_one_line_and_quick(tmp_path, via):
    address = f"127.0.0.1:{free_port()}"  # a closed port
    job = demo_config(tmp_path, **({"ray__address": address} if via == "ray.address" else {}))
    env = {"RAY_ADDRESS": address} if via == "RAY_ADDRESS" else {}
    started = time.monotonic()
    proc = k3batch("run", str(job), env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert_one_line_error(proc, via, address, "cannot join the Ray cluster")
    assert "Traceback" not in proc.stderr


def test_ray_start_failure_is_one_line(tmp_path):
    proc = k3batch(
        "run", str(demo_config(tmp_path)), env={"RAY_TMPDIR": str(tmp_path / "no" / "such")}
    )
    assert_one_line_error(proc, "cannot start a local Ray instance", str(tmp_path / "no"))
    assert "Traceback" not in proc.stderr


# Lines a healthy run must not print: Ray's warnings and errors (Python's "WARNING" and
# the C++ logger's "[time E pid tid] file.cc:N:"), tracebacks, tqdm bars.
NOISE = re.compile(r"WARNING|\] [A-Z]+ \S+\.(?:cc|h):\d+|\d+ [EWF] \d+ \d+\]|Traceback|it/s\]")


@pytest.mark.slow
def test_demo_run_prints_only_k3batch_lines_even_with_a_stale_ray_address_recorded(
    tmp_path, stale_ray_tmpdir
):
    # A crashed `ray start` leaves its address in <ray temp dir>/ray_current_cluster: a job
    # without an address still starts its own Ray. RAY_TMPDIR keeps the stale file private.
    # The same run puts a 1-CPU generation actor on every core: Ray Data's list-files, read
    # and repartition tasks ask one whole CPU, so with no CPU left the job used to hang.
    cores = os.cpu_count() or 1
    env = {"RAY_TMPDIR": str(stale_ray_tmpdir), "RAY_AUTH_TOKEN": "0123456789abcdef" * 4}
    env.update(RAY_AUTH_MODE=None, RAY_DATA_DISABLE_PROGRESS_BARS=None)  # k3batch's own
    proc = k3batch(
        "run",
        str(demo_config(tmp_path)),
        "--set",
        "generation.num_inference_steps=2",
        "--set",
        f"resources.num_actors={cores}",
        "--set",
        "resources.torch_threads=1",
        env=env,
        timeout=400,
    )
    # The README's demo command end to end (one run serves the three checks: each costs ~45 s).
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["ok"] == 36
    assert "rows in/out   36 / 36" in proc.stdout and "ok / errors   36 / 0" in proc.stdout
    assert "k3batch progress: 36/36 rows" in proc.stderr
    table = pads.dataset(str(tmp_path / "out" / "metadata"), format="parquet").to_table()
    assert table.num_rows == 36 and set(table.column("status").to_pylist()) == {"ok"}
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 36
    assert str(tmp_path / "out") in proc.stdout
    noisy = [ln for ln in (proc.stdout + proc.stderr).splitlines() if NOISE.search(ln)]
    assert not noisy, "\n".join(noisy)
    # k3batch's own lines, the actors' ones as Ray forwards them ("(MapWorker(...) pid=N) ").
    for line in proc.stderr.splitlines():
        assert re.match(r"(\(.* pid=\d+[^)]*\) )?k3batch", line), line
    # Each model actor says once where its components run (issue: devices in the log).
    assert re.search(r"k3batch: generation actor \S+ runs .*unet cpu/float32", proc.stderr)


def test_run_help_lists_every_job_kind_from_the_registry():
    from typing import get_args

    from k3batch.config import JobConfig
    from k3batch.job import kinds

    registry = kinds.all_kinds()
    # The registry (pipelines/ modules with a KIND) and the config's choices agree.
    assert set(registry) == set(get_args(JobConfig.model_fields["job"].annotation))
    proc = k3batch("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for name, kind in registry.items():
        assert f"{name}: {kind.summary}" in text, name


def test_make_tiny_help_lists_every_tiny_set_and_builds_the_superres_and_scorer_sets(tmp_path):
    from k3batch.model import family
    from k3batch.model.superres.pipeline import CHECKPOINTS
    from k3batch.testing.tiny_sets import EXTRA_SETS

    proc = k3batch("make-tiny", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for name, fam in family.FAMILIES.items():
        assert f"--family {name}: {fam.tiny_set}" in text, name
    for tiny_set in EXTRA_SETS:
        assert f"{tiny_set.option}: {tiny_set.what}" in text, tiny_set.option
    assert {"--superres", "--scorers", "--llm"} <= {t.option for t in EXTRA_SETS}

    sr = k3batch("make-tiny", str(tmp_path / "sr"), "--superres")
    assert sr.returncode == 0, sr.stderr
    assert all((tmp_path / "sr" / name).is_file() for name in CHECKPOINTS.values())
    scorers = k3batch("make-tiny", str(tmp_path / "scorers"), "--scorers")
    assert scorers.returncode == 0, scorers.stderr
    from transformers import AutoModelForImageClassification, CLIPModel

    CLIPModel.from_pretrained(tmp_path / "scorers" / "clip")
    nsfw = AutoModelForImageClassification.from_pretrained(tmp_path / "scorers" / "nsfw")
    assert set(nsfw.config.label2id) == {"normal", "nsfw"}
    both = k3batch("make-tiny", str(tmp_path / "x"), "--superres", "--llm")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
