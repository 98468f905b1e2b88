"""Stages called on plain dict batches, without Ray."""

import io

import pyarrow as pa
import pytest
from PIL import Image

from k3batch.config import ModelConfig
from k3batch.rows.rules import RowRules
from k3batch.stages.base import apply_stage
from k3batch.stages.generate import GenerateStage
from k3batch.stages.validate import ValidateStage
from k3batch.stages.write import WriteImagesStage
from k3batch.storage import StorageError

from .conftest import FP32

RULES = RowRules(width=64, height=64, num_inference_steps=3, seed=0)


def test_validate_stage_on_a_dict_batch_derives_ids_and_marks_bad_rows():
    stage = ValidateStage(RULES)
    batch = {
        "prompt": ["a cat", "", None, "a dog"],
        "row_hash": [1, 2, 3, 255],
        "width": [None, 64, 64, 63],
    }
    out = stage(batch)
    assert out["id"] == [
        "0000000000000001",
        "0000000000000002",
        "0000000000000003",
        "00000000000000ff",
    ]
    assert out["status"] == ["ok", "error", "error", "error"]
    assert out["error"][1].startswith("prompt:") and "null" in out["error"][2]
    assert out["error"][3] == "width: must be a positive multiple of 64, got 63"
    assert out["width"] == [64, 64, 64, None]


def test_validate_stage_uses_id_column_and_flags_bad_ids():
    stage = ValidateStage(RULES, prompt_column="caption", id_column="key")
    out = stage({"caption": ["a", "b", "c"], "key": ["k1", 7, None], "row_hash": [1, 2, 3]})
    assert out["id"] == ["k1", "7", "0000000000000003"]
    assert out["status"] == ["ok", "ok", "error"]
    assert out["error"][2].startswith("key:")


def test_rows_sharing_an_id_become_errors_under_ids_of_their_own():
    from k3batch.config import ConfigError
    from k3batch.job.inputs import repeated_ids

    # Found before the job (across all files), as ValidateStage spells ids: 7 and "7" are one.
    repeated = repeated_ids(pa.chunked_array([["a", "7", "b", "a", None, None, ""]]), "id")
    assert repeated == {"a": 2}
    assert repeated_ids(pa.chunked_array([[7, 7, 8]]), "id") == {"7": 2}
    with pytest.raises(ConfigError, match="input.id_column: 10001 values of column 'id' repeat"):
        repeated_ids(pa.chunked_array([[f"x{i}" for i in range(10001)] * 2]), "id")
    stage = ValidateStage(RULES, duplicate_ids={"a": 2})
    out = stage({"prompt": ["x", "y", "z"], "id": ["a", "b", "a"], "row_hash": [1, 2, 3]})
    assert out["id"] == ["0000000000000001", "b", "0000000000000003"]
    assert out["status"] == ["error", "ok", "error"]
    assert out["error"][0] == "id: 'a' is not unique (2 input rows give it)"


def test_validate_keeps_input_columns_and_renames_clashing_ones():
    table = pa.table(
        {
            "prompt": ["a cat"],
            "row_hash": pa.array([5], pa.uint64()),
            "status": ["mine"],
            "extra": [1],
        }
    )
    out = apply_stage(ValidateStage(RULES), table)
    assert out.column("input_status").to_pylist() == ["mine"]
    assert out.column("status").to_pylist() == ["ok"]
    assert out.column("extra").to_pylist() == [1]
    # row_hash stays: it is the id Ray's checkpoint records for resume.
    assert out.column("row_hash").to_pylist() == [5]
    assert out.schema.field("seed").type == pa.uint64()


def test_validate_without_id_or_row_hash_is_a_clear_error():
    with pytest.raises(KeyError, match="'id' column or a 'row_hash'"):
        apply_stage(ValidateStage(RULES), pa.table({"prompt": ["a"]}))


@pytest.fixture(scope="module")
def generate_stage(tiny_dir):
    return GenerateStage(
        ModelConfig(**{"name": "kandinsky3", "path": tiny_dir, "dtype": FP32, "device": "cpu"})
    )


def valid_batch(prompts, **overrides):
    stage = ValidateStage(RULES)
    batch = {"prompt": prompts, "row_hash": list(range(len(prompts))), **overrides}
    return {**batch, **stage(batch)}


