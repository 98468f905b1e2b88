"""Kandinsky 3 IP-Adapter in jobs: `model.ip_adapter`, the `ip_images` / `ip_adapter_scale`
columns, rows through ValidateStage -> PrepareImagesStage -> GenerateStage (no Ray), and the
image embeddings against CLIP run directly (transformers, not k3batch's encoder)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from k3batch.config import ModelConfig
from k3batch.model import family
from k3batch.model.kandinsky3 import layout
from k3batch.rows.rules import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.validate import ValidateStage

from .conftest import assert_same_images, row_capabilities

torch = pytest.importorskip("torch")

FP32 = {"unet": "float32", "text_encoder": "float32", "movq": "float32"}
RULES = dict(width=64, height=64, num_inference_steps=2)


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def picture(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)


def test_model_ip_adapter_is_base_only_and_resolves_its_paths(tiny_dir):
    tiny = ModelConfig(path=tiny_dir, make_tiny=True, ip_adapter={})
    folder = os.path.join(tiny_dir, "ip_adapter")
    assert layout.ip_adapter_paths(tiny) == (folder, os.path.join(folder, "image_encoder"))
    given = ModelConfig(path=tiny_dir, ip_adapter={"path": "/w/adapter.safetensors"})
    assert layout.ip_adapter_paths(given) == (
        "/w/adapter.safetensors",
        layout.IP_ADAPTER_IMAGE_ENCODER,
    )
    assert layout.ip_adapter_paths(ModelConfig(path=tiny_dir)) is None
    with pytest.raises(ValueError, match="model.ip_adapter.path: required"):
        ModelConfig(path=tiny_dir, ip_adapter={})
    with pytest.raises(ValueError, match="model.ip_adapter: .*kandinsky3-flash"):
        ModelConfig(name=family.FLASH, path=tiny_dir, make_tiny=True, ip_adapter={})
    with pytest.raises(ValueError, match="scale"):
        ModelConfig(path=tiny_dir, make_tiny=True, ip_adapter={"scale": 1.0})


def test_ip_columns_are_validated_naming_the_field():
    rules = RowRules(
        capabilities=row_capabilities(ip_adapter={"path": "ip_adapter.safetensors"}), **RULES
    )
    items = [
        [{"image": b"x", "weight": 0.5}],
        [{"image": "a.png"}],
        [],
        [{"image": None, "weight": 1.0}],
        [{"image": b"x"}, {"image": b"x", "weight": "heavy"}],
        [{"image": b"x", "weight": float("inf")}],
        [{"image": b"x"}],
        None,
        [{"image": " "}],
        "a.png",
    ]
    n = len(items)
    scales = [None, 0.3, None, None, None, None, -1.0, 0.5, None, None]
    batch = {"prompt": ["p"] * n, "row_hash": list(range(n)), "ip_images": items}
    out = ValidateStage(rules)({**batch, "ip_adapter_scale": scales})
    assert out["status"] == ["ok", "ok"] + ["error"] * 5 + ["ok", "error", "error"]
    assert out["ip_adapter_scale"][:2] == [1.0, 0.3]
    errors = out["error"]
    assert errors[2].startswith("ip_images: expected a non-empty list of {image, weight}")
    assert errors[3].startswith("ip_images[0].image: missing (null)")
    assert errors[4] == "ip_images[1].weight: expected a number, got 'heavy'"
    assert errors[5] == "ip_images[0].weight: must be finite, got inf"
    assert errors[6] == "ip_adapter_scale: must be finite and >= 0, got -1.0"
    # A row without images records no scale and says its scale was ignored.
    assert out["ip_adapter_scale"][7] is None
    assert out["warning"][7].startswith("ip_adapter_scale: ignored, the row has no ip_images")
    assert errors[8].startswith("ip_images[0].image: empty URI")
    assert errors[9].startswith("ip_images: expected a non-empty list")
    # Without model.ip_adapter: images are a row error naming the field, a scale a warning.
    plain = ValidateStage(RowRules(**RULES))(
        {"prompt": ["p", "q"], "row_hash": [1, 2], "ip_images": [[{"image": b"x"}], None],
         "ip_adapter_scale": [None, 0.5]}
    )  # fmt: skip
    assert plain["status"] == ["error", "ok"]
    assert plain["error"][0].startswith("ip_images: image prompts need model.ip_adapter")
    assert plain["warning"][1].startswith("ip_adapter_scale: ignored without model.ip_adapter")
    assert "ip_adapter_scale" not in plain


@pytest.fixture(scope="module")
def stage(tiny_dir, one_torch_thread):
    folder = os.path.join(tiny_dir, "ip_adapter")
    return GenerateStage(
        ModelConfig(
            name=family.BASE,
            path=tiny_dir,
            dtype=FP32,
            device="cpu",
            ip_adapter={"path": folder, "image_encoder": os.path.join(folder, "image_encoder")},
        )
    )


def test_image_prompt_rows_differ_from_plain_rows_only_through_their_images(
    stage, tiny_model, tmp_path
):
    from k3batch.model.request import Request

    first, second = picture(1), picture(2, (30, 52))
    Image.fromarray(first).save(tmp_path / "first.png")
    rules = RowRules(
        capabilities=row_capabilities(ip_adapter={"path": "ip_adapter.safetensors"}),
        max_side=128,
        **RULES,
    )
    prompts = [
        None,
        [{"image": "first.png", "weight": 1.0}],
        [{"image": png(second)}],
        [{"image": "first.png", "weight": 0.7}, {"image": png(second), "weight": 0.3}],
        [{"image": png(first)}, {"image": b"not an image"}],
        [{"image": png(picture(3, (200, 20)))}],
    ]
    n = len(prompts)
    batch = {
        "prompt": ["a red fox"] * n,
        "row_hash": list(range(n)),
        "seed": [5] * n,
        "ip_images": prompts,
        "ip_adapter_scale": [None, None, 0.0, 0.8, None, None],
    }
    batch = {**batch, **ValidateStage(rules)(batch)}
    prepare = PrepareImagesStage(
        max_side=128,
        base_dir=str(tmp_path),
        capabilities=row_capabilities(ip_adapter={"path": "ip_adapter.safetensors"}),
    )
    batch = {**batch, **prepare(batch)}
    out = stage(batch)
    assert out["status"] == ["ok"] * 4 + ["error"] * 2
    assert out["error"][4].startswith("ip_images[1].image: not a readable image")
    assert out["error"][5] == "ip_images[0].image: 200x20 is above limits.max_side=128"
    assert batch["ip_adapter_scale"][:4] == [None, 1.0, 0.0, 0.8]
    plain, one, zero, mixed = (
        np.frombuffer(b, np.uint8).reshape(64, 64, 3) for b in out["image_rgb"][:4]
    )
    # The plain row and the scale-0 row are the model's image without the adapter: bit for bit
    # on the same batch (the same shapes and positions run the same kernels), to float32
    # rounding alone or at another position (with AVX2 kernels two equal rows of one batch
    # can differ in the last bit: docs/testing.md).
    row = Request("a red fox", None, 5, 64, 64, 2, 3.0)
    same_batch = tiny_model.generate([row] * 4)
    assert np.array_equal(plain, same_batch[0]) and np.array_equal(zero, same_batch[2])
    assert_same_images([plain], tiny_model.generate([row]))
    assert_same_images([zero], [plain])
    assert np.abs(one.astype(int) - plain).mean() > 1
    assert np.abs(mixed.astype(int) - one).mean() > 1
    # A row's image does not depend on the rows beside it (to float32 rounding: conftest).
    alone = Request("a red fox", None, 5, 64, 64, 2, 3.0, ip_images=[(first, 1.0)])
    assert_same_images(stage.pipe.generate([alone]), [one])
    # A batch without image prompts skips the adapter: the plain model's image.
    assert_same_images(stage.pipe.generate([row]), [plain])


def test_embeddings_are_clip_image_embeds_mixed_by_weight(stage):
    """The oracle: transformers' CLIP run here on its processor's pixels, mixed as the fork's
    pipeline mixes (sum of weight * embedding); the zero image for rows without images."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from k3batch.model.request import Request

    folder = stage.pipe.image_prompts.encoder.model.name_or_path
    clip = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    a, b = picture(4), picture(5, (64, 24))

    def embed(pixels):
        with torch.no_grad():
            return clip(pixel_values=pixels).image_embeds[0]

    def clip_of(image):
        return embed(processor(images=image, return_tensors="pt").pixel_values)

    rows = [
        Request(
            "p", None, 1, 64, 64, 2, 3.0, ip_images=[(a, 0.25), (b, 2.0)], ip_adapter_scale=0.5
        ),
        Request("p", None, 1, 64, 64, 2, 3.0),
    ]
    embeds, scales = stage.pipe.image_prompts.row_embeddings(rows)
    torch.testing.assert_close(embeds[0], 0.25 * clip_of(a) + 2.0 * clip_of(b))
    size = clip.config.image_size
    torch.testing.assert_close(embeds[1], embed(torch.zeros(1, 3, size, size)))
    assert scales.tolist() == [0.5, 0.0]


