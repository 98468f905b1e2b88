"""Kandinsky 2.2 in batch jobs: its config fields and refusals, its row columns (`prior_*`,
`hint`, `mix`), image preparation, beautified prompts cut to CLIP's 77 tokens, pre-flight on
local folders, the shipped configs; then one job per member on the tiny 2.2 set."""

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch import resume
from k3batch.config import ConfigError, JobConfig, ModelConfig, load_config
from k3batch.job import kinds
from k3batch.model import estimates, family, memory
from k3batch.model.kandinsky22 import members as k22_members
from k3batch.rows.rules import RowRules
from k3batch.stages.base import apply_stage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.validate import ValidateStage

from .conftest import row_capabilities

REPO = Path(__file__).resolve().parent.parent
K22_CONFIGS = sorted((REPO / "configs").glob("kandinsky22-*.yaml"))
FP32 = dict.fromkeys(("unet", "text_encoder", "movq", "prior", "image_encoder"), "float32")


def job(name=family.K22, model=None, **sections) -> JobConfig:
    data = {
        "input": {"uri": "in.parquet"},
        "output": {"uri": "out"},
        "model": {"name": name, **(model or {})},
    }
    data.update(sections)
    return JobConfig.model_validate(data)


def refusal(**kwargs) -> str:
    with pytest.raises(ValueError) as e:
        job(**kwargs)
    return str(e.value)


# ------------------------------------------------------------------ config
def test_a_k22_member_fills_its_defaults_and_its_decoder_repo():
    cfg = job()
    assert cfg.model.path == "kandinsky-community/kandinsky-2-2-decoder"
    g = cfg.generation
    assert (g.num_inference_steps, g.guidance_scale) == (100, 4.0)
    assert (g.prior_num_inference_steps, g.prior_guidance_scale) == (25, 4.0)
    assert k22_members.paths(cfg.model) == {
        "decoder": "kandinsky-community/kandinsky-2-2-decoder",
        "prior": k22_members.PRIOR_REPO,
        "depth_estimator": None,
    }
    assert set(cfg.model.device_map()) == {
        "unet", "text_encoder", "movq", "prior", "image_encoder", "depth_estimator"
    }  # fmt: skip
    assert job(family.K22_INPAINT).model.path.endswith("kandinsky-2-2-decoder-inpaint")
    tiny = k22_members.paths(job(family.K22_DEPTH, {"path": "/m", "make_tiny": True}).model)
    assert (tiny["decoder"], tiny["prior"]) == ("/m/controlnet-depth", "/m/prior")
    # Kandinsky 3 keeps its own defaults, and its fingerprint has no 2.2 fields.
    k3 = job(family.BASE)
    assert k3.model.path == "kandinsky-community/kandinsky-3"
    assert k3.generation.prior_num_inference_steps is None
    identity = resume.job_identity(k3)
    assert "prior_path" not in identity["model"] and "prior" not in identity["model"]["dtype"]
    assert "prior_guidance_scale" not in identity["generation"]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"model": {"refine": True}}, "model.refine"),
        ({"model": {"lora": [{"path": "a.safetensors"}]}}, "model.lora"),
        ({"model": {"layout": "reference"}}, "model.layout"),
        ({"model": {"depth_estimator": "Intel/dpt-large"}}, "model.depth_estimator"),
        ({"generation": {"scheduler": "unipc"}}, "generation.scheduler"),
        ({"resources": {"text_encoder_pool": {"enabled": True}}}, "resources.text_encoder_pool"),
        ({"name": family.BASE, "model": {"prior_path": "x"}}, "model.prior_path"),
        ({"name": family.FLASH, "model": {"dtype": {"prior": "float16"}}}, "model.dtype.prior"),
        (
            {"name": family.BASE, "generation": {"prior_guidance_scale": 2.0}},
            "generation.prior_guidance_scale",
        ),
    ],
)
def test_what_a_member_cannot_use_is_refused_with_one_line_naming_it(kwargs, expected):
    assert f"{expected}:" in refusal(**kwargs)


