"""Whole jobs for the family's other members on local Ray with the tiny models."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.config import load_config
from k3batch.job.run import run_job

from .conftest import job_config
from .test_job import read_metadata

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "data" / "inpaint"


def run(tmp_path, table, model_dir, **sections):
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    cfg = load_config(data=job_config(tmp_path, str(path), model_dir, **sections))
    return run_job(cfg)


def test_inpaint_job_on_the_shipped_example_with_bad_rows(ray_local, tmp_path, tiny_dir):
    shipped = pq.read_table(REPO / "data" / "inpaint_demo.parquet").to_pylist()
    rows = [{**r, "image": str(REPO / r["image"]), "mask": str(REPO / r["mask"])} for r in shipped]
    rows += [
        {
            "id": "no-file",
            "prompt": "x",
            "image": str(EXAMPLE / "nope.png"),
            "mask": rows[0]["mask"],
        },
        {"id": "mask-size", "prompt": "x", "image": rows[0]["image"], "mask": rows[1]["mask"]},
        {"id": "no-mask", "prompt": "x", "image": rows[0]["image"], "mask": None},
    ]
    result = run(
        tmp_path,
        pa.Table.from_pylist(rows),
        tiny_dir,
        model={"name": "kandinsky3-inpaint"},
        generation={"num_inference_steps": 2},
    )
    meta = {m["id"]: m for m in read_metadata(tmp_path / "out")}
    assert result.ok and len(meta) == 7
    assert meta["no-file"]["error"].startswith("image: cannot read")
    assert meta["mask-size"]["error"].startswith(
        "mask: size 192x128 differs from the image's 128x128"
    )
    assert meta["no-mask"]["error"].startswith("mask: missing (null)")
    sizes = {"house": (128, 128), "lake": (192, 128), "tower": (64, 128), "field": (128, 128)}
    for name, size in sizes.items():
        m = meta[f"inpaint-{name}"]
        assert m["status"] == "ok", m["error"]
        assert (m["width"], m["height"]) == size and m["guidance_scale"] == 4.0
        with Image.open(m["image_uri"]) as image:
            assert image.size == size
    assert result.run["errors_by_field"] == {"image": 1, "mask": 2}
    assert "source_rgb" not in meta["inpaint-house"] and "keep_mask" not in meta["inpaint-house"]


def test_refined_base_job_with_text_and_image_rows(ray_local, tmp_path, tiny_dir):
    table = pa.table(
        {
            "prompt": ["a red cat", "a castle at dusk"],
            "image": [None, str(EXAMPLE / "lake.png")],
            "strength": pa.array([None, 0.5], pa.float64()),
        }
    )
    result = run(tmp_path, table, tiny_dir, model={"refine": True})
    meta = sorted(read_metadata(tmp_path / "out"), key=lambda m: m["prompt"])
    assert result.ok and [m["status"] for m in meta] == ["ok", "ok"], meta
    text_row, image_row = meta[1], meta[0]
    assert text_row["strength"] is None and image_row["strength"] == 0.5
    assert (image_row["width"], image_row["height"]) == (192, 128)
    assert all(m["model"].startswith("kandinsky3+flash-refiner:") for m in meta)
