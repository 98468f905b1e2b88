"""The Serve app on local Ray over real HTTP: the official openai client and raw requests."""

import asyncio
import base64
import io
import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from k3batch.config import ConfigError
from k3batch.model.kandinsky3 import Request

from .conftest import FP32, assert_same_images

pytestmark = pytest.mark.slow
KEY = "sk-test-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_dir, tmp_path_factory):
    from ray import serve

    from k3batch.serve.app import build_app

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\nsk-other\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": {"path": tiny_dir, "dtype": FP32, "device": "cpu"},
        "generation": {"num_inference_steps": 2, "width": 64, "height": 64, "seed": -1},
        "limits": {"max_side": 256, "max_n": 3, "max_request_bytes": 4096},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3},
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 4, "max_queued_requests": 8},
        "request_timeout_s": 3,
        "retry_after_s": 7,
        "auth": {"api_keys_file": str(keys)},
        "output_uri": str(tmp_path_factory.mktemp("served")),
    }
    serve.run(build_app(args), name="k3", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "args": args}
    serve.shutdown()


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_client_generates_images_matching_the_batch_pipeline(server, tiny_model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(
        model="kandinsky3",
        prompt="a red fox in the snow",
        n=2,
        size="128x64",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 3},
    )
    assert len(result.data) == 2 and result.created > 0
    images = [png_pixels(d.b64_json) for d in result.data]
    assert images[0].shape == (64, 128, 3) and not np.array_equal(images[0], images[1])
    # Image i of a request uses seed + i: the same pixels as the batch pipeline's sampler
    # (with the replica's torch thread count: Ray gives a 0.5-CPU replica one thread, and
    # CPU kernels round differently with other thread counts).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, image in enumerate(images):
            expected = tiny_model.generate(
                [Request("a red fox in the snow", None, 7 + i, 128, 64, 3, 3.0)]
            )[0]
            # Batch of 2 on the server, 1 here: equal up to float rounding (conftest).
            assert_same_images([image], [expected])
    finally:
        torch.set_num_threads(threads)
    models = client.models.list()
    assert [m.id for m in models.data] == ["kandinsky3"]


def test_concurrent_requests_are_batched_and_keep_their_own_seeds(server):
    from ray import serve

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [{"prompt": f"a boat number {i}", "seed": 100 + i} for i in range(4)]
            together = await asyncio.gather(
                *(
                    client.post(f"{server['url']}/v1/images/generations", json=b, headers=auth())
                    for b in bodies
                )
            )
            alone = [
                await client.post(f"{server['url']}/v1/images/generations", json=b, headers=auth())
                for b in bodies
            ]
            return together, alone

    together, alone = asyncio.run(burst())
    assert all(r.status_code == 200 for r in together + alone), [
        (r.status_code, r.text[:200]) for r in together + alone if r.status_code != 200
    ]
    # Batched on the server vs one at a time: equal up to float rounding (see conftest).
    assert_same_images(
        [png_pixels(a.json()["data"][0]["b64_json"]) for a in together],
        [png_pixels(b.json()["data"][0]["b64_json"]) for b in alone],
    )
    sizes = (
        serve.get_deployment_handle("Generator", app_name="k3")
        .observed_batch_sizes.remote()
        .result()
    )
    assert max(sizes) > 1, sizes