# ------------------------------------------------------------------ rows
# Every default its own value: a prior setting filled from the decoder's would show.
K22_RULES = RowRules(
    capabilities=row_capabilities(name=family.K22),
    num_inference_steps=2,
    guidance_scale=4.0,
    prior_num_inference_steps=25,
    prior_guidance_scale=2.5,
)
ITEM = pa.struct([("prompt", pa.string()), ("image", pa.binary()), ("weight", pa.float64())])


def validate(rules, columns: dict) -> dict:
    table = pa.table(columns)
    return apply_stage(ValidateStage(rules), table).to_pydict()


def test_prior_settings_per_row_are_validated_and_ignored_with_a_warning_on_kandinsky3():
    out = validate(
        K22_RULES,
        {
            "id": ["a", "b", "c", "d"],
            "prompt": ["x"] * 4,
            "prior_num_inference_steps": [3, None, 1, 5],
            "prior_guidance_scale": [1.0, None, 2.0, math.inf],
        },
    )
    assert out["status"] == ["ok", "ok", "error", "error"]
    assert out["prior_num_inference_steps"][:2] == [3, 25]
    assert out["prior_guidance_scale"][:2] == [1.0, 2.5]
    assert out["num_inference_steps"][:2] == [2, 2] and out["guidance_scale"][:2] == [4.0, 4.0]
    assert out["error"][2].startswith("prior_num_inference_steps: must be in [2, ")
    assert out["error"][3] == "prior_guidance_scale: must be finite and >= 0, got inf"
    k3 = validate(RowRules(), {"id": ["a"], "prompt": ["x"], "prior_guidance_scale": [2.0]})
    assert k3["status"] == ["ok"]
    assert k3["warning"] == ["prior_guidance_scale: ignored by kandinsky3 (no prior), got 2.0"]


def test_hint_and_mix_rows_are_checked_one_error_per_bad_field_rows_in_equal_rows_out():
    mix = [
        [{"prompt": "a cat", "image": None, "weight": 0.5}, {"prompt": None, "image": b"x", "weight": 0.5}],
        [],
        [{"prompt": "a", "image": b"x", "weight": 1.0}],
        [{"prompt": None, "image": None, "weight": 1.0}],
        [{"prompt": "a", "image": None, "weight": math.nan}],
        None,
    ]  # fmt: skip
    n = len(mix)
    out = validate(
        K22_RULES,
        {
            "id": [str(i) for i in range(n)],
            "prompt": ["p"] * n,
            "mix": pa.array(mix, pa.list_(ITEM)),
            "hint": pa.array([None] * (n - 1) + [b"png"], pa.binary()),
        },
    )
    assert len(out["id"]) == n
    assert out["status"] == ["ok"] + ["error"] * (n - 1)
    assert out["error"][1].startswith("mix: expected a non-empty list")
    assert out["error"][2].startswith("mix[0]: both prompt and image, give one")
    assert out["error"][3].startswith("mix[0]: neither prompt nor image, give one")
    assert out["error"][4] == "mix[0].weight: must be finite, got nan"
    assert out["error"][5].startswith("hint: only kandinsky2.2-controlnet-depth takes a depth hint")

    depth = RowRules(capabilities=row_capabilities(name=family.K22_DEPTH))
    columns = {
        "id": ["hint", "image", "none", "mix"],
        "prompt": ["p"] * 4,
        "hint": pa.array([b"png", None, None, b"png"], pa.binary()),
        "image": pa.array([None, b"png", None, None], pa.binary()),
        "mix": pa.array([None, None, None, mix[0]], pa.list_(ITEM)),
    }
    out = validate(depth, columns)
    assert out["status"] == ["ok", "error", "error", "error"]
    assert "no model.depth_estimator" in out["error"][1] and out["error"][1].startswith("hint:")
    assert out["error"][2].startswith("hint: missing (null)")
    assert out["error"][3].startswith("mix: only kandinsky2.2 mixes")
    estimated = validate(
        RowRules(capabilities=row_capabilities(name=family.K22_DEPTH, depth_estimator="depth")),
        columns,
    )
    assert estimated["status"][:2] == ["ok", "ok"]


