"""Kandinsky 2.2 through Serve, over real HTTP with the official openai client: generations on
`kandinsky2.2`, edits on `kandinsky2.2-inpaint`, and /v1/images/variations, from one app on
the tiny 2.2 set (64x64, 2 prior and 2 decoder steps); generations with a depth `hint` on
`kandinsky2.2-controlnet-depth`, from a second app beside it on the same Serve."""

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from k3batch.config import ConfigError
from k3batch.model import family

from .conftest import assert_same_images, free_port

SIZE = "64x64"
REPO = Path(__file__).resolve().parent.parent


def args_for(tiny_k22: str) -> dict:
    def model(member):
        return {
            "name": member,
            "path": f"{tiny_k22}/{'decoder-inpaint' if member == family.K22_INPAINT else 'decoder'}",
            "prior_path": f"{tiny_k22}/prior",
            "device": "cpu",
        }

    steps = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "seed": -1}
    return {
        "model": model(family.K22),
        "generation": {**steps, "width": 64, "height": 64},
        "inpaint_model": model(family.K22_INPAINT),
        "inpaint_generation": steps,
        "limits": {"max_side": 256, "max_n": 2, "max_upload_bytes": 200_000},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 4},
        "inpaint_generator": {"num_cpus": 0.25, "max_ongoing_requests": 4},
        "request_timeout_s": 120,
    }


