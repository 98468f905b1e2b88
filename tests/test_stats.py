"""Per-file stats (img2dataset's NNNNN_stats.json) and score columns after small jobs, and
`k3batch report` counting from the stats or, for a file without them, from its rows."""

import json
import tarfile
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k3batch import resume
from k3batch.config import load_config
from k3batch.job.run import run_job
from k3batch.outputs import shards, stats
from k3batch.report.page import write_report
from k3batch.report.scan import StatsScan, scan_rows

from .conftest import job_config

SCORES = ("brightness", "sharpness")


def prompts(path, n=6):
    """`n` rows; row 1 has an empty prompt and row 4 a width that is no multiple of 64."""
    pq.write_table(
        pa.table(
            {
                "prompt": [("" if i == 1 else f"a red cat number {i}") for i in range(n)],
                "width": pa.array([63 if i == 4 else None for i in range(n)], pa.int64()),
            }
        ),
        path,
    )
    return str(path)


def check_stats(record_files, config_hash, folder=""):
    """Every record file has a stats file whose counts are its rows'."""
    assert record_files
    for path in record_files:
        table = pq.read_table(path)
        st = json.loads((path.parent / folder / (path.stem + "_stats.json")).read_text())
        statuses = Counter(table.column("status").to_pylist())
        assert st["count"] == table.num_rows
        assert st["status_dict"] == dict(statuses)
        assert (st["successes"], st["failed_to_generate"]) == (statuses["ok"], statuses["error"])
        fields = Counter(
            e.split(":", 1)[0]
            for e in table.column("error").to_pylist()
            if e
            for e in e.split("; ")
        )
        assert st["errors_by_field"] == dict(fields)
        seconds = [s for s in table.column("generate_seconds").to_pylist() if s is not None]
        assert st["generate_seconds"]["count"] == len(seconds) == statuses["ok"]
        assert st["generate_seconds"]["sum"] == pytest.approx(sum(seconds))
        assert st["config_hash"] == config_hash and st["k3batch_version"]
        assert st["start_time"] <= st["end_time"]


def job_hash(out):
    return json.loads((out / "_k3batch" / "job.json").read_text())["fingerprint"]


@pytest.mark.slow
def test_files_job_scores_and_stats_and_report_from_them(
    ray_local, tmp_path, tiny_dir, tiny_scorers
):
    clip, nsfw = tiny_scorers
    cfg = job_config(
        tmp_path,
        prompts(tmp_path / "in.parquet"),
        tiny_dir,
        generation={"num_inference_steps": 2},
        resources={"batch_size": 2},
        output={"rows_per_file": 2},
        scores={
            "enabled": True,
            "clip_model": clip,
            "classifiers": [{"name": "nsfw", "path": nsfw, "label": "nsfw"}],
            "device": "cpu",
            "num_cpus_per_actor": 0.25,
            "batch_size": 2,  # blocks of 2 rows reach the metadata write: 3 files
        },
    )
    result = run_job(load_config(data=cfg))
    assert result.ok and (result.run["ok"], result.run["error"]) == (4, 2)
    out = tmp_path / "out"
    files = sorted((out / "metadata").glob("*.parquet"))
    assert len(files) >= 2
    check_stats(files, job_hash(out), "_stats")
    assert job_hash(out) == resume.fingerprint(resume.job_identity(load_config(data=cfg)))

    columns = (*SCORES, "clip_score", "nsfw_score")
    rows = pq.read_table(out / "metadata").to_pylist()
    for row in rows:  # scores for every image, null for every failed row
        assert all((row[c] is not None) == (row["status"] == "ok") for c in columns), row
    hf = pq.read_table(out / "images" / "metadata.parquet")
    assert set(columns) <= set(hf.column_names) and hf.num_rows == 4

    # The report counts from the stats: the same totals as a scan of the rows.
    fs = fsspec.filesystem("file")
    names = [str(f) for f in files]
    from_stats = StatsScan.read(fs, names, stats.read_stats(fs, names, "_stats"))
    from_rows = scan_rows(fs, names)
    assert (from_stats.rows, from_stats.statuses, from_stats.error_kinds) == (
        from_rows.rows,
        from_rows.statuses,
        from_rows.error_kinds,
    )
    assert len(from_stats.error_examples) == 2 == len(from_rows.error_examples)
    report = write_report(str(out), samples=3, thumb=32)
    assert report.counted_from == "stats" and len(report.samples) == 3
    html = (out / "report" / "index.html").read_text()
    assert "the stats files of" in html

    # A record file without its stats file: the report falls back to the rows.
    (files[0].parent / "_stats" / (files[0].stem + "_stats.json")).unlink()
    report = write_report(str(out), samples=3, thumb=32)
    assert (report.counted_from, report.files_without_stats) == ("rows", 1)
    assert "1 without a stats file" in (out / "report" / "index.html").read_text()


@pytest.mark.slow
def test_webdataset_job_stats_and_scores_in_index_and_samples(ray_local, tmp_path, tiny_dir):
    cfg = job_config(
        tmp_path,
        prompts(tmp_path / "in.parquet"),
        tiny_dir,
        generation={"num_inference_steps": 2},
        resources={"batch_size": 2},
        output={"format": "webdataset", "shard_size": 2},
        scores={"enabled": True, "batch_size": 2},  # statistics only: CPU tasks, no model
    )
    result = run_job(load_config(data=cfg))
    assert result.ok and (result.run["ok"], result.run["error"]) == (4, 2)
    out = tmp_path / "out" / "shards"
    indexes = sorted(out.glob("*.parquet"))
    assert len(indexes) >= 2
    assert sorted(p.name for p in out.glob("*_stats.json")) == [
        p.stem + "_stats.json" for p in indexes
    ]
    check_stats(indexes, job_hash(tmp_path / "out"))
    index = [r for p in indexes for r in pq.read_table(p).to_pylist()]
    assert all((r["brightness"] is not None) == (r["status"] == "ok") for r in index)
    samples = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            samples += [
                json.loads(tar.extractfile(m).read())
                for m in tar.getmembers()
                if m.name.endswith(".json")
            ]
    assert len(samples) == 4 and all(0 <= s["brightness"] <= 1 for s in samples)


def test_renumber_moves_a_shards_stats_with_it(tmp_path):
    fs = fsspec.filesystem("file")
    for n in (0, 3):
        for ext in (".tar", ".parquet", "_stats.json"):
            (tmp_path / f"{n:05d}{ext}").write_text(f"shard {n}")
    assert shards.renumber(fs, str(tmp_path), 5) == 2
    assert (tmp_path / "00001_stats.json").read_text() == "shard 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{n:05d}{ext}" for n in (0, 1) for ext in (".parquet", ".tar", "_stats.json")
    ]