# ------------------------------------------------------------------ prepare
def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_reads_hints_at_the_row_size_and_mix_images_as_arrays():
    rng = np.random.default_rng(0)
    hint = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
    mixed = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    large = np.zeros((40, 200, 3), np.uint8)
    batch = {
        "id": ["a", "b", "c", "d"],
        "width": [64] * 4,
        "height": [128] * 4,
        "status": ["ok"] * 4,
        "error": [None] * 4,
        "hint": pa.array([png(hint), None, None, None], pa.binary()),
        "mix": pa.array(
            [
                None,
                [{"prompt": "a dog", "image": None, "weight": 0.25}, {"prompt": None, "image": png(mixed), "weight": 0.75}],
                [{"prompt": "a dog", "image": None, "weight": 1.0}, {"prompt": None, "image": b"not an image", "weight": 1.0}],
                [{"prompt": None, "image": png(large), "weight": 1.0}],
            ],
            pa.list_(ITEM),
        ),
    }  # fmt: skip
    stage = PrepareImagesStage(capabilities=row_capabilities(name=family.K22), max_side=128)
    out = apply_stage(stage, pa.table(batch)).to_pydict()
    assert out["status"] == ["ok", "ok", "error", "error"]
    assert out["error"][3] == "mix[0].image: 200x40 is above limits.max_side=128"
    # The depth hint is read where the member takes one (the ControlNet-depth member's job).
    depth = PrepareImagesStage(capabilities=row_capabilities(name=family.K22_DEPTH), max_side=128)
    hinted = {k: batch[k] for k in ("id", "width", "height", "status", "error", "hint")}
    got = apply_stage(depth, pa.table(hinted)).to_pydict()["hint_rgb"][0]
    got = np.frombuffer(got, np.uint8).reshape(128, 64, 3)
    assert np.array_equal(got, np.asarray(Image.fromarray(hint).resize((64, 128))))
    first, second = out["mix_prepared"][1]
    assert (first["prompt"], first["rgb"], first["weight"]) == ("a dog", None, 0.25)
    assert (second["width"], second["height"], second["weight"]) == (50, 40, 0.75)
    assert np.array_equal(np.frombuffer(second["rgb"], np.uint8).reshape(40, 50, 3), mixed)
    assert out["error"][2].startswith("mix[1].image: not a readable image: <12 bytes>")
    # A Kandinsky 3 job's stage adds no 2.2 columns.
    k3 = apply_stage(PrepareImagesStage(), pa.table({k: batch[k] for k in list(batch)[:5]}))
    assert "hint_rgb" not in k3.column_names


# ------------------------------------------------------------------ beautify
def test_beautified_prompts_fit_clips_77_tokens_for_k22_members():
    from k3batch.beautify import choose
    from k3batch.beautify import config as bc
    from k3batch.testing.tiny_scorers import build_clip_tokenizer

    clip = build_clip_tokenizer()
    long = " ".join(["a small red house by the lake"] * 30)
    limit = family.MEMBERS[family.K22].max_prompt_tokens
    assert limit == 77 and choose.token_count(clip, long) > 128
    used, fallback = choose.choose_prompt("a cat", long, None, "ok", clip, max_tokens=limit)
    assert fallback == bc.FALLBACK_TRUNCATED and long.startswith(used)
    assert 70 < choose.token_count(clip, used) <= 77
    words = long.split()
    mid = next(  # a prompt between 77 and 128 tokens: fits T5, not CLIP
        " ".join(words[:n])
        for n in range(len(words))
        if choose.token_count(clip, " ".join(words[:n])) > 90
    )
    assert choose.token_count(clip, mid) <= 128
    assert choose.choose_prompt("a", mid, None, "ok", clip, max_tokens=77)[1] == "truncated"
    assert choose.choose_prompt("a", mid, None, "ok", clip)[1] == bc.FALLBACK_NONE


# ------------------------------------------------------------------ pre-flight and configs
def test_preflight_names_the_missing_parts_of_local_k22_folders(tmp_path):
    from k3batch.job import kinds
    from k3batch.job.preflight import check_model

    for part in ("unet", "movq"):
        (tmp_path / "decoder" / part).mkdir(parents=True)
    for part in ("prior", "tokenizer", "scheduler"):
        (tmp_path / "prior" / part).mkdir(parents=True)
    cfg = job(model={"path": str(tmp_path / "decoder"), "prior_path": str(tmp_path / "prior")})
    with pytest.raises(ConfigError, match=r"^model.path: .*decoder has no scheduler for"):
        check_model(cfg, kinds.get(cfg.job))
    (tmp_path / "decoder" / "scheduler").mkdir()
    with pytest.raises(
        ConfigError, match=r"^model.prior_path: .* has no text_encoder, image_encoder, image_"
    ):
        check_model(cfg, kinds.get(cfg.job))


