"""The whole job on local Ray with the tiny model."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.config import ConfigError, load_config
from k3batch.job.run import run_job

from .conftest import assert_same_images, job_config

pytestmark = pytest.mark.slow


def write_prompts(directory, tables):
    directory.mkdir(parents=True, exist_ok=True)
    for i, table in enumerate(tables):
        pq.write_table(table, directory / f"part-{i}.parquet")
    return str(directory)


def read_metadata(out):
    return pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    part1 = pa.table(
        {
            "prompt": ["a red cat", "a blue dog", "", "a castle", "a tree"],
            "width": pa.array([None, 128, None, 63, None], pa.int64()),
            "seed": pa.array([None, 5, None, None, 2**63 - 1], pa.int64()),
            "tag": ["t0", "t1", "t2", "t3", "t4"],
        }
    )
    part2 = pa.table(
        {
            "prompt": ["an owl", None, "a boat at sunset", "a robot"],
            "width": pa.array([None, None, None, None], pa.int64()),
            "seed": pa.array([None, None, None, None], pa.int64()),
            "tag": ["u0", "u1", "u2", "u3"],
            "negative_prompt": ["blurry", None, None, "dark"],
        }
    )
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts", [part1, part2])


def run(tmp_path, prompts, model_dir, **sections):
    cfg = load_config(data=job_config(tmp_path, prompts, model_dir, **sections))
    return run_job(cfg)


def test_job_writes_one_row_per_input_row_and_images_at_requested_size(
    ray_local, tmp_path, prompts_dir, tiny_dir
):
    result = run(tmp_path, prompts_dir, tiny_dir)
    meta = read_metadata(tmp_path / "out")
    assert result.ok and len(meta) == 9 == result.run["rows_in"] == result.run["rows_out"]
    assert len({m["id"] for m in meta}) == 9
    by_tag = {m["tag"]: m for m in meta}
    assert {t for t, m in by_tag.items() if m["status"] == "error"} == {"t2", "t3", "u1"}
    assert by_tag["t2"]["error"].startswith("prompt: empty")
    assert by_tag["t3"]["error"] == "width: must be a positive multiple of 64, got 63"
    assert by_tag["u1"]["error"] == "prompt: missing (null)"
    assert result.run["ok"] == 6 and result.run["error"] == 3
    assert result.run["errors_by_field"] == {"prompt": 2, "width": 1}
    expected_columns = {
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "model",
        "image_uri",
        "status",
        "error",
        "generate_seconds",
        "tag",
    }
    assert expected_columns <= set(meta[0])
    assert by_tag["t1"]["seed"] == 5 and by_tag["t4"]["seed"] == 2**63 - 1
    assert by_tag["u0"]["negative_prompt"] == "blurry"
    assert by_tag["u0"]["uncond_embedding"] == "negative_prompt"
    assert by_tag["t0"]["uncond_embedding"] == "null_embedding"
    for m in meta:
        if m["status"] == "ok":
            with Image.open(m["image_uri"]) as image:
                assert image.size == (m["width"], m["height"]) and image.mode == "RGB"
        else:
            assert m["image_uri"] is None
    assert by_tag["t1"]["width"] == 128 and by_tag["t0"]["width"] == 64
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 6
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["rows_in"] == 9 and run_json["accounting"]["ok"]
    assert run_json["config"]["generation"]["num_inference_steps"] == 3
    assert run_json["versions"]["ray"] and run_json["images_per_second"] > 0
    assert len({m["row_hash"] for m in meta}) == 9  # the resume key: one per input row

    # The files output is a Hugging Face image folder too (images/metadata.parquet).
    from datasets import load_dataset

    meta = {m["id"]: m for m in meta}
    folder = load_dataset(
        "imagefolder", data_dir=str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf")
    )
    rows = list(folder)
    # Every row with an image, with its metadata attached; rows in error have no image.
    assert sorted(r["id"] for r in rows) == sorted(
        i for i, m in meta.items() if m["status"] == "ok"
    )
    for r in rows:
        m = meta[r["id"]]
        assert r["image"].size == (m["width"], m["height"])
        assert (r["prompt"], r["seed"], r["tag"]) == (m["prompt"], m["seed"], m["tag"])
        assert np.array_equal(np.asarray(r["image"]), np.asarray(Image.open(m["image_uri"])))


def pixels(meta):
    return {m["id"]: np.asarray(Image.open(m["image_uri"])) for m in meta if m["status"] == "ok"}


def test_batch_size_and_actor_count_do_not_change_images_or_ids(
    ray_local, tmp_path, prompts_dir, tiny_dir
):
    one = run(tmp_path / "b1", prompts_dir, tiny_dir, resources={"batch_size": 1})
    four = run(tmp_path / "b4", prompts_dir, tiny_dir, resources={"batch_size": 4, "num_actors": 2})
    assert one.ok and four.ok
    a, b = (
        pixels(read_metadata(tmp_path / "b1" / "out")),
        pixels(read_metadata(tmp_path / "b4" / "out")),
    )
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert_same_images([a[key]], [b[key]])


def test_text_encoder_pool_gives_the_images_of_the_in_actor_encoder(
    ray_local, tmp_path, prompts_dir, tiny_dir
):
    plain = run(tmp_path / "plain", prompts_dir, tiny_dir)
    pool = {"enabled": True, "batch_size": 3, "num_cpus_per_actor": 0.5}
    # device auto: with no GPU given, every component resolves to the CPU.
    pooled = run(
        tmp_path / "pool",
        prompts_dir,
        tiny_dir,
        resources={"text_encoder_pool": pool},
        model={"device": "auto"},
    )
    assert plain.ok and pooled.ok
    # run.json records each model actor's devices, the text encoder pool's apart.
    devices = sorted(pooled.run["devices"], key=lambda d: d["stage"])
    assert [d["stage"] for d in devices] == ["generation", "text encoder"]
    assert devices[0]["components"] == {"unet": "cpu/float32", "movq": "cpu/float32"}
    assert devices[1]["components"] == {"text_encoder": "cpu/float32"}
    for d in devices:
        assert d["actor_id"] and d["node_id"] and d["torch"] and d["cuda_device"] is None
        assert d["gpu_ids"] == []
    stages = pooled.run["stages"]
    assert stages["text_encode"]["actor_pool"] and stages["text_encode"]["rows"] == 9
    assert "text_encode" not in plain.run["stages"]
    meta = read_metadata(tmp_path / "pool" / "out")
    # The embeddings travel from the encoder pool to generation and are not written out.
    assert not {"prompt_embeds", "negative_prompt_embeds", "prompt_embeds_length"} & set(meta[0])
    a = pixels(read_metadata(tmp_path / "plain" / "out"))
    b = pixels(meta)
    assert a.keys() == b.keys() and len(a) == 6  # rows with negative prompts among them
    for key in a:
        assert_same_images([a[key]], [b[key]])


def test_same_job_resumes_a_different_one_is_refused_overwrite_replaces(
    ray_local, tmp_path, prompts_dir, tiny_dir
):
    first = run(tmp_path, prompts_dir, tiny_dir)
    assert first.ok and not first.run["resumed"] and first.run["rows_this_run"] == 9
    files = sorted(p.name for p in (tmp_path / "out" / "metadata").iterdir())
    with pytest.raises(
        ConfigError, match=r"different job \(changed: generation.num_inference_steps\)"
    ):
        run(tmp_path, prompts_dir, tiny_dir, generation={"num_inference_steps": 4})
    # Resources and the file size are not part of the job: a rerun on other hardware
    # resumes, and finds nothing to do.
    again = run(
        tmp_path,
        prompts_dir,
        tiny_dir,
        resources={"batch_size": 2},
        output={"rows_per_file": 3},
    )
    assert again.ok and again.run["resumed"]
    assert (again.run["rows_this_run"], again.run["skipped_by_resume"]) == (0, 9)
    assert sorted(p.name for p in (tmp_path / "out" / "metadata").iterdir()) == files
    fresh = run(tmp_path, prompts_dir, tiny_dir, output={"overwrite": True})
    assert fresh.ok and not fresh.run["resumed"] and fresh.run["rows_this_run"] == 9
    assert len(read_metadata(tmp_path / "out")) == 9


def test_metadata_files_gather_the_rows_of_several_batches(
    ray_local, tmp_path, prompts_dir, tiny_dir
):
    def file_rows(out):
        files = sorted((out / "metadata").glob("*.parquet"))
        return sorted(pq.read_metadata(f).num_rows for f in files)

    # Default: a table this small is one file, not one per batch of 2.
    assert run(tmp_path / "a", prompts_dir, tiny_dir, resources={"batch_size": 2}).ok
    assert file_rows(tmp_path / "a" / "out") == [9]
    four = run(
        tmp_path / "b",
        prompts_dir,
        tiny_dir,
        resources={"batch_size": 2},
        output={"rows_per_file": 4},
    )
    rows = file_rows(tmp_path / "b" / "out")
    # At least 4 rows a file (whole batches), but for the last one; every row once.
    assert four.ok and sum(rows) == 9 and len(rows) >= 2 and min(rows[1:]) >= 4, rows
    assert len(read_metadata(tmp_path / "b" / "out")) == 9
    assert len(list((tmp_path / "b" / "out" / "images").glob("*.png"))) == 6


def test_output_with_foreign_files_is_refused(tmp_path, prompts_dir, tiny_dir):
    (tmp_path / "out" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no k3batch job to resume"):
        run(tmp_path, prompts_dir, tiny_dir)