def test_health_and_url_response_format(server):
    assert httpx.get(f"{server['url']}/healthz").json()["status"] == "ok"
    r = httpx.post(
        f"{server['url']}/v1/images/generations",
        headers=auth(),
        timeout=60,
        json={"prompt": "a lighthouse", "response_format": "url", "seed": 1},
    )
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(server["args"]["output_uri"]) and url.endswith(".png")
    assert Image.open(url).size == (64, 64)


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        (b"{not json", None, 400, None),
        (b"[1, 2]", None, 400, None),
        ({"prompt": "a cat", "colour": "red"}, None, 400, "colour"),
        ({"prompt": "a cat", "size": "65x64"}, None, 400, "size"),
        ({"prompt": "a cat", "size": "big"}, None, 400, "size"),
        ({"prompt": "a cat", "size": "4096x4096"}, None, 400, "size"),
        ({"prompt": "a cat", "n": 4}, None, 400, "n"),
        ({"prompt": "a cat", "n": 0}, None, 400, "n"),
        ({"prompt": "   "}, None, 400, "prompt"),
        ({"prompt": "a cat", "guidance_scale": -1}, None, 400, "guidance_scale"),
        ({"prompt": "a cat", "num_inference_steps": 0}, None, 400, "num_inference_steps"),
        ({"prompt": "a cat", "seed": -5}, None, 400, "seed"),
        ({"prompt": "a cat", "model": "dall-e-3"}, None, 404, "model"),
        ({"prompt": "x" * 5000}, None, 413, None),
        ({"prompt": "a cat"}, {"Authorization": "Bearer wrong"}, 401, None),
        ({"prompt": "a cat"}, {}, 401, None),
    ],
)
def test_errors_use_the_openai_error_shape(server, body, headers, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(
        f"{server['url']}/v1/images/generations",
        headers=auth() if headers is None else headers,
        timeout=30,
        **kwargs,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param


def test_serve_metrics_are_exported_with_app_serve(server):
    """After the requests above, Ray's metrics endpoint shows the Serve app's own metrics."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from k3batch.metrics import metrics_url

    url = metrics_url()
    assert url, "Ray exposes no metrics port"

    def totals():
        found = {}
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for sample in family.samples:
                if sample.name.startswith("ray_k3batch") and sample.labels.get("app") == "serve":
                    key = (sample.name, sample.labels.get("stage"), sample.labels.get("kind"))
                    found[key] = found.get(key, 0) + sample.value
        return found

    deadline, found = time.time() + 60, {}
    wanted = [
        ("ray_k3batch_images_generated_total", "generate", None),
        ("ray_k3batch_rows_processed_total", "request", None),
        ("ray_k3batch_errors_total", "request", "size"),
        ("ray_k3batch_errors_total", "request", "invalid_api_key"),
        ("ray_k3batch_stage_seconds_count", "request", None),
        ("ray_k3batch_stage_seconds_count", "generate", None),
    ]
    while time.time() < deadline:
        found = totals()
        if all(found.get(key, 0) > 0 for key in wanted):
            break
        time.sleep(1)
    assert all(found.get(key, 0) > 0 for key in wanted), {k: found.get(k) for k in wanted}


def test_unknown_route_and_edits_without_inpainting_model(server):
    r = httpx.get(f"{server['url']}/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.post(f"{server['url']}/v1/images/edits", headers=auth())
    assert r.status_code == 404 and "inpainting" in r.json()["error"]["message"]


def test_burst_beyond_the_queue_bound_is_refused_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": "a storm", "num_inference_steps": 40}
            return await asyncio.gather(
                *(
                    client.post(f"{server['url']}/v1/images/generations", json=body, headers=auth())
                    for _ in range(16)
                )
            )

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    # At most max_ongoing_requests (4) + max_queued_requests (8) are admitted; the rest is
    # refused at once. Admitted ones finish (200) or, on a loaded machine, hit the 3 s timeout.
    refused = [r for r in responses if r.status_code == 429]
    admitted = [r for r in responses if r.status_code != 429]
    assert len(refused) >= 16 - 12 and len(admitted) <= 12, codes
    assert all(r.status_code == 200 or "within 3 s" in r.text for r in admitted), codes
    assert all(r.headers["retry-after"] == "7" for r in responses if r.status_code != 200)
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)


def test_a_request_over_its_timeout_gets_503(server):
    r = httpx.post(
        f"{server['url']}/v1/images/generations",
        headers=auth(),
        timeout=60,
        json={"prompt": "a slow one", "size": "256x256", "num_inference_steps": 400},
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert "within 3 s" in r.json()["error"]["message"]


def test_serve_configs_validate_and_bad_args_fail_with_one_line(tmp_path):
    from k3batch.serve.launch import load_serve_config

    for name in ("serve-demo.yaml", "serve.yaml"):
        spec = load_serve_config(f"configs/{name}")
        assert spec["applications"][0]["import_path"] == "k3batch.serve.app:build_app"
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args: limits\.max_n"):
        load_serve_config("configs/serve-demo.yaml", ["limits.max_n=0"])


def test_k3batch_serve_command_serves_the_demo_config(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k3batch.cli",
            "serve",
            "configs/serve-demo.yaml",
            "--port",
            str(port),
            "--set",
            f"model.path={tmp_path / 'tiny'}",
            "--set",
            "generator.num_cpus=0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            timeout=120,
            json={"prompt": "a tiny boat", "num_inference_steps": 2},
        )
        assert r.status_code == 200, r.text
        assert png_pixels(r.json()["data"][0]["b64_json"]).shape == (128, 128, 3)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
