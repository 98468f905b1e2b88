"""Submitting jobs to a real Ray cluster started with `ray start --head` on this machine."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def cluster(short_tmp):
    """A private head node: own temp dir, free ports, stopped through its own process group."""
    temp = short_tmp("rc")
    gcs, dash, client, nm, om, agent, metrics, env_agent = free_ports(8)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # the daemons inherit this process group: we stop exactly them
    )
    pgid = None
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        pgid = _group_of(temp)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        if pgid is None:  # a failed start can leave some daemons up: stop those too
            with contextlib.suppress(AssertionError, ProcessLookupError):
                pgid = _group_of(temp)
        if pgid:
            _stop(pgid)


def _group_of(temp: Path) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(temp) in cmdline and "gcs_server" in cmdline:
                return os.getpgid(int(proc.name))
    raise AssertionError("no gcs_server found for the test cluster")


def _stop(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def metadata_rows(out: Path):
    return pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()


FAST = [
    "--set",
    "generation.num_inference_steps=2",
    "--set",
    "generation.width=64",
    "--set",
    "generation.height=64",
    "--set",
    "resources.num_cpus_per_actor=0.5",
]


def test_k3batch_submit_runs_the_demo_on_the_cluster_and_waits(cluster, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(BIN / "k3batch"),
            "submit",
            "configs/demo.yaml",
            "--address",
            cluster["address"],
            "--wait",
            *FAST,
            "--set",
            f"output.uri={out}",
        ],
        cwd=REPO,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout and "rows in/out   36 / 36" in proc.stdout
    rows = metadata_rows(out)
    assert len(rows) == 36 and all(r["status"] == "ok" for r in rows)
    assert len(list((out / "images").glob("*.png"))) == 36


def test_k3batch_submit_exits_non_zero_when_the_job_fails(cluster, tmp_path):
    proc = subprocess.run(
        [
            str(BIN / "k3batch"),
            "submit",
            "configs/demo.yaml",
            "--address",
            cluster["address"],
            "--wait",
            *FAST,
            "--set",
            "input.uri=/nonexistent/prompts.parquet",
            "--set",
            f"output.uri={tmp_path / 'o'}",
        ],
        cwd=REPO,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "FAILED" in proc.stdout and "input.uri: no such file or directory" in proc.stdout


def test_plain_ray_job_submit_works_too(cluster, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster["address"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            '{"excludes": [".venv/", ".cache/", "out/", ".git/"]}',
            "--",
            "k3batch",
            "run",
            "configs/demo.yaml",
            *FAST,
            "--set",
            f"output.uri={out}",
        ],
        cwd=REPO,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert len(metadata_rows(out)) == 36


def test_submit_refuses_a_bad_config_before_uploading(tmp_path):
    bad = REPO / "configs" / "demo.yaml"
    proc = subprocess.run(
        [
            str(BIN / "k3batch"),
            "submit",
            str(bad),
            "--address",
            "http://127.0.0.1:9",
            "--set",
            "generation.width=65",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "generation.width" in proc.stderr
    outside = tmp_path / "job.yaml"
    outside.write_text(bad.read_text())
    proc = subprocess.run(
        [str(BIN / "k3batch"), "submit", str(outside), "--address", "http://127.0.0.1:9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "outside the working dir" in proc.stderr
