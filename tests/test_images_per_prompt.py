"""Several images per prompt: a row with num_images_per_prompt = N yields N records (`k`,
seed + k), its prompt encoded once; accounting counts rows x N, and resume works per image."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from k3batch import resume, schema
from k3batch.config import ModelConfig, load_config
from k3batch.job.run import run_job
from k3batch.rows.check import normalise_row
from k3batch.rows.records import object_key, record_hashes, record_key, several_images
from k3batch.rows.rules import RowRules
from k3batch.rows.seeds import records_of
from k3batch.stages.generate import GenerateStage
from k3batch.stages.validate import ValidateStage
from k3batch.summary import summary

from .conftest import FP32, job_config

REPO = Path(__file__).resolve().parent.parent
RULES = RowRules(width=64, height=64, num_inference_steps=2, num_images_per_prompt=2)


def normalise(**raw):
    return normalise_row({"id": "a", "prompt": "a cat", **raw}, "prompt", RULES)


def test_rows_resolve_images_and_their_seeds():
    row = normalise(seed=10)
    assert row["num_images_per_prompt"] == 2 and row["image_seeds"] == [10, 11]
    row = normalise(seed=10, num_images_per_prompt=4)
    assert row["status"] == "ok" and row["image_seeds"] == [10, 11, 12, 13]
    derived = normalise()
    assert derived["image_seeds"] == [derived["seed"], derived["seed"] + 1]
    drawn = normalise(seed=-1, num_images_per_prompt=5)
    assert drawn["seed"] == drawn["image_seeds"][0] and len(set(drawn["image_seeds"])) == 5
    for value, text in (
        (0, "num_images_per_prompt: must be >= 1, got 0"),
        (65, "num_images_per_prompt: 65 is above limits.max_num_images_per_prompt=64"),
        (2.5, "num_images_per_prompt: expected an integer, got 2.5"),
        ("3", "num_images_per_prompt: expected an integer, got '3'"),
    ):
        row = normalise(num_images_per_prompt=value)
        assert row["status"] == "error" and row["error"] == text, row
        assert records_of(value, RULES) == 1  # its one error record
    top = normalise(seed=2**64 - 2, num_images_per_prompt=3)
    assert top["status"] == "error" and top["error"].startswith("seed: 18446744073709551614 +")


def test_record_hashes_keep_a_rows_first_image_and_spread_the_others():
    h = np.array([5, 5, 5, 2**64 - 1], dtype=np.uint64)
    out = record_hashes(h, [0, 1, 2, 1])
    assert out[0] == 5 and len(set(out.tolist())) == 4 and out.dtype == np.uint64
    assert record_hashes([5], [1])[0] == out[1]  # a function of (row_hash, k) alone


def test_record_keys_carry_k_only_in_several_image_jobs():
    assert record_key("a.b", 0, several=False) == "a.b"
    assert record_key("a.b", 2, several=True) == "a.b_2"
    assert record_key("a.b", 2, several=True, dots=False) == object_key("a.b", False) + "_2"
    # Injective: a row "x_1" of one image never meets row "x"'s second image.
    assert record_key("x_1", 0, True) != record_key("x", 1, True)
    assert several_images(1, ["prompt", "num_images_per_prompt"])
    assert not several_images(1, ["prompt"]) and several_images(3, [])


def test_checkpoint_filter_keeps_rows_with_images_left():
    block = pa.table(
        {
            "row_hash": pa.array([11, 22, 33, 44], pa.uint64()),
            "num_images_per_prompt": [3, None, 0, 3],
        }
    )
    committed = np.sort(
        np.concatenate(
            [
                record_hashes([11, 11], [0, 2]),  # row 11: k=1 left
                record_hashes([22, 22], [0, 1]),  # row 22 (default 2): done
                record_hashes([33], [0]),  # row 33: its one error record, done
            ]
        )
    )
    out = resume.filter_images(block, committed, RULES)
    assert out.column("row_hash").to_pylist() == [11, 44]
    assert out.column(schema.IMAGES_DONE).to_pylist() == [[0, 2], []]


@pytest.fixture(scope="module")
def stage(tiny_dir):
    model = ModelConfig(path=tiny_dir, dtype=FP32, device="cpu")
    return GenerateStage(model)


def validated(rows_in):
    table = pa.table(
        {
            "id": [r["id"] for r in rows_in],
            "prompt": [r["prompt"] for r in rows_in],
            "seed": [r.get("seed") for r in rows_in],
            "num_images_per_prompt": [r.get("n") for r in rows_in],
            "row_hash": pa.array([hash(r["id"]) % 2**63 for r in rows_in], pa.uint64()),
        }
    )
    from k3batch.stages.base import apply_stage

    return apply_stage(ValidateStage(RULES), table)


def images(table):
    return [
        np.frombuffer(b, np.uint8).reshape(64, 64, 3) for b in table.column("image_rgb").to_pylist()
    ]


def test_a_rows_images_are_seed_plus_k_and_share_one_encoding(stage):
    from k3batch.stages.base import apply_stage

    seen = []

    def count(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_ids"]).shape[0])

    hook = stage.pipe.text_encoder.register_forward_pre_hook(count, with_kwargs=True)
    try:
        table = validated(
            [
                {"id": "a", "prompt": "a red cat", "seed": 7, "n": 3},
                {"id": "b", "prompt": "a blue dog", "seed": 3, "n": 1},
                {"id": "c", "prompt": "", "n": 2},  # an error row: two error records
            ]
        )
        out = apply_stage(stage, table)
    finally:
        hook.remove()
    assert out.column("id").to_pylist() == ["a", "a", "a", "b", "c", "c"]
    assert out.column("k").to_pylist() == [0, 1, 2, 0, 0, 1]
    assert out.column("seed").to_pylist()[:4] == [7, 8, 9, 3]
    assert out.column("status").to_pylist() == ["ok"] * 4 + ["error"] * 2
    hashes = out.column("record_hash").to_pylist()
    row_hash = out.column("row_hash").to_pylist()
    assert hashes[0] == row_hash[0] and len(set(hashes)) == 6
    assert "image_seeds" not in out.column_names
    # Two prompts went through T5 (no negative prompts here), not one per image (four).
    assert sum(seen) == 2
    got = images(out.slice(0, 4))
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[1], got[2])

    # Image k of a row is the image a one-image row with seed + k gets, alone in its batch.
    alone = apply_stage(stage, validated([{"id": "z", "prompt": "a red cat", "seed": 9, "n": 1}]))
    from .conftest import assert_same_images

    assert_same_images([got[2]], images(alone))


def test_resumed_rows_make_only_their_missing_images(stage):
    from k3batch.stages.base import apply_stage

    table = validated([{"id": "a", "prompt": "a red cat", "seed": 7, "n": 3}])
    table = table.append_column(
        schema.IMAGES_DONE, pa.array([[0, 2]], schema.TYPES[schema.IMAGES_DONE])
    )
    out = apply_stage(stage, table)
    assert out.column("k").to_pylist() == [1] and out.column("seed").to_pylist() == [8]
    assert schema.IMAGES_DONE not in out.column_names


def _records(directory):
    files = sorted(directory.glob("*.parquet"))
    return pads.dataset([str(f) for f in files], format="parquet").to_table()


@pytest.mark.slow
def test_job_writes_rows_times_n_records_and_resumes_per_image(ray_local, tmp_path, tiny_dir):
    prompts = [f"prompt number {i}" for i in range(5)]
    prompts[3] = ""
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i}" for i in range(5)],
                "prompt": prompts,
                "num_images_per_prompt": [None, 3, 1, None, 0],
            }
        ),
        tmp_path / "in.parquet",
    )
    cfg = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_dir,
        generation={"num_inference_steps": 2, "num_images_per_prompt": 2},
        resources={"batch_size": 2},
    )
    # r0: 2, r1: 3, r2: 1, r3 (empty prompt): 2 error records, r4 (N=0): 1 error record.
    first = run_job(load_config(data=cfg))
    assert first.ok, first.run["accounting"]
    assert (first.run["rows_in"], first.run["records_expected"], first.run["rows_out"]) == (
        5,
        9,
        9,
    )
    assert (first.run["ok"], first.run["error"]) == (6, 3)
    assert (
        "rows in       5 (9 records: num_images_per_prompt)\nrecords out   9\n"
        "ok / errors   6 / 3 records\nthis run      9 records; 0 finished earlier, skipped"
    ) in summary(first.run, first.kind)
    meta = tmp_path / "out" / "metadata"
    table = _records(meta)
    got = sorted(zip(table.column("id").to_pylist(), table.column("k").to_pylist(), strict=True))
    assert got == [("r0", 0), ("r0", 1), ("r1", 0), ("r1", 1), ("r1", 2), ("r2", 0)] + [
        ("r3", 0),
        ("r3", 1),
        ("r4", 0),
    ]
    names = sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png"))
    assert names == ["r0_0.png", "r0_1.png", "r1_0.png", "r1_1.png", "r1_2.png", "r2_0.png"]
    hf = pq.read_table(tmp_path / "out" / "images" / "metadata.parquet")
    assert "record_hash" not in hf.column_names and hf.num_rows == 6

    # Lose r1's images k=1 and k=2 as a run preempted between commits would: their records,
    # their checkpoint ids and their files. The rerun makes exactly those two.
    lost = record_hashes(
        [table.filter(pa.compute.equal(table.column("id"), "r1")).column("row_hash")[0].as_py()]
        * 2,
        [1, 2],
    ).tolist()
    for path in meta.glob("*.parquet"):
        part = pq.read_table(path)
        keep = pa.compute.invert(
            pa.compute.is_in(part.column("record_hash"), pa.array(lost, pa.uint64()))
        )
        pq.write_table(part.filter(keep), path)
    checkpoint = tmp_path / "out" / "_k3batch" / "checkpoint"
    for path in checkpoint.glob("*.parquet"):
        part = pq.read_table(path)
        keep = pa.compute.invert(
            pa.compute.is_in(part.column("record_hash"), pa.array(lost, pa.uint64()))
        )
        pq.write_table(part.filter(keep), path)
    for k in (1, 2):
        (tmp_path / "out" / "images" / f"r1_{k}.png").unlink()

    again = run_job(load_config(data=cfg))
    assert again.ok and again.run["resumed"], again.run["accounting"]
    assert (again.run["rows_this_run"], again.run["rows_out"]) == (2, 9)
    table = _records(meta)
    got_again = sorted(
        zip(table.column("id").to_pylist(), table.column("k").to_pylist(), strict=True)
    )
    assert got_again == got
    assert (tmp_path / "out" / "images" / "r1_2.png").exists()


def test_webdataset_sample_keys_carry_k():
    from k3batch.stages.write import EncodeImagesStage

    rgb = bytes(64 * 64 * 3)
    batch = {
        "id": ["a.b", "a.b"],
        "k": [0, 1],
        "image_rgb": [rgb, rgb],
        "width": [64, 64],
        "height": [64, 64],
        "status": ["ok", "ok"],
        "error": [None, None],
    }
    out = EncodeImagesStage(several_images=True)(batch)
    assert out["key"] == [
        object_key("a.b", False) + "_0",
        object_key("a.b", False) + "_1",
    ]
    assert EncodeImagesStage()(batch)["key"] == [object_key("a.b", False)] * 2


@pytest.mark.slow
def test_the_dataset_walkthrough_runs_and_filters_by_score(ray_local, tmp_path, tiny_dir):
    """configs/dataset-demo.yaml as docs/dataset-synthesis.md runs it (on three prompts),
    then the docs' way to load the result with `datasets` and filter it by score."""
    import yaml
    from datasets import load_dataset

    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "prompt": ["a fox", "a tram", "a bowl of ramen"]}),
        tmp_path / "in.parquet",
    )
    data = yaml.safe_load((REPO / "configs" / "dataset-demo.yaml").read_text())
    data["input"]["uri"] = str(tmp_path / "in.parquet")
    data["output"]["uri"] = str(tmp_path / "out")
    data["model"].update(path=tiny_dir, make_tiny=False)
    data["generation"]["num_inference_steps"] = 2
    data["scores"]["clip_model"] = str(tmp_path / "scorers" / "clip")
    data["scores"]["classifiers"][0]["path"] = str(tmp_path / "scorers" / "nsfw")
    result = run_job(load_config(data=data))
    assert result.ok and (result.run["records_expected"], result.run["ok"]) == (12, 12)
    ds = load_dataset("imagefolder", data_dir=str(tmp_path / "out" / "images"), split="train")
    assert len(ds) == 12 and sorted(set(ds["k"])) == [0, 1, 2, 3]
    # Random CLIP weights clamp many clip scores to 0: the classifier's probabilities are the
    # spread-out column to cut at its median.
    assert all(v >= 0 for v in ds["clip_score"])
    median = sorted(ds["nsfw_score"])[6]
    good = ds.filter(lambda r: r["clip_score"] >= 0 and r["nsfw_score"] < median)
    assert len(good) == sum(v < median for v in ds["nsfw_score"]) and 0 < len(good) < 12
    assert good[0]["image"].size == (64, 64)


def test_resources_batch_size_bounds_the_images_per_model_call(stage):
    from k3batch.stages.base import apply_stage

    calls = []
    generate = stage.pipe.generate

    def counting(requests):
        calls.append(len(requests))
        return generate(requests)

    stage.pipe.generate, stage.max_images_per_call = counting, 2
    try:
        out = apply_stage(stage, validated([{"id": "a", "prompt": "a red cat", "seed": 7, "n": 3}]))
    finally:
        del stage.pipe.generate
        stage.max_images_per_call = None
    assert calls == [2, 1] and out.column("status").to_pylist() == ["ok"] * 3