@pytest.fixture(scope="module")
def k22_server(ray_local, tiny_k22):
    from ray import serve

    from k3batch.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args_for(tiny_k22)), name="k22", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(k22_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{k22_server}/v1", api_key="unused", max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.slow
def test_generations_with_the_prior_settings(client):
    def generate(**extra):
        result = client.images.generate(
            model="kandinsky2.2",
            prompt="a red fox",
            n=2,
            size=SIZE,
            response_format="b64_json",
            extra_body={"seed": 3, **extra},
        )
        return [d.b64_json for d in result.data]

    first = generate()
    images = [pixels(b) for b in first]
    assert [i.shape for i in images] == [(64, 64, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # seeds 3 and 4
    # The same request, the same images (up to float rounding when batched otherwise).
    assert_same_images([pixels(b) for b in generate()], images)
    # The prior's guidance is the row's: off (w <= 1) changes the embedding, so the image.
    assert generate(prior_guidance_scale=1.0)[0] != first[0]
    assert [m.id for m in client.models.list().data] == ["kandinsky2.2", "kandinsky2.2-inpaint"]


@pytest.mark.slow
def test_edits_on_the_inpainting_member(client):
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # OpenAI's mask: transparent = repaint (the left half)
    mask = png(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA")

    def edit(image, mask_bytes=mask):
        result = client.images.edit(
            model="kandinsky2.2-inpaint",
            image=("picture.png", png(image), "image/png"),
            mask=("mask.png", mask_bytes, "image/png"),
            prompt="a red door",
            response_format="b64_json",
            extra_body={"seed": 11},
        )
        assert len(result.data) == 1
        return result.data[0].b64_json

    first = edit(picture(0))
    assert pixels(first).shape == (64, 64, 3)
    assert_same_images([pixels(edit(picture(0)))], [pixels(first)])
    # The kept half comes from the uploaded image: another image gives another result.
    assert edit(picture(1)) != first
    other = alpha.copy()
    other[:, :] = 255
    other[:32, :] = 0  # the top half repainted instead
    assert (
        edit(picture(0), png(np.dstack([np.zeros((64, 64, 3), np.uint8), other]), "RGBA")) != first
    )


@pytest.mark.slow
def test_variations_come_from_the_uploaded_image(client):
    def vary(image, seed=5, n=2):
        result = client.images.create_variation(
            model="kandinsky2.2",
            image=("picture.png", png(image), "image/png"),
            n=n,
            size=SIZE,
            response_format="b64_json",
            extra_body={"seed": seed},
        )
        return [d.b64_json for d in result.data]

    first = vary(picture(0))
    assert [pixels(b).shape for b in first] == [(64, 64, 3)] * 2
    assert first[0] != first[1]  # seeds 5 and 6
    # The same image and seed, the same variation (n=1 runs alone: equal up to rounding).
    assert_same_images([pixels(b) for b in vary(picture(0), n=1)], [pixels(first[0])])
    other = pixels(vary(picture(1), n=1)[0])  # another image, another variation
    assert np.abs(other.astype(int) - pixels(first[0]).astype(int)).max() > 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({}, {}, 400, "image"),
        ({"image": b"not a png"}, {}, 400, "image"),
        ({"image": "picture", "mask": "picture"}, {}, 400, "mask"),
        ({"image": "picture"}, {"prompt": "a cat"}, 400, "prompt"),
        ({"image": "picture"}, {"n": "3"}, 400, "n"),
        (
            {"image": "picture"},
            {"prior_num_inference_steps": "0"},
            400,
            "prior_num_inference_steps",
        ),
        ({"image": "picture"}, {"model": "dall-e-2"}, 404, "model"),
    ],
)
def test_variation_errors_name_the_field(k22_server, files, data, status, param):
    blobs = {"picture": png(picture(0))}
    upload = {k: (f"{k}.png", blobs.get(v, v), "image/png") for k, v in files.items()}
    # No file at all: a multipart form with one text field (n), as a client would send it.
    upload = upload or {"n": (None, "1")}
    r = httpx.post(f"{k22_server}/v1/images/variations", files=upload, data=data, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.slow
def test_a_controlnet_hint_on_kandinsky22_is_a_400_saying_why(k22_server):
    hint = base64.b64encode(png(picture(0))).decode()
    body = {"prompt": "a cat", "hint": hint}
    r = httpx.post(f"{k22_server}/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hint", r.text
    assert "works with kandinsky3 only" in r.json()["error"]["message"], r.text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("generations", "scheduler", "nope"),
        ("generations", "scheduler", "euler"),  # a real sampler name, but not 2.2's
        ("edits", "scheduler", "unipc"),
    ],
)
def test_a_setting_the_served_member_does_not_take_is_a_400_naming_it(
    k22_server, route, field, value
):
    """The batch job runs such a row with a warning; a request naming it is refused (the
    same rule: the member's declared row capabilities)."""
    if route == "generations":
        body = {"prompt": "a cat", "size": "64x64", field: value}
        r = httpx.post(f"{k22_server}/v1/images/generations", json=body, timeout=60)
    else:
        files = {
            k: (f"{k}.png", png(picture(i)), "image/png") for i, k in enumerate(("image", "mask"))
        }
        data = {"prompt": "a cat", field: value}
        r = httpx.post(f"{k22_server}/v1/images/edits", files=files, data=data, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "ignored by kandinsky2.2" in error["message"], r.text


DEPTH_HINT = str(REPO / "data" / "kandinsky22" / "house_depth.png")  # 128 px: resized to 64


@pytest.fixture(scope="module")
def depth_server(k22_server, tiny_k22):
    """Kandinsky 2.2 ControlNet depth at /depth on the Serve of `k22_server` (its start-up
    is the costly part on 2 cores); started only by the tests that use it."""
    from ray import serve

    from k3batch.serve.app import build_app

    base = args_for(tiny_k22)
    args = {k: v for k, v in base.items() if not k.startswith("inpaint") and k != "generator"} | {
        "model": {
            "name": family.K22_DEPTH,
            "path": f"{tiny_k22}/controlnet-depth",
            "prior_path": f"{tiny_k22}/prior",
            "device": "cpu",
        },
        "generator": {"num_cpus": 0.25, "max_ongoing_requests": 4},
    }
    serve.run(build_app(args), name="k22depth", route_prefix="/depth")
    yield f"{k22_server}/depth", args
    serve.delete("k22depth")


@pytest.mark.slow
def test_a_depth_hint_generates_the_batch_paths_image(depth_server):
    """`hint` on /v1/images/generations of Kandinsky 2.2 ControlNet depth: each image is the
    batch path's (the row's hint through the prepare stage, then the member's model as a
    job loads it) for the same seed and settings; the hint is required, and Kandinsky 3's
    ControlNet settings are 400s naming them."""
    import torch

    from k3batch.config import ModelConfig
    from k3batch.model.request import Request
    from k3batch.stages.prepare import PrepareImagesStage

    from .conftest import row_capabilities

    url, args = depth_server
    hint = Path(DEPTH_HINT).read_bytes()
    # The tiny ControlNet's hint moves the image mostly through guidance: at 2 steps and
    # guidance 3 by a grey level or two, at 4 steps and guidance 8 by tens.
    settings = {"num_inference_steps": 4, "guidance_scale": 8.0, "prior_guidance_scale": 2.5}

    def generate(**body):
        body = {"prompt": "a tower", "size": SIZE, "seed": 3, **settings, **body}
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)

    b64 = base64.b64encode(hint).decode()
    r = generate(n=2, hint=f"data:image/png;base64,{b64}")
    assert r.status_code == 200, r.text
    served = [pixels(d["b64_json"]) for d in r.json()["data"]]
    # The batch job's path: the row's hint read and resized by the prepare stage, then the
    # member loaded from the same model section, one row at a time.
    prepared = PrepareImagesStage(capabilities=row_capabilities(name=family.K22_DEPTH))(
        {"id": ["r"], "width": [64], "height": [64], "status": ["ok"], "error": [None]}
        | {"hint": [hint]}
    )
    hint_rgb = np.frombuffer(prepared["hint_rgb"][0], np.uint8).reshape(64, 64, 3)
    model = family.of(family.K22_DEPTH).load(ModelConfig(**args["model"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count (0.25 CPU -> 1 thread)
    try:
        expected = [
            model.generate(
                [
                    Request(
                        "a tower",
                        None,
                        3 + i,
                        64,
                        64,
                        settings["num_inference_steps"],
                        settings["guidance_scale"],
                        prior_num_inference_steps=2,
                        prior_guidance_scale=settings["prior_guidance_scale"],
                        hint=hint_rgb,
                    )
                ]
            )[0]
            for i in range(2)
        ]
    finally:
        torch.set_num_threads(threads)
    assert_same_images(served, expected)
    # The hint steers the image: another depth map (plain base64 this time), another image.
    flat = base64.b64encode(png(np.zeros((64, 64, 3), np.uint8))).decode()
    other = generate(hint=flat)
    assert other.status_code == 200, other.text
    assert np.abs(pixels(other.json()["data"][0]["b64_json"]).astype(int) - served[0]).max() > 1
    for body, param, says in (
        ({}, "hint", "needs a depth image"),
        ({"hint": "@@@ not base64"}, "hint", "hint"),
        ({"hint": b64, "controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale", ""),
        ({"hint": b64, "scheduler": "unipc"}, "scheduler", "ignored by"),
    ):
        r = generate(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert says in r.json()["error"]["message"], r.text
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [family.K22_DEPTH]


def test_serve_config_names_and_refusals():
    from k3batch.serve.config import ServeAppConfig
    from k3batch.serve.launch import load_serve_config

    cfg = ServeAppConfig.model_validate(args_for("/no/tiny/set"))  # paths load in replicas
    assert (cfg.served_model_name, cfg.inpaint_served_model_name) == (
        "kandinsky2.2",
        "kandinsky2.2-inpaint",
    )
    assert cfg.generation.prior_num_inference_steps == 2
    # ControlNet depth is served at /v1/images/generations, by its own name.
    depth = ServeAppConfig.model_validate({"model": {"name": family.K22_DEPTH}})
    assert depth.served_model_name == family.K22_DEPTH
    with pytest.raises(ValueError, match="model.name: kandinsky2.2-inpaint needs an image and"):
        ServeAppConfig.model_validate({"model": {"name": family.K22_INPAINT}})
    spec = load_serve_config("configs/serve-kandinsky22.yaml")
    app = ServeAppConfig.model_validate(spec["applications"][0]["args"])
    assert app.model.name == family.K22 and app.inpaint_model.name == family.K22_INPAINT
    depth_spec = load_serve_config("configs/serve-kandinsky22-depth.yaml")
    depth_app = ServeAppConfig.model_validate(depth_spec["applications"][0]["args"])
    assert depth_app.served_model_name == family.K22_DEPTH
    with pytest.raises(ConfigError, match=r"generation\.prior_guidance_scale"):
        load_serve_config("configs/serve-kandinsky22.yaml", ["generation.prior_guidance_scale=-1"])
