"""Rows, config and stages for the family's modes: image/mask inputs, Flash settings."""

import io

import numpy as np
import pytest
from PIL import Image

from k3batch import images
from k3batch.config import ConfigError, ModelConfig, load_config
from k3batch.rows.check import normalise_row
from k3batch.rows.rules import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.validate import ValidateStage

from .conftest import FP32, row_capabilities


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def rgb(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def half_mask(w, h):
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, : w // 2] = 255
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    out = {
        "image": png(rgb(100, 70)),
        "mask": png(half_mask(100, 70)),
        "small_mask": png(half_mask(50, 50)),
        "empty_mask": png(np.zeros((70, 100), np.uint8)),
        "tiny_image": png(rgb(40, 40)),
    }
    for name, data in out.items():
        (d / f"{name}.png").write_bytes(data)
    return d, out


# ------------------------------------------------------------------ rows
def norm(model, **raw):
    raw.setdefault("id", "r1")
    raw.setdefault("prompt", "a cat")
    rules = RowRules(
        width=64,
        height=64,
        num_inference_steps=4,
        capabilities=row_capabilities(name=model),
        guidance_scale=3.0,
    )
    return normalise_row(raw, "prompt", rules)


def test_flash_rows_report_settings_flash_does_not_use():
    row = norm(
        "kandinsky3-flash", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=50
    )
    assert row["status"] == "ok"
    assert [w.split(":")[0] for w in row["warning"].split("; ")] == [
        "negative_prompt",
        "guidance_scale",
        "num_inference_steps",
    ]
    assert "'blurry'" in row["warning"] and "50" in row["warning"]
    assert (row["negative_prompt"], row["guidance_scale"], row["num_inference_steps"]) == (
        None,
        None,
        4,
    )
    assert norm("kandinsky3-flash", num_inference_steps=4)["warning"] is None


@pytest.mark.parametrize(
    ("model", "raw", "error"),
    [
        ("kandinsky3-flash", {"image": "x.png"}, "image: kandinsky3-flash is text-to-image only"),
        ("kandinsky3-inpaint", {"image": "x.png"}, "mask: missing (null)"),
        ("kandinsky3-inpaint", {"mask": "m.png"}, "image: missing (null)"),
        ("kandinsky3", {"mask": "m.png"}, "mask: only kandinsky3-inpaint takes a mask"),
        ("kandinsky3", {"image": 5}, "image: expected a URI or raw bytes, got 5"),
        ("kandinsky3", {"image": b""}, "image: empty bytes"),
        ("kandinsky3", {"image": "  "}, "image: empty URI"),
        ("kandinsky3", {"image": "x.png", "strength": 0.0}, "strength: must be in (0, 1], got 0.0"),
        ("kandinsky3", {"image": "x.png", "strength": 1.5}, "strength: must be in (0, 1], got 1.5"),
    ],
)
def test_image_row_errors_name_the_field(model, raw, error):
    row = norm(model, **raw)
    assert row["status"] == "error" and error in row["error"], row["error"]


def test_image_rows_take_their_size_from_the_image_and_strength_from_the_config():
    row = norm("kandinsky3", image="x.png")
    assert row["status"] == "ok" and (row["width"], row["height"]) == (None, None)
    assert row["strength"] == 0.3
    assert norm("kandinsky3", image="x.png", strength=0.8)["strength"] == 0.8
    text_row = norm("kandinsky3", strength=0.8)
    assert text_row["strength"] is None and text_row["warning"].startswith("strength: ignored")
    assert norm("kandinsky3-inpaint", image="x", mask="m")["guidance_scale"] == 3.0


# ------------------------------------------------------------------ config
def cfg(**model_and_generation):
    model = {k: v for k, v in model_and_generation.items() if k in ("name", "refine", "device")}
    generation = {k: v for k, v in model_and_generation.items() if k not in model}
    return load_config(
        data={
            "input": {"uri": "x"},
            "output": {"uri": "y"},
            "model": model,
            "generation": generation,
        }
    )


def test_config_defaults_follow_the_model():
    assert (cfg().generation.num_inference_steps, cfg().generation.guidance_scale) == (50, 3.0)
    inpaint = cfg(name="kandinsky3-inpaint").generation
    assert (inpaint.num_inference_steps, inpaint.guidance_scale) == (50, 4.0)
    flash = cfg(name="kandinsky3-flash").generation
    assert (flash.num_inference_steps, flash.guidance_scale) == (4, None)
    devices = cfg(device={"unet": "cuda:1", "movq": "cpu"}).model.device_map()
    assert devices == {"unet": "cuda:1", "text_encoder": "auto", "movq": "cpu"}
    assert cfg(device="cpu").model.device_map()["text_encoder"] == "cpu"


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"name": "kandinsky3-flash", "negative_prompt": "dark"}, "generation.negative_prompt"),
        ({"name": "kandinsky3-flash", "guidance_scale": 3.0}, "generation.guidance_scale"),
        ({"name": "kandinsky3-flash", "num_inference_steps": 50}, "generation.num_inference_steps"),
        ({"name": "kandinsky3-inpaint", "refine": True}, "model.refine"),
        ({"strength": 0}, "generation.strength"),
        ({"device": {"unet": "gpu0"}}, "gpu0"),
    ],
)
def test_bad_family_settings_fail_at_start(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg(**settings)


# ------------------------------------------------------------------ reading inputs
def prepare(rows, base_dir=None):
    batch = {
        "id": [f"r{i}" for i in range(len(rows))],
        "width": [r.get("width") for r in rows],
        "height": [r.get("height") for r in rows],
        "status": [r.get("status", "ok") for r in rows],
        "error": [r.get("error") for r in rows],
        "image": [r.get("image") for r in rows],
        "mask": [r.get("mask") for r in rows],
    }
    return PrepareImagesStage(max_side=2048, base_dir=base_dir)(batch)


def test_prepare_reads_uris_and_bytes_and_sizes_as_the_reference(files):
    import fsspec

    d, data = files
    fsspec.filesystem("memory").pipe("/k3batch-test/image.png", data["image"])
    out = prepare(
        [
            {"image": str(d / "image.png"), "mask": str(d / "mask.png")},
            {"image": data["image"], "mask": data["mask"]},
            {"image": "memory://k3batch-test/image.png", "mask": data["mask"]},
            {"image": "image.png", "mask": "mask.png"},  # relative to the job's directory
            {},  # a text-to-image row passes through
        ],
        base_dir=str(d),
    )
    assert out["status"] == ["ok"] * 5, out["error"]
    assert out["width"][:4] == [64] * 4 and out["height"][:4] == [64] * 4  # 100x70 -> 64x64
    assert len(set(out["source_rgb"][:4])) == 1 and len(set(out["keep_mask"][:4])) == 1
    pixels = np.frombuffer(out["source_rgb"][0], np.uint8).reshape(64, 64, 3)
    expected = np.asarray(Image.open(d / "image.png").convert("RGB").resize((64, 64)))
    assert np.array_equal(pixels, expected)
    keep = np.frombuffer(out["keep_mask"][0], np.float32).reshape(64, 64)
    assert keep[:, 0].max() == 0 and keep[:, -1].min() == 1  # 1 = keep, 0 = repaint
    assert out["source_rgb"][4] is None and out["width"][4] is None


def test_prepare_turns_bad_inputs_into_row_errors(files):
    d, data = files
    out = prepare(
        [
            {"image": str(d / "missing.png"), "mask": data["mask"]},
            {"image": b"not an image at all", "mask": data["mask"]},
            {"image": data["image"], "mask": data["small_mask"]},
            {"image": data["image"], "mask": data["empty_mask"]},
            {"image": data["tiny_image"]},
            {"image": data["image"], "width": 128},
            {"image": data["image"], "mask": b"\x89PNG broken"},
            {"image": "memory://k3batch-test/nothing-here.png"},
            {"image": data["image"], "status": "error", "error": "prompt: empty"},
        ]
    )
    assert out["status"] == ["error"] * 9
    err = out["error"]
    assert err[0].startswith("image: cannot read ") and "missing.png" in err[0]
    assert err[1].startswith("image: not a readable image: <19 bytes>")
    assert err[2].startswith("mask: size 50x50 differs from the image's 100x70")
    assert err[3].startswith("mask: empty, no pixel to repaint")
    assert err[4].startswith("image: 40x40 is too small")
    assert err[5].startswith("width: 128 differs from the size derived from the image")
    assert err[6].startswith("mask: not a readable image")
    assert err[7].startswith("image: cannot read 'memory://k3batch-test/nothing-here.png'")
    assert err[8] == "prompt: empty" and out["source_rgb"][8] is None


def test_prepare_scales_large_images_to_about_one_megapixel():
    assert images.diffusion_size(3000, 2000) == (1216, 832)
    assert images.diffusion_size(1024, 1024) == (1024, 1024)
    assert images.diffusion_size(700, 130) == (640, 128)
    # 1024 * sqrt(1561 / 1000) = 1279.4: just under 1280, so 1216 (a 1025 px target: 1280).
    assert images.diffusion_size(1561, 1000) == (1216, 768)


def test_prepare_mask_resizes_as_the_references_skimage_resize():
    """skimage's bilinear resize of the reference, worked by hand: a 2x2 repaint mask [1, 0]
    per line to 4 wide samples it at pixel centres -0.25, 0.25, 0.75 and 1.25, mirrored at
    the edges (-0.25 reads 0.25, 1.25 reads 0.75): repaint 0.75, 0.75, 0.25, 0.25, keep
    1 minus that. An integer mask (the goldens' cases pass one) gives the same."""
    repaint = np.array([[1, 0], [1, 0]])
    want = np.array([[0.25, 0.25, 0.75, 0.75]] * 2, dtype=np.float32)
    for mask in (repaint.astype(np.float64), repaint):
        keep = images.prepare_mask(mask, (4, 2))
        assert keep.dtype == np.float32
        np.testing.assert_array_equal(keep, want)


def test_prepare_mask_keeps_within_zero_and_one_where_rounding_passes_one():
    """Bilinear weights that sum to 1 + 2e-16: an 8x8 half mask resized to 64x6 interpolates
    past 1, and the keep-mask must not go below 0 (the reference's resize clips to the
    input's range)."""
    repaint = np.zeros((8, 8))
    repaint[:, :4] = 1.0
    keep = images.prepare_mask(repaint, (64, 6))
    assert keep.min() == 0.0 and keep.max() == 1.0


def test_prepare_mask_array_repaints_from_grey_128_in_any_mode():
    """1 = repaint from grey 128 up (the threshold itself included), of an RGB mask's
    luminance as of a grey one."""
    grey = Image.fromarray(np.array([[127, 128, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(images.mask_array(grey), [[0.0, 1.0, 1.0]])
    rgb = Image.fromarray(np.array([[[127] * 3, [128] * 3, [255, 255, 255]]], dtype=np.uint8))
    np.testing.assert_array_equal(images.mask_array(rgb), [[0.0, 1.0, 1.0]])


def test_prepare_image_makes_rgb_of_a_grey_image():
    grey = Image.fromarray(np.full((2, 3), 100, dtype=np.uint8))
    out = images.prepare_image(grey, (3, 2))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and (out == 100).all()


@pytest.fixture(scope="module")
def inpaint_stage(tiny_dir):
    return GenerateStage(
        ModelConfig(
            **{"name": "kandinsky3-inpaint", "path": tiny_dir, "dtype": FP32, "device": "cpu"}
        )
    )


def test_inpaint_rows_through_validate_prepare_generate(inpaint_stage, files):
    d, data = files
    rules = RowRules(
        width=64,
        height=64,
        num_inference_steps=2,
        capabilities=row_capabilities(name="kandinsky3-inpaint"),
    )
    batch = {
        "prompt": ["a cat", "a dog", "a fox", "an owl", "a boat"],
        "row_hash": list(range(5)),
        "image": [data["image"], str(d / "image.png"), "/no/such.png", data["image"], None],
        "mask": [data["mask"], str(d / "mask.png"), data["mask"], data["empty_mask"], data["mask"]],
    }
    batch = {**batch, **ValidateStage(rules)(batch)}
    batch = {**batch, **PrepareImagesStage(base_dir=str(d))(batch)}
    out = inpaint_stage(batch)
    assert out["status"] == ["ok", "ok", "error", "error", "error"]
    assert out["error"][2].startswith("image: cannot read '/no/such.png'")
    assert out["error"][3].startswith("mask: empty")
    assert out["error"][4].startswith("image: missing (null)")
    assert len(out["image_rgb"][0]) == 64 * 64 * 3 and out["model"][0].startswith(
        "kandinsky3-inpaint:"
    )
    assert out["uncond_embedding"][0] == "null_embedding"
    # The same image as a URI and as bytes with different prompts and seeds: different results.
    assert out["image_rgb"][0] != out["image_rgb"][1]


# ------------------------------------------------------------------ pre-flight
def test_preflight_names_the_missing_member_files(tmp_path):
    from k3batch.job import kinds
    from k3batch.job.preflight import check_model

    for sub in ("tokenizer", "text_encoder", "movq", "unet"):
        (tmp_path / "diff" / sub).mkdir(parents=True)
    ref = tmp_path / "ref" / "weights"
    (ref / "flan_ul2_encoder").mkdir(parents=True)
    for name in ("movq.pt", "kandinsky3.pt", "flan_ul2_encoder/projection.pt"):
        (ref / name).write_bytes(b"")

    def check(path, **model):
        data = {
            "input": {"uri": "x"},
            "output": {"uri": "y"},
            "model": {"path": str(path), **model},
        }
        cfg = load_config(data=data)
        check_model(cfg, kinds.get(cfg.job))

    check(tmp_path / "diff")
    check(tmp_path / "ref")
    with pytest.raises(
        ConfigError, match="has no unet_flash for model.name=kandinsky3 with model.refine"
    ):
        check(tmp_path / "diff", refine=True)
    with pytest.raises(
        ConfigError, match="kandinsky3_inpainting.pt, flan_ul2_encoder/projection_inpainting.pt"
    ):
        check(tmp_path / "ref", name="kandinsky3-inpaint")


def test_flash_rows_through_validate_and_generate_report_what_flash_ignores(tiny_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from k3batch.job import kinds
    from k3batch.job.accounting import account
    from k3batch.job.inputs import InputInfo
    from k3batch.outputs import Output

    rules = RowRules(
        width=64,
        height=64,
        num_inference_steps=4,
        capabilities=row_capabilities(name="kandinsky3-flash"),
    )
    batch = {
        "prompt": ["a red cat", "a blue dog", "an owl"],
        "row_hash": [1, 2, 3],
        "negative_prompt": ["blurry", None, None],
        "guidance_scale": [None, 7.0, None],
    }
    batch = {**batch, **ValidateStage(rules)(batch)}
    stage = GenerateStage(
        ModelConfig(
            **{"name": "kandinsky3-flash", "path": tiny_dir, "dtype": FP32, "device": "cpu"}
        )
    )
    out = {**batch, **stage(batch)}
    assert out["status"] == ["ok"] * 3
    assert out["num_inference_steps"] == [4] * 3 and out["guidance_scale"] == [None] * 3
    assert out["uncond_embedding"] == ["none"] * 3 and out["negative_prompt"] == [None] * 3
    assert out["warning"][0].startswith("negative_prompt: ignored by kandinsky3-flash")
    assert out["warning"][1].startswith("guidance_scale: ignored by kandinsky3-flash")
    assert out["warning"][2] is None
    # run.json counts warnings by field, from the written metadata
    meta = tmp_path / "out" / "metadata"
    meta.mkdir(parents=True)
    columns = {k: out[k] for k in ("id", "status", "error", "warning")}
    pq.write_table(pa.table(columns), meta / "part.parquet")
    data = {"input": {"uri": "x"}, "output": {"uri": str(tmp_path / "out")}}
    cfg = load_config(data=data)
    info = InputInfo(files=[], columns=[], num_rows=3)
    counts = account(cfg, kinds.get(cfg.job), info, Output.from_config(cfg))
    assert counts["warnings_by_field"] == {"negative_prompt": 1, "guidance_scale": 1}
    assert counts["accounting"]["ok"]
