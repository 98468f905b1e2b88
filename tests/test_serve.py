"""The Serve app on local Ray over real HTTP: the official openai client and raw requests."""

import asyncio
import base64
import io
import os
import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from k3batch.config import ConfigError
from k3batch.model.kandinsky3.pipeline import Request

from .conftest import FP32, assert_same_images, row_capabilities

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


def test_kandinsky22_requests_on_a_kandinsky3_server_are_400s_naming_the_field(server):
    """Variations (Kandinsky 2.2's prior) and the prior's settings: 400s naming the field."""
    picture = png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))
    r = httpx.post(
        f"{server['url']}/v1/images/variations",
        headers=auth(),
        files={"image": ("picture.png", picture, "image/png")},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    for name, value in (("prior_num_inference_steps", 2), ("prior_guidance_scale", 1.0)):
        r = httpx.post(
            f"{server['url']}/v1/images/generations",
            headers=auth(),
            json={"prompt": "a cat", name: value},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_unknown_route_and_edits_without_inpainting_model(server):
    r = httpx.get(f"{server['url']}/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.post(f"{server['url']}/v1/images/edits", headers=auth())
    assert r.status_code == 404 and "inpainting" in r.json()["error"]["message"]
    r = httpx.post(f"{server['url']}/v1/images/upscale", headers=auth())
    assert r.status_code == 404 and "upscaling" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def tight(server):
    """A second app whose generator holds one request and queues one: a third is refused."""
    from ray import serve

    from k3batch.serve.app import build_app

    args = {
        **server["args"],
        "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
        "generator": {"num_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 1},
        "request_timeout_s": 300,
    }
    serve.run(build_app(args), name="tight", route_prefix="/tight")
    yield f"{server['url']}/tight"
    serve.delete("tight")


def test_burst_beyond_the_queue_bound_is_refused_with_retry_after(tight):
    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            # Each request runs for seconds (longer on a loaded machine), so the whole burst
            # reaches the generator's handle while the first one runs.
            body = {"prompt": "a storm", "size": "256x256", "num_inference_steps": 80}
            return await asyncio.gather(
                *(
                    client.post(f"{tight}/v1/images/generations", json=body, headers=auth())
                    for _ in range(5)
                )
            )

    responses = asyncio.run(burst())
    shown = [(r.status_code, r.text[:200]) for r in responses]
    admitted = [r for r in responses if r.status_code != 429]
    refused = [r for r in responses if r.status_code == 429]
    # One runs and at most one waits (max_ongoing_requests 1 + max_queued_requests 1); the
    # rest is refused at once instead of queueing. Ray may refuse the waiting one too when
    # requests arrive together (its router says so), never admit more.
    assert 1 <= len(admitted) <= 2 and len(refused) == 5 - len(admitted), shown
    assert all(r.status_code == 200 for r in admitted), shown
    assert all(r.headers["retry-after"] == "7" for r in refused)
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
            "--set",
            f"upscale.path={tmp_path / 'tiny-sr'}",
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
        generated = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert png_pixels(r.json()["data"][0]["b64_json"]).shape == (128, 128, 3)
        # The demo config serves the tiny KandiSuperRes x4 next to the generator.
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/upscale",
            timeout=120,
            files={"image": ("out.png", generated, "image/png")},
            data={"seed": "7"},
        )
        assert r.status_code == 200, r.text
        item = r.json()["data"][0]
        assert (item["width"], item["height"], item["seed"]) == (512, 512, 7)
        assert png_pixels(item["b64_json"]).shape == (512, 512, 3)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------ inpainting and beautify
UPSCALE = {
    "model": "x2",
    "make_tiny": True,
    "device": "cpu",
    "dtype": "float32",
    "window": 32,
    "stride": 24,
    "num_inference_steps": 2,
    "max_output_side": 128,
}


@pytest.fixture(scope="module")
def upscale_args(tmp_path_factory):
    return {**UPSCALE, "path": str(tmp_path_factory.mktemp("sr") / "tiny-sr")}


@pytest.fixture(scope="module")
def full(server, tiny_dir, llm_server, upscale_args):
    """An app with the base model's ControlNet and IP-Adapter (rows without a hint or image
    prompts do not run them), the inpainting model at /v1/images/edits, KandiSuperRes at /v1/images/upscale and a
    beautifier deployment calling a real `vllm serve` of the tiny LLM."""
    from ray import serve

    from k3batch.serve.app import build_app
    from k3batch.testing.tiny import CONTROLNET_FOLDER

    from .conftest import LLM_SERVED_NAME

    args = {
        **server["args"],
        "model": {
            **server["args"]["model"],
            "controlnet": os.path.join(tiny_dir, CONTROLNET_FOLDER),
            "ip_adapter": ip_adapter_paths(tiny_dir),
        },
        "generator": {"num_cpus": 0.25, "max_ongoing_requests": 4, "max_queued_requests": 8},
        "inpaint_model": {
            "name": "kandinsky3-inpaint",
            "path": tiny_dir,
            "dtype": FP32,
            "device": "cpu",
        },
        "inpaint_generation": {"num_inference_steps": 3, "seed": -1},
        "inpaint_generator": {"num_cpus": 0.25, "max_ongoing_requests": 4},
        "beautify": {
            "base_url": llm_server,
            "model": LLM_SERVED_NAME,
            # The tiny model's gibberish is full of '#': no stop strings (see test_beautify).
            "sampling": {"max_tokens": 32, "stop": []},
        },
        "limits": {**server["args"]["limits"], "max_upload_bytes": 200_000},
        "request_timeout_s": 120,
        "upscale": upscale_args,
        "upscaler": {"num_cpus": 0.25},
    }
    serve.run(build_app(args), name="full", route_prefix="/full")
    yield f"{server['url']}/full"
    serve.delete("full")


def ip_adapter_paths(tiny_dir) -> dict:
    folder = os.path.join(tiny_dir, "ip_adapter")
    return {"path": folder, "image_encoder": os.path.join(folder, "image_encoder")}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def edit_inputs():
    """A 64x64 picture and an OpenAI-style mask: transparent (alpha 0) = repaint (left half)."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0
    mask = Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), mode="RGBA")
    return picture, mask


def test_openai_client_edits_inpaint_like_the_batch_pipeline(full, tiny_dir):
    from openai import OpenAI

    from k3batch import images
    from k3batch.stages.prepare import PrepareImagesStage

    from .conftest import load_tiny

    picture, mask = edit_inputs()
    client = OpenAI(base_url=f"{full}/v1", api_key=KEY, max_retries=0)
    result = client.images.edit(
        model="kandinsky3-inpaint",
        image=("picture.png", png_bytes(picture), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a red door",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    served = [png_pixels(d.b64_json) for d in result.data]
    assert served[0].shape == (64, 64, 3) and not np.array_equal(served[0], served[1])

    # The batch job's path: a k3batch mask (white = repaint) through PrepareImagesStage.
    repaint = Image.fromarray(np.where(np.asarray(mask)[..., 3] == 0, 255, 0).astype(np.uint8))
    prepared = PrepareImagesStage()(
        {
            "id": ["r"],
            "width": [None],
            "height": [None],
            "status": ["ok"],
            "error": [None],
            "image": [png_bytes(picture)],
            "mask": [png_bytes(repaint)],
        }
    )
    rgb = np.frombuffer(prepared["source_rgb"][0], np.uint8).reshape(64, 64, 3)
    keep = np.frombuffer(prepared["keep_mask"][0], np.float32).reshape(64, 64)
    assert keep[:, :32].max() == 0 and keep[:, 32:].min() == 1
    model = load_tiny(tiny_dir, "kandinsky3-inpaint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count (0.25 CPU -> 1 thread)
    try:
        expected = [
            model.generate(
                [Request("a red door", None, 11 + i, 64, 64, 3, 4.0, image=rgb, mask=keep)]
            )[0]
            for i in range(2)
        ]
    finally:
        torch.set_num_threads(threads)
    assert_same_images(served, expected)
    # The kept half stays close to the input; the repainted half is new.
    source = images.prepare_image(picture, (64, 64)).astype(int)
    kept_error = np.abs(served[0][:, 40:].astype(int) - source[:, 40:]).mean()
    painted_error = np.abs(served[0][:, :24].astype(int) - source[:, :24]).mean()
    assert kept_error < painted_error
    # The app serves generation, inpainting and upscaling, each under its own name.
    assert [m.id for m in client.models.list().data] == [
        "kandinsky3",
        "kandinsky3-inpaint",
        "kandisuperres-x2",
    ]


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({"mask": "mask"}, {"prompt": "a door"}, 400, "image"),
        ({"image": b"not a png", "mask": "mask"}, {"prompt": "a door"}, 400, "image"),
        ({"image": "picture"}, {"prompt": "a door"}, 400, "mask"),  # no alpha, no mask
        ({"image": "picture", "mask": "small"}, {"prompt": "a door"}, 400, "mask"),
        ({"image": "picture", "mask": "opaque"}, {"prompt": "a door"}, 400, "mask"),
        (
            {"image": "picture", "mask": "mask"},
            {"prompt": "a door", "colour": "red"},
            400,
            "colour",
        ),
        ({"image": "picture", "mask": "mask"}, {"prompt": "a door", "n": "9"}, 400, "n"),
        (
            {"image": "picture", "mask": "mask"},
            {"prompt": "a door", "size": "128x128"},
            400,
            "size",
        ),
        ({"image": "picture", "mask": "mask"}, {"prompt": " "}, 400, "prompt"),
        (
            {"image": "picture", "mask": "mask"},
            {"prompt": "a door", "model": "kandinsky3"},
            404,
            "model",
        ),
        ({"image": "huge", "mask": "mask"}, {"prompt": "a door"}, 413, None),
    ],
)
def test_edits_errors_name_the_field(full, files, data, status, param):
    picture, mask = edit_inputs()
    blobs = {
        "picture": png_bytes(picture),
        "mask": png_bytes(mask),
        "small": png_bytes(mask.resize((32, 32))),
        "opaque": png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 255))),
        "huge": b"\0" * 300_000,
    }
    upload = {
        name: (f"{name}.png", blobs.get(value, value), "image/png") for name, value in files.items()
    }
    r = httpx.post(f"{full}/v1/images/edits", headers=auth(), files=upload, data=data, timeout=60)
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param, r.text


def edge_hint(size: int = 96) -> bytes:
    """A PNG like an HED edge map (white lines on black): a few hundred bytes, so its base64
    fits the test app's 4096-byte bodies; larger than the 64x64 output, so it is resized."""
    edges = np.zeros((size, size, 3), np.uint8)
    edges[::8] = 255
    edges[:, 5::12] = 255
    return png_bytes(Image.fromarray(edges))


def test_controlnet_hint_generates_like_the_batch_pipeline(full, server, tiny_dir):
    """`hint` on /v1/images/generations (a k3batch extension): the batch pipeline's image
    for the same row; at scale 0, the un-hinted image; bad fields are 400s naming them."""
    from openai import OpenAI

    from k3batch.serve.protocol import ApiError
    from k3batch.serve.uploads import b64_image
    from k3batch.stages.prepare import PrepareImagesStage
    from k3batch.testing.tiny import CONTROLNET_FOLDER

    from .conftest import load_tiny

    hint = edge_hint()
    b64 = base64.b64encode(hint).decode()
    settings = {"controlnet_conditioning_scale": 0.8, "control_guidance_end": 0.5}
    client = OpenAI(base_url=f"{full}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(
        model="kandinsky3",
        prompt="a house",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={
            "seed": 5,
            "num_inference_steps": 3,
            "hint": f"data:image/png;base64,{b64}",
            **settings,
        },
    )
    served = [png_pixels(d.b64_json) for d in result.data]
    # The batch job's path: the row's hint through PrepareImagesStage, then the model.
    prepared = PrepareImagesStage(capabilities=row_capabilities(controlnet="controlnet_hed"))(
        {"id": ["r"], "width": [64], "height": [64], "status": ["ok"], "error": [None]}
        | {"hint": [hint]}
    )
    hint_rgb = np.frombuffer(prepared["hint_rgb"][0], np.uint8).reshape(64, 64, 3)
    model = load_tiny(tiny_dir, controlnet=os.path.join(tiny_dir, CONTROLNET_FOLDER))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count (0.25 CPU -> 1 thread)
    try:
        expected = [
            model.generate(
                [Request("a house", None, 5 + i, 64, 64, 3, 3.0, hint=hint_rgb, **settings)]
            )[0]
            for i in range(2)
        ]
    finally:
        torch.set_num_threads(threads)
    assert_same_images(served, expected)

    def generate(url=full, **body):
        body = {"prompt": "a house", "seed": 5, "num_inference_steps": 3, **body}
        return httpx.post(f"{url}/v1/images/generations", json=body, headers=auth(), timeout=120)

    # Scale 0 (plain base64 this time): the ControlNet is not run, the image is the plain one.
    zero = generate(hint=b64, controlnet_conditioning_scale=0)
    plain = generate()
    assert zero.status_code == plain.status_code == 200, (zero.text, plain.text)
    plain_pixels = png_pixels(plain.json()["data"][0]["b64_json"])
    assert np.array_equal(png_pixels(zero.json()["data"][0]["b64_json"]), plain_pixels)
    assert not np.array_equal(served[0], plain_pixels)

    big = base64.b64encode(png_bytes(Image.new("RGB", (512, 512)))).decode()
    for body, param in (
        ({"hint": "@@@ not base64"}, "hint"),
        ({"hint": base64.b64encode(b"not an image").decode()}, "hint"),
        ({"hint": ""}, "hint"),
        ({"hint": big}, "hint"),  # 512 px: above limits.max_side=256
        ({"hint": f"data:image/png,{b64}"}, "hint"),  # not base64
        ({"hint": base64.b64encode(hint[:100]).decode()}, "hint"),  # truncated: prepare stage
        ({"hint": 5}, "hint"),
        ({"hint": b64, "controlnet_conditioning_scale": -1}, "controlnet_conditioning_scale"),
        (
            {"hint": b64, "control_guidance_start": 0.6, "control_guidance_end": 0.4},
            "control_guidance_start",
        ),
        ({"hint": b64, "control_guidance_end": 1.5}, "control_guidance_end"),
        ({"control_guidance_start": "soon"}, "control_guidance_start"),
    ):
        r = generate(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    # The server app has no model.controlnet: the fields are 400s saying so.
    for name, value in (("hint", b64), ("control_guidance_end", 0.5)):
        r = generate(url=server["url"], **{name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
        assert "without model.controlnet" in r.json()["error"]["message"]
    # The helper names the field it is given (a later `ip_images` list reuses it).
    with pytest.raises(ApiError) as refused:
        b64_image("ip_images[0].image", "@@", 64)
    assert refused.value.param == "ip_images[0].image"
    assert refused.value.message.startswith("ip_images[0].image: ")


def test_image_prompts_generate_like_the_batch_pipeline(full, server, tiny_dir):
    """`ip_images` on /v1/images/generations (a k3batch extension): the batch model's image for
    the same row and images; at scale 0 the plain image; bad fields are 400s naming them."""
    from k3batch.model.kandinsky3.pipeline import Kandinsky3

    rng = np.random.default_rng(8)

    def blocks(h, w):  # coarse colour blocks: small PNGs (the app's request limit is 4 KB)
        cells = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), np.uint8))
        return np.asarray(cells.resize((w, h), Image.NEAREST))

    first, second = blocks(40, 56), blocks(64, 32)
    a = base64.b64encode(png_bytes(Image.fromarray(first))).decode()
    b = base64.b64encode(png_bytes(Image.fromarray(second))).decode()

    def generate(url=full, **body):
        body = {"prompt": "a fox", "seed": 9, "num_inference_steps": 3, "size": "64x64", **body}
        return httpx.post(f"{url}/v1/images/generations", json=body, headers=auth(), timeout=120)

    fusion = [{"image": f"data:image/png;base64,{a}", "weight": 0.7}, {"image": b, "weight": 0.3}]
    r = generate(ip_images=fusion, ip_adapter_scale=0.9)
    assert r.status_code == 200, r.text
    served = png_pixels(r.json()["data"][0]["b64_json"])
    paths = ip_adapter_paths(tiny_dir)
    model = Kandinsky3.from_pretrained(
        tiny_dir, dtype=FP32, device="cpu", ip_adapter=(paths["path"], paths["image_encoder"])
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count (0.25 CPU -> 1 thread)
    try:
        images = [(first, 0.7), (second, 0.3)]
        row = Request("a fox", None, 9, 64, 64, 3, 3.0, ip_images=images, ip_adapter_scale=0.9)
        expected = model.generate([row])
    finally:
        torch.set_num_threads(threads)
    assert_same_images([served], expected)
    # Scale 0: the adapter changes nothing; the image prompt does change the plain image.
    zero, plain = generate(ip_images=[{"image": a}], ip_adapter_scale=0), generate()
    assert zero.status_code == plain.status_code == 200, (zero.text, plain.text)
    plain_pixels = png_pixels(plain.json()["data"][0]["b64_json"])
    assert np.array_equal(png_pixels(zero.json()["data"][0]["b64_json"]), plain_pixels)
    assert not np.array_equal(served, plain_pixels)

    truncated = base64.b64encode(png_bytes(Image.fromarray(first))[:80]).decode()
    for body, param in (
        ({"ip_images": []}, "ip_images"),
        ({"ip_images": [{"image": a}, {"image": "@@ not base64"}]}, "ip_images[1].image"),
        ({"ip_images": [{"image": truncated}]}, "ip_images[0].image"),  # the prepare stage
        ({"ip_images": [{"image": a, "weight": "heavy"}]}, "ip_images.0.weight"),
        ({"ip_images": [{"image": a, "size": 3}]}, "ip_images.0.size"),
        ({"ip_images": [{"image": a}], "ip_adapter_scale": -1}, "ip_adapter_scale"),
    ):
        r = generate(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    # The server app has no model.ip_adapter: the fields are 400s saying so.
    for name, value in (("ip_images", [{"image": a}]), ("ip_adapter_scale", 0.5)):
        r = generate(url=server["url"], **{name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
        assert "without model.ip_adapter" in r.json()["error"]["message"]


def test_upscale_route_answers_the_batch_stages_image(full, upscale_args):
    """/v1/images/upscale (a k3batch extension): the same pixels as the batch job's
    upscaling of that image with that seed; errors name the field."""

    from k3batch.config.upscale import UpscaleConfig
    from k3batch.model.superres.loading import load_upscaler

    picture = np.random.default_rng(3).integers(0, 256, (24, 16, 3), np.uint8)
    upload = {"image": ("p.png", png_bytes(Image.fromarray(picture)), "image/png")}
    r = httpx.post(
        f"{full}/v1/images/upscale", headers=auth(), files=upload, data={"seed": "5"}, timeout=60
    )
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert (item["width"], item["height"], item["seed"]) == (32, 48, 5)
    with torch.random.fork_rng():
        model = load_upscaler(UpscaleConfig(**upscale_args))
        expected = model.upscale([picture], [5], num_inference_steps=2)[0]
    # Up to float rounding: the replica's torch threads (and so its kernels' blocking) are
    # not this process's, so a byte on a rounding boundary may flip (conftest).
    assert_same_images([png_pixels(item["b64_json"])], [expected])
    models = httpx.get(f"{full}/v1/models", headers=auth()).json()["data"]
    assert "kandisuperres-x2" in [m["id"] for m in models]
    for files, data, status, param in (
        (upload, {"model": "kandinsky3"}, 404, "model"),
        (
            {"image": ("big.png", png_bytes(Image.new("RGB", (65, 8))), "image/png")},
            {},
            400,
            "image",
        ),
        ({"image": ("junk.png", b"junk", "image/png")}, {}, 400, "image"),
        ({"image": ("empty.png", b"", "image/png")}, {}, 400, "image"),
        (upload, {"seed": "x"}, 400, "seed"),
    ):
        r = httpx.post(
            f"{full}/v1/images/upscale",
            headers=auth(),
            files=files,
            data=data,
            timeout=60,
        )
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param, r.text


@pytest.fixture(scope="module")
def flash(server, upscale_args):
    """An app whose upscale route serves the tiny KandiSuperRes Flash x2 (its generator, on
    0.1 CPU, is only there because every app has one)."""
    from ray import serve

    from k3batch.serve.app import build_app

    upscale = {**upscale_args, "model": "flash-x2"}
    args = {
        **server["args"],
        "generator": {"num_cpus": 0.1, "max_ongoing_requests": 4},
        "request_timeout_s": 120,
        "upscale": upscale,
        "upscaler": {"num_cpus": 0.25},
    }
    serve.run(build_app(args), name="flash", route_prefix="/flash")
    yield f"{server['url']}/flash", upscale
    serve.delete("flash")


def test_upscale_route_serves_flash_x2_as_the_model_upscales(flash):
    """/v1/images/upscale with `upscale.model: flash-x2`: twice the size, the model's own
    image for that picture and seed (its four SR steps and Flash refine); a picture below
    Flash's 32 px a side is a 400 naming `image`, not a failure in the replica."""
    from k3batch.config.upscale import UpscaleConfig
    from k3batch.model.superres.loading import load_upscaler

    url, upscale = flash
    picture = np.random.default_rng(4).integers(0, 256, (48, 32, 3), np.uint8)
    upload = {"image": ("p.png", png_bytes(Image.fromarray(picture)), "image/png")}
    r = httpx.post(
        f"{url}/v1/images/upscale", headers=auth(), files=upload, data={"seed": "9"}, timeout=120
    )
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert (item["width"], item["height"], item["seed"]) == (64, 96, 9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count (0.25 CPU -> 1 thread)
    try:
        with torch.random.fork_rng():
            expected = load_upscaler(UpscaleConfig(**upscale)).upscale([picture], [9])[0]
    finally:
        torch.set_num_threads(threads)
    assert_same_images([png_pixels(item["b64_json"])], [expected])
    models = httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]
    assert "kandisuperres-flash-x2" in [m["id"] for m in models]
    small = {"image": ("s.png", png_bytes(Image.new("RGB", (40, 16))), "image/png")}
    r = httpx.post(f"{url}/v1/images/upscale", headers=auth(), files=small, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    assert "sides must be >= 32 px for flash-x2, got 40x16" in r.json()["error"]["message"]


def test_beautify_revises_the_prompt_and_generates_from_it(full):
    body = {"prompt": "a red cat", "seed": 21, "beautify": True, "num_inference_steps": 2}
    r = httpx.post(f"{full}/v1/images/generations", json=body, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    revised = item["revised_prompt"]
    assert revised and revised.strip() and revised != "a red cat"
    # The same request again: the seed also seeds the LLM, so the same revision.
    again = httpx.post(f"{full}/v1/images/generations", json=body, headers=auth(), timeout=120)
    assert again.json()["data"][0]["revised_prompt"] == revised
    # The image is the revised prompt's: asking for it directly gives the same pixels.
    direct = httpx.post(
        f"{full}/v1/images/generations",
        json={"prompt": revised, "seed": 21, "num_inference_steps": 2},
        headers=auth(),
        timeout=120,
    )
    assert direct.json()["data"][0]["revised_prompt"] is None
    assert_same_images(
        [png_pixels(item["b64_json"])], [png_pixels(direct.json()["data"][0]["b64_json"])]
    )
    # Without beautify the original prompt is used, and beautify on a server without it: 400.
    plain = httpx.post(
        f"{full}/v1/images/generations",
        json={**body, "beautify": False},
        headers=auth(),
        timeout=120,
    )
    assert not np.array_equal(
        png_pixels(plain.json()["data"][0]["b64_json"]), png_pixels(item["b64_json"])
    )


def test_beautify_on_a_server_without_it_is_a_400(server):
    r = httpx.post(
        f"{server['url']}/v1/images/generations",
        json={"prompt": "a cat", "beautify": True},
        headers=auth(),
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "beautify"


def test_online_beautifier_falls_back_or_fails_when_the_llm_is_down(tiny_dir, llm_server):
    from k3batch.serve.beautify import OnlineBeautifier
    from k3batch.serve.config import ServeBeautifyConfig

    from .conftest import LLM_SERVED_NAME

    async def ask(base_url, prompt, **kw):
        cfg = ServeBeautifyConfig(
            base_url=base_url,
            model=LLM_SERVED_NAME,
            sampling={"max_tokens": 180, "stop": []},
            retry_backoff_s=0.01,
            **kw,
        )
        beautifier = OnlineBeautifier(cfg, tiny_dir)
        try:
            return await beautifier.beautify(prompt, 3)
        finally:
            await beautifier.close()

    down = asyncio.run(ask(f"http://127.0.0.1:{free_port()}/v1", "a red cat"))
    assert down.prompt_used == "a red cat" and down.revised_prompt is None
    assert down.fallback == "original:error" and "tries" in down.error
    # A long answer is cut to the text encoder's 128 tokens, or replaced by the original.
    cut = asyncio.run(ask(llm_server, "a castle", on_too_long="truncate"))
    from k3batch.beautify.choose import load_text_tokenizer, token_count

    tokenizer = load_text_tokenizer(tiny_dir)
    assert cut.fallback in ("truncated", "none") and cut.revised_prompt == cut.prompt_used
    assert token_count(tokenizer, cut.prompt_used) <= 128