@pytest.mark.parametrize("path", K22_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_k22_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.name in k22_members.MEMBERS
    if cfg.model.make_tiny:
        table = pq.read_table(REPO / cfg.input.uri)
        assert table.num_rows >= 2
        return
    (gen,) = estimates.job_estimates(cfg, kinds.get(cfg.job))
    assert gen.problem(memory.GPU_GIB[memory.DEFAULT_GPU]) is None
    assert any(part.startswith("prior weights (float16)") for part, _ in gen.estimate.parts)


def test_the_shipped_k22_demos_cover_all_five_modes():
    names = {p.name for p in K22_CONFIGS}
    modes = ("text-to-image", "image-to-image", "inpaint", "controlnet-depth", "mix")
    assert {f"kandinsky22-{m}.yaml" for m in modes} <= names
    assert ModelConfig(name=family.K22_DEPTH).depth_estimator is None


# ------------------------------------------------------------------ whole jobs (tiny 2.2 set)
EXAMPLE = REPO / "data" / "inpaint"
# Prior and decoder settings all different: a job that swapped them would record it.
STEPS = {
    "num_inference_steps": 3,
    "prior_num_inference_steps": 2,
    "guidance_scale": 5.0,
    "prior_guidance_scale": 2.5,
    "width": 64,
    "height": 64,
}


@pytest.fixture
def tiny_k22_dir(tiny_k22) -> str:
    """The session's tiny 2.2 set (conftest), shared with the model and Serve tests."""
    return tiny_k22


def run_k22(tmp_path, rows_, tiny_k22_dir, name, model=None, schema_=None, **sections):
    from k3batch.job.run import run_job

    from .conftest import job_config

    pq.write_table(pa.Table.from_pylist(rows_, schema=schema_), tmp_path / "in.parquet")
    cfg = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_k22_dir,
        model={"name": name, "make_tiny": True, "dtype": FP32, **(model or {})},
        generation={**STEPS, "seed": 0},
        **sections,
    )
    return run_job(load_config(data=cfg)), cfg


def pixels(meta_row) -> np.ndarray:
    with Image.open(meta_row["image_uri"]) as image:
        return np.asarray(image.convert("RGB"), np.int16)


@pytest.mark.slow
def test_k22_job_text_image_and_mix_rows_with_bad_rows(ray_local, tmp_path, tiny_k22_dir):
    from .test_job import read_metadata

    house = (EXAMPLE / "house.png").read_bytes()
    item = pa.struct([("prompt", pa.string()), ("image", pa.binary()), ("weight", pa.float64())])
    columns = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("seed", pa.int64()),
            ("image", pa.binary()),
            ("strength", pa.float64()),
            ("mix", pa.list_(item)),
            ("prior_num_inference_steps", pa.int64()),
        ]
    )
    base = {"prompt": "a red fox", "seed": 7, "image": None, "strength": None, "mix": None}
    mix = [{"prompt": "a blue lake", "image": None, "weight": 0.4}]
    mix += [{"prompt": None, "image": (EXAMPLE / "lake.png").read_bytes(), "weight": 0.9}]
    table = [
        {**base, "id": "t2i"},
        {**base, "id": "t2i-prior-3", "prior_num_inference_steps": 3},
        {**base, "id": "i2i", "image": house, "strength": 0.7},
        {**base, "id": "mix", "mix": mix},
        {**base, "id": "bad-mix", "mix": [{**mix[0], "weight": math.nan}]},
        {**base, "id": "bad-prior", "prior_num_inference_steps": 1},
        {**base, "id": "bad-image", "image": b"not an image"},
    ]
    result, _ = run_k22(tmp_path, table, tiny_k22_dir, family.K22, schema_=columns)
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    assert result.ok and sorted(meta) == sorted(r["id"] for r in table)  # rows in = rows out
    for row_id in ("t2i", "t2i-prior-3", "i2i", "mix"):
        assert meta[row_id]["status"] == "ok", meta[row_id]["error"]
    assert meta["bad-mix"]["error"] == "mix[0].weight: must be finite, got nan"
    assert meta["bad-prior"]["error"].startswith("prior_num_inference_steps: must be in [2, ")
    assert meta["bad-image"]["error"].startswith("image: not a readable image")
    assert result.run["errors_by_field"] == {
        "mix[0].weight": 1,
        "prior_num_inference_steps": 1,
        "image": 1,
    }
    t2i_settings = [
        meta["t2i"][k]
        for k in (
            "num_inference_steps",
            "guidance_scale",
            "prior_num_inference_steps",
            "prior_guidance_scale",
        )
    ]
    assert t2i_settings == [3, 5.0, 2, 2.5]
    assert meta["t2i-prior-3"]["prior_num_inference_steps"] == 3
    assert "prior(" in meta["t2i"]["model"]
    assert (meta["i2i"]["width"], meta["i2i"]["height"]) == (128, 128)
    t2i = pixels(meta["t2i"])
    # Same prompt and seed: the prior's steps, the source image and the mix each change it.
    for other in ("t2i-prior-3", "mix"):
        assert np.abs(pixels(meta[other]) - t2i).mean() > 1, other
    assert "hint_rgb" not in meta["t2i"] and "mix_prepared" not in meta["t2i"]