def test_generate_stage_groups_sizes_and_passes_error_rows_through(generate_stage):
    batch = valid_batch(
        ["a cat", "a dog", "", "a fox"], width=[64, 128, None, 64], height=[64, 64, None, 128]
    )
    out = generate_stage(batch)
    assert out["status"] == ["ok", "ok", "error", "ok"]
    assert out["image_rgb"][2] is None and out["error"][2].startswith("prompt:")
    sizes = [len(b) if b else 0 for b in out["image_rgb"]]
    assert sizes == [64 * 64 * 3, 64 * 128 * 3, 0, 128 * 64 * 3]
    assert out["uncond_embedding"][0] == "null_embedding"
    assert out["model"][0].startswith("kandinsky3:") and out["generate_seconds"][0] > 0


def test_the_scale_benchmarks_stand_in_is_the_generation_stage_without_a_model(tmp_path):
    """The instant stand-in (benchmarks/scale.py) keeps the stage's own work (sizes, records,
    error rows) and loads nothing: a config whose model folder does not exist still runs."""
    from k3batch.testing.standin import GREY, STANDIN_LABEL, instant_generate_stage

    missing = str(tmp_path / "no-weights-here")
    stage = instant_generate_stage()(
        ModelConfig(name="kandinsky3", path=missing, dtype=FP32, device="cpu")
    )
    out = stage(valid_batch(["a cat", "", "a fox"], width=[64, None, 128]))
    assert out["status"] == ["ok", "error", "ok"]
    assert [len(b) if b else 0 for b in out["image_rgb"]] == [64 * 64 * 3, 0, 64 * 128 * 3]
    assert set(out["image_rgb"][2]) == {GREY} and out["model"][0] == STANDIN_LABEL


def test_generate_stage_retries_a_failing_batch_row_by_row(generate_stage, monkeypatch):
    real = generate_stage.pipe.generate

    def poisoned(requests):
        if any(r.prompt == "poison" for r in requests):
            raise RuntimeError("boom")
        return real(requests)

    monkeypatch.setattr(generate_stage.pipe, "generate", poisoned)
    out = generate_stage(valid_batch(["a cat", "poison", "a dog"]))
    assert out["status"] == ["ok", "error", "ok"]
    assert out["error"][1] == "generate: RuntimeError: boom"


def test_write_stage_writes_images_and_sets_uri(tmp_path):
    stage = WriteImagesStage(str(tmp_path), "jpeg", quality=90)
    raw = bytes(range(256)) * (64 * 64 * 3 // 256)
    out = stage(
        {
            "id": ["a/../b", "ok-row", "bad"],
            "image_rgb": [raw, raw, None],
            "width": [64, 64, 64],
            "height": [64, 64, 64],
            "status": ["ok", "ok", "error"],
            "error": [None, None, "prompt: empty"],
        }
    )
    assert out["status"] == ["ok", "ok", "error"] and out["image_uri"][2] is None
    assert out["image_uri"][1] == f"{tmp_path}/images/ok-row.jpg"
    assert out["image_uri"][0].startswith(f"{tmp_path}/images/a_.._b-h")
    for uri in out["image_uri"][:2]:
        with open(uri, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
        assert image.format == "JPEG" and image.size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        uri.rsplit("/", 1)[1] for uri in out["image_uri"][:2]
    )


def test_write_stage_fails_the_batch_when_storage_fails_and_marks_unencodable_rows(tmp_path):
    stage = WriteImagesStage(str(tmp_path), "png")
    batch = {
        "id": ["short", "y", "x"],
        # 10 bytes cannot be a 64x64 image: that row's error, not the batch's
        "image_rgb": [b"\0" * 10] + [b"\0" * 64 * 64 * 3] * 2,
        "width": [64] * 3,
        "height": [64] * 3,
        "status": ["ok"] * 3,
        "error": [None] * 3,
    }
    (tmp_path / "images" / "x.png").mkdir()  # a directory where the file must go: fails as root
    # The store failing (after its retries) is no row's fault: the batch fails, so the job
    # stops and a rerun writes these rows, instead of recording them as errors for good.
    with pytest.raises(StorageError, match=r"output.uri: cannot write .*/images/x.png: "):
        stage(batch)
    (tmp_path / "images" / "x.png").rmdir()
    out = stage(batch)
    assert out["status"] == ["error", "ok", "ok"] and out["image_uri"][0] is None
    assert out["error"][0].startswith("encode: ")


def test_generate_stage_sets_its_torch_thread_count(tiny_dir):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither the suite's 1 nor the stage's 2
        GenerateStage(
            ModelConfig(**{"name": "kandinsky3", "path": tiny_dir, "dtype": FP32, "device": "cpu"}),
            torch_threads=2,
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
