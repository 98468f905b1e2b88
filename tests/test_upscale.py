"""Upscaling as stages (plain dict batches, no Ray) and as jobs: `job: upscale`, and the
`upscale:` step of a generation job, on the tiny KandiSuperRes set.

The model itself (sampler, windows, loading) is checked in test_superres.py; here, what the
stages and jobs add around it: rows read and validated with errors naming the column, the
record's seed and size, batch independence, both sizes kept when asked, resume, accounting
and both output formats.
"""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch import schema
from k3batch.config import ConfigError, load_config
from k3batch.config.upscale import UpscaleConfig
from k3batch.model.superres.loading import load_upscaler
from k3batch.stages.upscale import UpscaleRowsStage, UpscaleStage

from .conftest import assert_same_images, job_config
from .test_job import read_metadata

# Tiny windows so a 16 px input spans several of them at x2 and x4.
SAMPLING = {"window": 32, "stride": 24, "num_inference_steps": 2, "dtype": "float32"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sr") / "tiny-sr")


def upscale_config(sr_dir, **fields):
    return UpscaleConfig(
        **{"model": "x2", "path": sr_dir, "make_tiny": True, "device": "cpu", **SAMPLING, **fields}
    )


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def records(images, seeds, status=None):
    n = len(images)
    return {
        schema.ID: [f"r{i}" for i in range(n)],
        schema.IMAGE_RGB: [None if im is None else im.tobytes() for im in images],
        schema.WIDTH: [None if im is None else im.shape[1] for im in images],
        schema.HEIGHT: [None if im is None else im.shape[0] for im in images],
        schema.SEED: seeds,
        schema.STATUS: status or ["ok"] * n,
        schema.ERROR: [None] * n,
    }


def test_the_stage_upscales_each_record_with_its_seed_whatever_the_batch(sr_dir):
    stage = UpscaleStage(upscale_config(sr_dir, keep_source=True), field="upscale")
    images = [picture(16, 16, 1), picture(12, 20, 2), picture(16, 16, 3)]
    out = stage(records(images + [None], [7, 8, 9, 10], status=["ok"] * 3 + ["error"]))
    model = load_upscaler(upscale_config(sr_dir))
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        assert (out[schema.WIDTH][i], out[schema.HEIGHT][i]) == (2 * w, 2 * h)
        assert (out[schema.SOURCE_WIDTH][i], out[schema.SOURCE_HEIGHT][i]) == (w, h)
        got = np.frombuffer(out[schema.IMAGE_RGB][i], np.uint8).reshape(2 * h, 2 * w, 3)
        # The model alone, on this image alone: a batch does not change an image (up to the
        # rounding of CPU kernels picked for another batch shape: one grey level, conftest).
        alone = model.upscale([im], [7 + i], num_inference_steps=2)[0]
        assert_same_images([got], [alone])
        assert out[schema.SOURCE_IMAGE_RGB][i] == im.tobytes()
        assert out[schema.UPSCALE_MODEL][i].startswith("kandisuperres-x2@2steps:")
        assert out[schema.UPSCALE_SECONDS][i] > 0
    # a row already in error passes through untouched
    assert out[schema.STATUS][3] == "error" and out[schema.IMAGE_RGB][3] is None
    # another seed, another image
    again = stage(records(images[:1], [8]))
    assert again[schema.IMAGE_RGB][0] != out[schema.IMAGE_RGB][0]


def test_the_stage_runs_flash_x2_with_its_refine_per_record(sr_dir):
    cfg = UpscaleConfig(model="flash-x2", path=sr_dir, make_tiny=True, device="cpu")
    stage = UpscaleStage(cfg, field="upscale")
    images = [picture(32, 32, 4), picture(16, 40, 5)]  # the second is below Flash's 32 px
    out = stage(records(images, [3, 4]))
    assert out[schema.STATUS] == ["ok", "error"]
    assert "sides must be >= 32" in out[schema.ERROR][1]
    assert out[schema.ERROR][1].startswith("upscale")
    assert (out[schema.WIDTH][0], out[schema.HEIGHT][0]) == (64, 64)
    assert out[schema.UPSCALE_MODEL][0].startswith("kandisuperres-flash-x2:")
    # the stage's pixels are the model's, refine included, for the record's seed
    alone = load_upscaler(cfg).upscale([images[0]], [3])[0]
    got = np.frombuffer(out[schema.IMAGE_RGB][0], np.uint8).reshape(64, 64, 3)
    assert np.array_equal(got, alone)


def test_flash_x2_needs_a_kandinsky3_checkpoint():
    with pytest.raises(ValueError, match="upscale.kandinsky3_path"):
        UpscaleConfig(model="flash-x2", path="somewhere")


def test_an_image_too_large_to_upscale_is_its_rows_error(sr_dir):
    stage = UpscaleStage(upscale_config(sr_dir, max_output_side=40), field="upscale")
    out = stage(records([picture(16, 16), picture(24, 16)], [0, 0]))
    assert out[schema.STATUS] == ["ok", "error"]
    assert out[schema.ERROR][1] == (
        "upscale: 16x24 upscaled x2 would be 32x48, above upscale.max_output_side=40"
    )
    assert out[schema.WIDTH] == [32, 16]


def test_image_rows_are_read_with_errors_naming_the_column(tmp_path):
    good = picture(10, 14)
    (tmp_path / "a.png").write_bytes(png(good))
    stage = UpscaleRowsStage(
        image_column="image_uri", seed=3, scale=4, max_output_side=56, base_dir=str(tmp_path)
    )
    table = pa.table(
        {
            "id": ["file", "bytes", "gone", "junk", "null", "big", "seed"],
            # An earlier job's metadata: its `image_uri` is read as `input_image_uri`.
            "image_uri": ["a.png", None, "nope.png", None, None, None, "a.png"],
            "seed": pa.array([None, 5, None, None, None, None, -2], pa.int64()),
        }
    )
    table = stage.prepare(table)
    batch = table.to_pydict()
    batch["input_image_uri"][1] = png(good)
    batch["input_image_uri"][3] = b"not an image"
    batch["input_image_uri"][5] = png(picture(15, 10))
    out = stage(batch)
    assert out[schema.STATUS] == ["ok", "ok", "error", "error", "error", "error", "error"]
    errors = dict(zip(batch["id"], out[schema.ERROR], strict=True))
    assert errors["gone"].startswith("image_uri: cannot read ")
    assert errors["junk"].startswith("image_uri: not a readable image: ")
    assert errors["null"] == "image_uri: missing (null), expected an image URI or bytes"
    assert errors["big"].endswith(
        "10x15 upscaled x4 would be 40x60, above upscale.max_output_side=56"
    )
    assert errors["seed"] == "seed: must be -1 or in [0, 2**64), got -2"
    for i in (0, 1):
        assert np.frombuffer(out[schema.IMAGE_RGB][i], np.uint8).tobytes() == good.tobytes()
        assert (out[schema.WIDTH][i], out[schema.HEIGHT][i], out[schema.K][i]) == (14, 10, 0)
    # the seed given, or one derived from generation.seed and the id (stable)
    assert out[schema.SEED][1] == 5
    again = stage(batch)
    assert out[schema.SEED][0] == again[schema.SEED][0] != 5


def test_job_upscale_config_is_checked(tmp_path):
    base = job_config(tmp_path, str(tmp_path / "in.parquet"), str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="job=upscale needs upscale.model"):
        load_config(data={**base, "job": "upscale"})
    with pytest.raises(ConfigError, match="upscale.stride=40 is above upscale.window=32"):
        load_config(data={**base, "upscale": {"model": "x4", "window": 32, "stride": 40}})
    with pytest.raises(ConfigError, match="upscale.model: job=beautify makes no images"):
        load_config(
            data={
                **base,
                "job": "beautify",
                "beautify": {"enabled": True},
                "upscale": {"model": "x4"},
            }
        )


# -- jobs on local Ray ----------------------------------------------------------------------


def run_upscale_job(tmp_path, inputs, sr_dir, **sections):
    from k3batch.job.run import run_job

    cfg = job_config(tmp_path, str(inputs), str(tmp_path / "unused-model"), **sections)
    cfg["job"] = "upscale"
    cfg["input"]["image_column"] = "image_uri"
    cfg["upscale"] = {"model": "x4", "path": sr_dir, "make_tiny": True, "device": "cpu"}
    cfg["upscale"] |= {**SAMPLING, "max_output_side": 64, "batch_size": 2}
    return run_job(load_config(data=cfg))


@pytest.mark.slow
def test_upscale_job_resumes_and_accounts_for_every_row(ray_local, tmp_path, sr_dir):
    """`job: upscale` on an earlier job's metadata (one record per row even where that table
    says num_images_per_prompt: 2); a rerun with one more input file upscales only its rows."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        Image.fromarray(picture(12, 16, i)).save(tmp_path / f"{i}.png")
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b", "c", "gone"],
                "image_uri": [str(tmp_path / f"{n}.png") for n in ("0", "1", "2", "none")],
                "num_images_per_prompt": [2, 2, 2, 2],
                "status": ["ok"] * 4,
            }
        ),
        inputs / "part1.parquet",
    )
    first = run_upscale_job(tmp_path, inputs, sr_dir)
    assert first.ok and first.run["rows_out"] == 4 and first.run["ok"] == 3
    assert first.run["errors_by_field"] == {"image_uri": 1}
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    for name in ("a", "b", "c"):
        m = meta[name]
        assert (m["width"], m["height"], m["source_width"], m["source_height"]) == (64, 48, 16, 12)
        assert m["input_status"] == "ok" and m["input_image_uri"].endswith(".png")
        with Image.open(m["image_uri"]) as image:
            assert image.size == (64, 48)
    pq.write_table(
        pa.table({"id": ["d"], "image_uri": [str(tmp_path / "0.png")]}), inputs / "part2.parquet"
    )
    written = os.stat(meta["a"]["image_uri"]).st_mtime_ns
    second = run_upscale_job(tmp_path, inputs, sr_dir)
    assert second.ok and second.run["rows_out"] == 5 and second.run["rows_this_run"] == 1
    assert second.run["skipped_by_resume"] == 4 and second.run["accounting"]["ok"]
    after = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    assert os.stat(after["a"]["image_uri"]).st_mtime_ns == written  # not redone
    # d upscales a's picture with its own seed (derived from its id): other pixels
    assert after["d"]["seed"] != after["a"]["seed"]
    with Image.open(after["a"]["image_uri"]) as a, Image.open(after["d"]["image_uri"]) as d:
        assert a.size == d.size and np.asarray(a).tobytes() != np.asarray(d).tobytes()


@pytest.mark.slow
def test_generation_job_upscales_into_webdataset_keeping_the_source(
    ray_local, tmp_path, tiny_dir, sr_dir
):
    from k3batch.job.run import run_job

    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"]}), tmp_path / "in.parquet")
    cfg = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_dir,
        generation={"num_inference_steps": 2},
        output={"format": "webdataset", "shard_size": 10},
    )
    cfg["upscale"] = {"model": "x2", "path": sr_dir, "make_tiny": True, "device": "cpu"}
    cfg["upscale"] |= {**SAMPLING, "keep_source": True}
    result = run_job(load_config(data=cfg))
    assert result.ok and result.run["ok"] == 2
    shards = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    index = pads.dataset([str(p) for p in shards], format="parquet").to_table()
    assert "source_image_bytes" not in index.column_names
    rows = index.to_pylist()
    assert {(r["width"], r["height"], r["source_width"], r["source_height"]) for r in rows} == {
        (128, 128, 64, 64)
    }
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        names = sorted(tar.getnames())
        for r in rows:
            key = r["key"]
            assert f"{key}.png" in names and f"{key}.source.png" in names
            big = Image.open(tar.extractfile(f"{key}.png"))
            small = Image.open(tar.extractfile(f"{key}.source.png"))
            assert big.size == (128, 128) and small.size == (64, 64)
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            assert meta["upscale_model"].startswith("kandisuperres-x2@2steps:")


@pytest.mark.slow
def test_flash_x2_upscale_job_writes_the_models_images(ray_local, tmp_path, sr_dir):
    """`job: upscale` with the tiny Flash x2 on local Ray: each image twice the size, the
    model's own image for that picture and the row's seed (its SR steps and Flash refine)."""
    from k3batch.job.run import run_job

    pictures = {"a": picture(32, 48, 6), "b": picture(40, 32, 7)}
    for name, image in pictures.items():
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    table = {
        "id": list(pictures),
        "image_uri": [str(tmp_path / f"{n}.png") for n in pictures],
        "seed": [5, 6],
    }
    pq.write_table(pa.table(table), tmp_path / "in.parquet")
    cfg = job_config(tmp_path, str(tmp_path / "in.parquet"), str(tmp_path / "unused-model"))
    cfg["job"] = "upscale"
    cfg["input"]["image_column"] = "image_uri"
    flash = {"model": "flash-x2", "path": sr_dir, "make_tiny": True, "device": "cpu"}
    cfg["upscale"] = flash | {"dtype": "float32", "batch_size": 2, "num_cpus_per_actor": 1}
    result = run_job(load_config(data=cfg))
    assert result.ok and result.run["ok"] == 2, result.run
    model = load_upscaler(UpscaleConfig(**cfg["upscale"]))
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    for (name, image), seed in zip(pictures.items(), table["seed"], strict=True):
        h, w = image.shape[:2]
        m = meta[name]
        assert (m["width"], m["height"], m["source_width"], m["source_height"]) == (
            2 * w,
            2 * h,
            w,
            h,
        )
        assert m["seed"] == seed and m["upscale_model"].startswith("kandisuperres-flash-x2:")
        with Image.open(m["image_uri"]) as written:
            got = np.asarray(written.convert("RGB"))
        # The actor's batch of two against the model on this image alone: within one grey
        # level on a few bytes (conftest).
        assert_same_images([got], [model.upscale([image], [seed])[0]])
