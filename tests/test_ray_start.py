"""One Ray start-up for `k3batch run`, `serve` and `submit`, as users call them (subprocesses,
real Ray): no address is a fresh local Ray even with a stale one recorded; an address is
joined or refused within seconds with one line; Serve deployments that can never be placed
are refused at start; SIGTERM shuts Serve down cleanly. Jobs' own start-up is tested in
test_cli.py (unreachable ray.address / RAY_ADDRESS, a failed local start, a stale record)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K3BATCH = [sys.executable, "-m", "k3batch.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**changes) -> dict:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ADDRESS": None,  # each test says which Ray it means
        "RAY_API_SERVER_ADDRESS": None,
        # The replicas of tests/serve_apps.py import it: Ray's workers inherit PYTHONPATH.
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **changes,
    }
    return {k: v for k, v in env.items() if v is not None}


def k3batch(*args, env=None, timeout=120):
    return subprocess.run(
        [*K3BATCH, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=environment(**(env or {})),
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def hello_config(tmp_path):
    """A Serve config of one small deployment (no model): Ray's start and stop are the cost."""
    path = tmp_path / "hello.yaml"
    app = {"name": "hello", "route_prefix": "/", "import_path": "tests.serve_apps:hello"}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


@pytest.mark.slow
def test_serve_with_a_stale_recorded_ray_serves_and_sigterm_stops_it_cleanly(
    hello_config, stale_ray_tmpdir
):
    port = free_port()
    proc = subprocess.Popen(
        [*K3BATCH, "serve", str(hello_config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=environment(RAY_TMPDIR=str(stale_ray_tmpdir)),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150  # a local Ray and one replica, on a busy 2-core box
        while not any("k3batch: serving on" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert "k3batch: stopping the server" in output
    # Ray's C++ handler for SIGTERM used to print a stack dump and kill the server.
    assert "SIGTERM received" not in output and "Traceback" not in output, output
    with pytest.raises(httpx.HTTPError):  # Serve is down, not only the driver
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)


# Not `--address auto` here: Ray resolves it to any Ray running on the machine when the
# record is stale, which on a shared test machine is someone else's.
@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_serve_refuses_an_unreachable_address_in_seconds_with_one_line(
    hello_config, stale_ray_tmpdir, via
):
    address = f"127.0.0.1:{free_port()}"  # a closed port
    args, env = ["--address", address], {"RAY_TMPDIR": str(stale_ray_tmpdir)}
    if via == "RAY_ADDRESS":
        args, env = [], {**env, "RAY_ADDRESS": address}
    started = time.monotonic()
    proc = k3batch("serve", str(hello_config), *args, env=env)
    assert time.monotonic() - started < 30
    assert_one_line_error(proc, f"{via}: cannot join the Ray cluster at {address}", "refused")


def test_a_serve_deployment_that_can_never_be_placed_is_one_line_at_start():
    # The demo config on a Ray with fewer CPUs than its generator asks: before, Serve waited
    # for ever with Ray's repeating "resources cannot be scheduled" warning.
    cpus = 4 * (os.cpu_count() or 1)
    proc = k3batch("serve", "configs/serve-demo.yaml", "--set", f"generator.num_cpus={cpus}")
    assert_one_line_error(
        proc,
        "serve: Generator (applications[0].args.generator) asks 1 replica x "
        f"{cpus} CPUs, but the local Ray has",
        "after Ingress 1 x 0.1",
        "it could never be placed",
    )
    assert "Traceback" not in proc.stderr


def test_serve_deployments_are_counted_from_the_config_as_serve_would_start_them():
    from k3batch.ray_start.budget import deployment_pools
    from k3batch.serve.app import build_app
    from k3batch.serve.launch import load_serve_config

    app = load_serve_config("configs/serve.yaml")["applications"][0]
    pools = deployment_pools(build_app(app["args"]), lambda name: name.lower())
    # The ingress first; autoscaled deployments start at min_replicas.
    assert [(p.name, p.actors, p.cpus_each, p.gpus_each, p.where) for p in pools] == [
        ("Ingress", 1, 0.1, 0, "ingress"),
        ("Generator", 1, 4, 0.45, "generator"),
        ("InpaintGenerator", 1, 4, 0.45, "inpaintgenerator"),
        ("Upscaler", 1, 2, 0.1, "upscaler"),
    ]
    args = {
        **app["args"],
        "generator": {"num_replicas": 3, "num_cpus": 2},
        "upscale": {"model": "x2", "make_tiny": True, "path": "x"},
        "upscaler": {
            "autoscaling_config": {"min_replicas": 0, "initial_replicas": 2, "max_replicas": 4}
        },
        "beautify": {"base_url": "http://127.0.0.1:1/v1", "num_cpus": 0.2},
    }
    pools = {p.name: p for p in deployment_pools(build_app(args))}
    assert (pools["Generator"].actors, pools["Generator"].cpus_each) == (3, 2)
    assert (pools["Upscaler"].actors, pools["Beautifier"].cpus_each) == (2, 0.2)


def test_submit_refuses_an_unreachable_dashboard_in_seconds_with_one_line():
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = k3batch("submit", "configs/demo.yaml", "--address", closed)
    assert_one_line_error(proc, f"--address: cannot reach the Ray Jobs API at {closed}")
    # A port that takes the connection and never answers: Ray's client would wait for ever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = k3batch("submit", "configs/demo.yaml", env={"RAY_ADDRESS": address})
    assert_one_line_error(proc, f"RAY_ADDRESS: cannot reach the Ray Jobs API at {address}")
    assert "timed out" in proc.stderr
    assert time.monotonic() - started < 60


def test_serve_deployments_on_a_short_cluster_warn_and_fail_only_if_it_can_never_grow(
    ray_local, caplog, monkeypatch
):
    import logging

    from k3batch import gpus
    from k3batch.config import ConfigError
    from k3batch.ray_start import budget
    from k3batch.serve.app import build_app
    from k3batch.serve.launch import load_serve_config

    spec = load_serve_config("configs/serve-demo.yaml", ["generator.num_cpus=100"])
    pools = budget.deployment_pools(build_app(spec["applications"][0]["args"]))
    free, total = budget.ray_resources()  # the test's Ray: one k3batch joined, not started
    with caplog.at_level(logging.WARNING, logger="k3batch.ray_start.budget"):
        budget.check_deployments(pools, free, total, local=False, address_hint="--address")
    assert "serve: Generator asks 1 replica x 100 CPUs, but the cluster Ray has" in caplog.text
    assert "its replicas will wait until the cluster grows" in caplog.text
    # An autoscaler that publishes its node groups can say it will never have them.
    monkeypatch.setattr(gpus, "autoscaler_limits_of", lambda resource: (16, 8))
    with pytest.raises(ConfigError, match=r"the cluster can grow to 16 CPUs, at most 8 on a"):
        budget.check_deployments(pools, free, total, local=False, address_hint="--address")
    with pytest.raises(ConfigError, match=r"Generator asks 1 replica x 100 CPUs, but the local"):
        budget.check_deployments(pools, free, total, local=True, address_hint="--address")
