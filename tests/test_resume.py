"""Resume after preemption, and the webdataset output read back with the `webdataset` library."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from k3batch.config import load_config
from k3batch.job.run import run_job
from k3batch.rows.records import object_key

from .conftest import job_config

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(n, bad=(), ids=True):
    prompts = ["" if i in bad else f"prompt number {i}" for i in range(n)]
    columns = {"prompt": prompts, "n": list(range(n))}
    if ids:
        columns["id"] = [f"row-{i:03d}" for i in range(n)]
        columns["id"][1] = "odd.id/with../dots"  # a tar member's key must not keep its dots
    return pa.table(columns)


def records(directory):
    files = sorted(p for p in directory.glob("*.parquet") if p.stem.isdigit() or "_" in p.stem)
    return pads.dataset([str(f) for f in files], format="parquet").to_table().to_pylist()


def test_webdataset_shards_read_back_and_a_lost_shard_is_regenerated(ray_local, tmp_path, tiny_dir):
    import webdataset as wds

    pq.write_table(table(10, bad={4}), tmp_path / "in.parquet")
    cfg = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_dir,
        resources={"batch_size": 2},
        output={"format": "webdataset", "shard_size": 4, "image_format": "jpeg"},
    )
    first = run_job(load_config(data=cfg))
    assert first.ok and (first.run["ok"], first.run["error"]) == (9, 1)
    out = tmp_path / "out" / "shards"
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))] and len(tars) >= 2
    assert sorted(p.name for p in out.glob("*.parquet")) == [t.stem + ".parquet" for t in tars]

    def read_back():
        samples = list(
            wds.WebDataset([str(t) for t in sorted(out.glob("*.tar"))], shardshuffle=False).decode(
                "pil"
            )
        )
        return {s["json"]["id"]: s for s in samples}

    samples = read_back()
    index = records(out)
    assert len(index) == 10 and sorted(samples) == sorted(
        r["id"] for r in index if r["status"] == "ok"
    )
    for row_id, s in samples.items():
        assert s["__key__"] == object_key(row_id, dots=False) and "." not in s["__key__"]
        assert s["txt"] == s["json"]["prompt"] and s["jpg"].size == (64, 64)
        assert s["json"]["n"] == int(s["json"]["prompt"].split()[-1])
    assert sorted(r["key"] for r in index if r["status"] == "ok") == sorted(
        s["__key__"] for s in samples.values()
    )
    for tar in tars:  # each index lists exactly its own tar's samples, plus its rows in error
        with_image = {
            r["key"]
            for r in pq.read_table(tar.with_suffix(".parquet")).to_pylist()
            if r["status"] == "ok"
        }
        assert with_image == {s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)}

    # Lose shard 1 as a preempted run would (never committed): its files and its checkpoint.
    lost = {r["id"] for r in pq.read_table(out / "00001.parquet").to_pylist()}
    for path in (
        out / "00001.tar",
        out / "00001.parquet",
        tmp_path / "out" / "_k3batch" / "checkpoint" / "00001.parquet",
    ):
        path.unlink()
    again = run_job(load_config(data=cfg))
    assert again.ok and again.run["resumed"]
    assert (again.run["rows_this_run"], again.run["skipped_by_resume"]) == (
        len(lost),
        10 - len(lost),
    )
    # Numbers run 0..N-1 again, and every id is there exactly once.
    assert sorted(t.name for t in out.glob("*.tar")) == [t.name for t in tars]
    index = records(out)
    assert sorted(r["id"] for r in index) == sorted(table(10).column("id").to_pylist())
    assert sorted(read_back()) == sorted(samples)

    # Nothing left: a third run ends from _k3batch/complete.json (the second run wrote it;
    # the first run's stopped matching once shard 1 was lost, which is why the second made
    # rows): no dataset ran (no stage counted), and run.json carries the second run's
    # accounting, with every record skipped.
    complete = json.loads((tmp_path / "out" / "_k3batch" / "complete.json").read_text())
    assert complete["counts"]["rows_out"] == 10
    third = run_job(load_config(data=cfg))
    assert third.ok and third.run["resumed"]
    assert (third.run["rows_this_run"], third.run["skipped_by_resume"]) == (0, 10)
    assert (third.run["ok"], third.run["error"], third.run["stages"]) == (9, 1, {})
    assert third.run["accounting"]["ok"] and third.run["accounting"]["skipped_by_resume"] == 10
    assert sorted(t.name for t in out.glob("*.tar")) == [t.name for t in tars]


def test_killed_job_resumes_and_generates_only_missing_rows(tmp_path, tiny_dir, short_tmp):
    """A job killed part-way (SIGKILL to the driver and its local Ray) and rerun with the same
    config ends with one output per input row, and the rerun generated only the missing ones.
    The table has no id column: ids and the resume key both come from Ray's row hash."""
    n = 10
    pq.write_table(table(n, ids=False), tmp_path / "in.parquet")
    data = job_config(
        tmp_path,
        str(tmp_path / "in.parquet"),
        tiny_dir,
        # One row per batch and per metadata file, and enough steps per row that the run is
        # still going when the first rows are committed.
        generation={"num_inference_steps": 10},
        resources={"batch_size": 1, "num_cpus_per_actor": 1},
        output={"rows_per_file": 1},
        ray={"num_cpus": 2, "object_store_memory_mb": 200},
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    checkpoint = tmp_path / "out" / "_k3batch" / "checkpoint"
    cmd = [sys.executable, "-m", "k3batch.cli", "run", str(config)]
    # The job's own local Ray in a private dir (short: Ray's socket paths must fit 107 chars).
    env = {**os.environ, "RAY_TMPDIR": str(short_tmp("r"))}

    # Its own session, so the kill takes the driver's whole local Ray down with it, as a
    # preempted machine would.
    first = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 400
    try:
        while len(list(checkpoint.glob("*[0-9].parquet"))) < 2:  # 2 committed writes
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run committed no rows"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Rows Ray committed (checkpoint written after their metadata file); a write caught
    # half-way left a pending checkpoint, and the rerun deletes its file and redoes its rows.
    done = sum(pq.read_metadata(f).num_rows for f in checkpoint.glob("*[0-9].parquet"))
    assert 2 <= done < n, "the kill came too late to leave work for the rerun"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["resumed"] and run["accounting"]["ok"]
    assert (run["rows_out"], run["ok"]) == (n, n)
    # The rerun generated exactly the rows without finished output.
    assert run["skipped_by_resume"] == done and run["rows_this_run"] == n - done
    rows = records(tmp_path / "out" / "metadata")
    assert sorted(r["n"] for r in rows) == list(range(n)) and len({r["id"] for r in rows}) == n
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == n
    assert f"this run      {n - done} rows; {done} finished earlier" in second.stdout