@pytest.mark.slow
def test_k22_inpaint_job_to_webdataset_resumes_a_lost_shard(ray_local, tmp_path, tiny_k22_dir):
    from k3batch.job.run import run_job

    from .test_resume import records

    names = ("house", "lake")
    table = [
        {"id": n, "prompt": f"a {n}", "image": str(EXAMPLE / f"{n}.png"),
         "mask": str(EXAMPLE / f"{n}_mask.png")}
        for n in names
    ] + [{"id": "no-mask", "prompt": "x", "image": str(EXAMPLE / "house.png"), "mask": None}]  # fmt: skip
    first, cfg = run_k22(
        tmp_path,
        table,
        tiny_k22_dir,
        family.K22_INPAINT,
        resources={"batch_size": 1},
        output={"format": "webdataset", "shard_size": 2},
    )
    out = tmp_path / "out" / "shards"
    index = {r["id"]: r for r in records(out)}
    assert first.ok and sorted(index) == sorted(r["id"] for r in table)
    assert index["no-mask"]["error"].startswith("mask: missing (null)")
    assert all(index[n]["status"] == "ok" for n in names), index
    lost = {r["id"] for r in pq.read_table(out / "00001.parquet").to_pylist()}
    for path in (out / "00001.tar", out / "00001.parquet"):
        path.unlink()
    (tmp_path / "out" / "_k3batch" / "checkpoint" / "00001.parquet").unlink()
    again = run_job(load_config(data=cfg))
    assert again.ok and again.run["resumed"] and again.run["rows_this_run"] == len(lost)
    assert sorted(r["id"] for r in records(out)) == sorted(index)


@pytest.mark.slow
def test_k22_controlnet_depth_job_with_given_and_estimated_hints(ray_local, tmp_path, tiny_k22_dir):
    from .test_job import read_metadata

    hint = str(REPO / "data" / "kandinsky22" / "house_depth.png")
    table = [
        {"id": "hint", "prompt": "a tower", "hint": hint, "image": None},
        {"id": "estimated", "prompt": "a tower", "hint": None, "image": str(EXAMPLE / "house.png")},
        {"id": "neither", "prompt": "a tower", "hint": None, "image": None},
        {"id": "bad-hint", "prompt": "a tower", "hint": str(EXAMPLE / "nope.png"), "image": None},
    ]
    result, _ = run_k22(
        tmp_path,
        table,
        tiny_k22_dir,
        family.K22_DEPTH,
        model={
            "depth_estimator": f"{tiny_k22_dir}/depth",
            "dtype": {**FP32, "depth_estimator": "float32"},
        },
    )
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    assert result.ok and len(meta) == len(table)
    assert meta["hint"]["status"] == meta["estimated"]["status"] == "ok", meta
    assert meta["neither"]["error"].startswith("hint: missing (null)")
    assert meta["bad-hint"]["error"].startswith("hint: cannot read")
    assert (meta["estimated"]["width"], meta["estimated"]["height"]) == (128, 128)
