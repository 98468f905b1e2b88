"""Kandinsky 3 ControlNet in jobs: `model.controlnet`, the `hint` and control columns of rows,
and rows through ValidateStage -> PrepareImagesStage -> GenerateStage (no Ray)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from k3batch.config import ModelConfig
from k3batch.model import family
from k3batch.rows.rules import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.validate import ValidateStage

from .conftest import row_capabilities

FP32 = {"unet": "float32", "text_encoder": "float32", "movq": "float32"}
RULES = dict(width=64, height=64, num_inference_steps=2)


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def edges(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return png((rng.random((size, size, 3)) > 0.8).astype(np.uint8) * 255)


def test_model_controlnet_only_on_the_base_member(tiny_dir):
    path = os.path.join(tiny_dir, "controlnet_hed")
    assert ModelConfig(name=family.BASE, path=tiny_dir, controlnet=path).controlnet == path
    with pytest.raises(ValueError, match="model.controlnet.*kandinsky3-inpaint"):
        ModelConfig(name=family.INPAINT, path=tiny_dir, controlnet=path)


def test_control_columns_are_validated_naming_the_field():
    rules = RowRules(capabilities=row_capabilities(controlnet="controlnet_hed"), **RULES)
    n = 7
    batch = {
        "prompt": ["p"] * n,
        "row_hash": list(range(n)),
        "hint": [b"x"] * n,
        "controlnet_conditioning_scale": [None, 0.5, -1.0, None, None, None, float("nan")],
        "control_guidance_start": [None, 0.2, None, 1.5, 0.6, None, None],
        "control_guidance_end": [None, 0.8, None, None, 0.4, -0.1, None],
    }
    out = ValidateStage(rules)(batch)
    assert out["status"] == ["ok", "ok"] + ["error"] * 5
    assert out["controlnet_conditioning_scale"][:2] == [1.0, 0.5]
    assert (out["control_guidance_start"][:2], out["control_guidance_end"][:2]) == (
        [0.0, 0.2],
        [1.0, 0.8],
    )
    assert out["error"][2] == "controlnet_conditioning_scale: must be finite and >= 0, got -1.0"
    assert out["error"][3] == "control_guidance_start: must be in [0, 1], got 1.5"
    assert out["error"][4].startswith("control_guidance_start: must be < control_guidance_end")
    assert out["error"][5] == "control_guidance_end: must be in [0, 1], got -0.1"
    assert out["error"][6].startswith("controlnet_conditioning_scale: must be finite")
    # Without model.controlnet: a hint is a row error naming it; the settings are ignored.
    plain = ValidateStage(RowRules(**RULES))(
        {"prompt": ["p", "q"], "row_hash": [1, 2], "hint": [b"x", None],
         "controlnet_conditioning_scale": [None, 0.5]}
    )  # fmt: skip
    assert plain["status"] == ["error", "ok"]
    assert plain["error"][0].startswith("hint: only kandinsky2.2-controlnet-depth takes")
    assert "model.controlnet" in plain["error"][0]
    assert plain["warning"][1].startswith("controlnet_conditioning_scale: ignored, without")
    # With it, a row without a hint records no control settings.
    unhinted = ValidateStage(rules)(
        {"prompt": ["p"], "row_hash": [1], "controlnet_conditioning_scale": [0.5]}
    )
    assert unhinted["status"] == ["ok"] and unhinted["controlnet_conditioning_scale"] == [None]
    assert unhinted["warning"][0].startswith(
        "controlnet_conditioning_scale: ignored, the row has no hint"
    )


@pytest.fixture(scope="module")
def stage(tiny_dir):
    return GenerateStage(
        ModelConfig(
            name=family.BASE,
            path=tiny_dir,
            dtype=FP32,
            device="cpu",
            controlnet=os.path.join(tiny_dir, "controlnet_hed"),
        )
    )


def test_hint_rows_through_validate_prepare_generate(stage, tmp_path):
    rules = RowRules(capabilities=row_capabilities(controlnet="controlnet_hed"), **RULES)
    batch = {
        "prompt": ["a house"] * 5,
        "row_hash": [1, 1, 1, 2, 3],
        "seed": [7, 7, 7, 7, 7],
        "hint": [None, edges(0, 96), edges(0, 96), b"not an image", str(tmp_path / "no.png")],
        "controlnet_conditioning_scale": [None, 0.0, 1.0, None, None],
    }
    batch = {**batch, **ValidateStage(rules)(batch)}
    batch = {
        **batch,
        **PrepareImagesStage(
            base_dir=str(tmp_path), capabilities=row_capabilities(controlnet="controlnet_hed")
        )(batch),
    }
    out = stage(batch)
    assert out["status"] == ["ok", "ok", "ok", "error", "error"]
    assert out["error"][3].startswith("hint: not a readable image")
    assert out["error"][4].startswith("hint: cannot read")
    plain, zero, hinted = out["image_rgb"][:3]
    assert zero == plain  # scale 0: the base image, bit for bit
    assert hinted != plain