def test_guided_sampling_with_image_prompts_matches_a_reference_loop(stage, tiny_dir):
    """The reference's DDIM loop (tests/reference_oracle.py) on its own UNet with the tiny
    adapter attached, the cond half conditioned on the row's CLIP embeddings mixed by weight
    (transformers run here), the uncond half on the zero image's, both at the row's scale
    (docs/ip-adapter.md); rows of other images, weights (not summing to 1), scales, guidance
    and a plain row in one batch."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from k3batch.model.adapters import ip_adapter
    from k3batch.model.request import Request

    from .reference_oracle import Oracle

    folder = os.path.join(tiny_dir, "ip_adapter")
    oracle = Oracle(tiny_dir)
    adapter = ip_adapter.load(oracle.unet, folder)
    encoder = os.path.join(folder, "image_encoder")
    clip = CLIPVisionModelWithProjection.from_pretrained(encoder).eval()
    processor = CLIPImageProcessor.from_pretrained(encoder)
    size = clip.config.image_size

    def embed(pixels):
        with torch.no_grad():
            return clip(pixel_values=pixels).image_embeds

    zero = embed(torch.zeros(1, 3, size, size))
    a, b, c = picture(11), picture(12, (64, 24)), picture(13, (30, 52))
    rows = [
        Request("a red fox", "blurry", 7, 64, 64, 4, 4.5, ip_images=[(a, 0.25), (b, 2.0)],
                ip_adapter_scale=0.6),
        Request("a lighthouse at dawn", None, 8, 64, 64, 4, 2.0, ip_images=[(c, 1.0)],
                ip_adapter_scale=1.3),
        Request("a teapot", None, 9, 64, 64, 4, 5.0),
    ]  # fmt: skip
    latents = stage.pipe.sample(rows)
    for r, latent in zip(rows, latents, strict=True):
        if r.ip_images:
            mixed = sum(
                w * embed(processor(images=im, return_tensors="pt").pixel_values)
                for im, w in r.ip_images
            )
            scale = torch.tensor([r.ip_adapter_scale] * 2)
            with adapter.conditioned(torch.cat([mixed, zero]), scale):
                want, _ = oracle(r.prompt, r.seed, r.guidance_scale, 4, 64, r.negative_prompt)
        else:
            want, _ = oracle(r.prompt, r.seed, r.guidance_scale, 4, 64, r.negative_prompt)
        torch.testing.assert_close(latent[None], want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_conditioned_job_on_the_shipped_demo_table_with_bad_rows(ray_local, tmp_path, tiny_dir):
    """ControlNet hints and image prompts in one job on local Ray (the conditioning demo's
    table), with bad rows that become errors naming their field, and rows in = rows out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from k3batch.config import load_config
    from k3batch.job.run import run_job

    from .conftest import job_config
    from .test_job import read_metadata

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    table = pq.read_table(os.path.join(repo, "data", "conditioning_demo.parquet"))
    rows = table.to_pylist()
    for r in rows:
        r["seed"] = 11  # one seed for all: the rows differ only by their conditioning
        if r["hint"]:
            r["hint"] = os.path.join(repo, r["hint"])
        for item in r["ip_images"] or []:
            item["image"] = os.path.join(repo, item["image"])
    bad = [
        {"id": "bad-hint", "prompt": "x", "hint": os.path.join(repo, "nope.png")},
        {"id": "bad-ip", "prompt": "x", "ip_images": [{"image": "nope.png", "weight": 1.0}]},
        {
            "id": "bad-scale",
            "prompt": "x",
            "ip_images": [{"image": rows[3]["ip_images"][0]["image"], "weight": None}],
            "ip_adapter_scale": -2.0,
        },
    ]
    schema = table.schema.append(pa.field("seed", pa.int64()))
    pq.write_table(pa.Table.from_pylist(rows + bad, schema=schema), tmp_path / "in.parquet")
    cfg = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_dir,
        model={
            "make_tiny": True,  # the set exists: its controlnet_hed/ and ip_adapter/ are used
            "controlnet": os.path.join(tiny_dir, "controlnet_hed"),
            "ip_adapter": {},
        },
        generation={"num_inference_steps": 2, "seed": 3},
    )
    result = run_job(load_config(data=cfg))
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    assert result.ok and len(meta) == len(rows) + len(bad)
    assert meta["bad-hint"]["error"].startswith("hint: cannot read")
    assert meta["bad-ip"]["error"].startswith("ip_images[0].image: cannot read")
    assert meta["bad-scale"]["error"] == "ip_adapter_scale: must be finite and >= 0, got -2.0"
    assert result.run["errors_by_field"] == {
        "hint": 1,
        "ip_images[0].image": 1,
        "ip_adapter_scale": 1,
    }
    ok = {k: m for k, m in meta.items() if not k.startswith("bad-")}
    assert all(m["status"] == "ok" for m in ok.values()), ok
    assert "+controlnet(" in ok["plain"]["model"] and "+ip-adapter(" in ok["plain"]["model"]
    # Records name the conditioning each row had, and nothing on a plain row.
    assert (ok["plain"]["controlnet_conditioning_scale"], ok["plain"]["ip_adapter_scale"]) == (
        None,
        None,
    )
    assert ok["hint-tower-half"]["control_guidance_end"] == 0.6
    assert ok["image-fusion"]["ip_adapter_scale"] == 0.8
    assert "ip_images_prepared" not in ok["plain"] and "hint_rgb" not in ok["plain"]

    def pixels(row_id):
        with Image.open(ok[row_id]["image_uri"]) as image:
            return np.asarray(image.convert("RGB"), dtype=int)

    # Same prompt and seed: the hint and the image prompt each change the plain image.
    assert ok["plain"]["seed"] == ok["hint-house"]["seed"] == ok["image-prompt-lake"]["seed"]
    plain = pixels("plain")
    assert np.abs(pixels("hint-house") - plain).mean() > 1
    assert np.abs(pixels("image-prompt-lake") - plain).mean() > 1
