"""Issue #6: poisoned rows, crashed and stuck workers, a failed accounting, all on local Ray
with the tiny model. Faults come from the test hooks in k3batch.testing.faults (K3BATCH_TEST_*),
which the driver reads when it builds the job and hands to the generation actors."""

import io
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.cli import main
from k3batch.config import ConfigError, load_config
from k3batch.job import kinds
from k3batch.job.inputs import inspect_input
from k3batch.job.run import run_job

from .conftest import job_config


def png(w, h, seed=0, grey=False) -> bytes:
    rng = np.random.default_rng(seed)
    array = (
        np.where(np.arange(w)[None, :] < w // 2, 255, 0).repeat(h, 0).astype(np.uint8)
        if grey
        else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def metadata(out) -> dict[str, dict]:
    rows = pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "an id twice"
    return {r["id"]: r for r in rows}


def small(tmp_path, input_uri, tiny_dir, **sections):
    cfg = job_config(tmp_path, input_uri, tiny_dir, **sections)
    cfg["generation"]["num_inference_steps"] = 2
    return cfg


# Each bad kind: id -> (prompt and column values, the field its error must name).
N = None
BAD = {
    "prompt-null": ({"prompt": N}, "prompt: missing (null)"),
    "prompt-empty": ({"prompt": ""}, "prompt: empty"),
    "prompt-blank": ({"prompt": " \t\n "}, "prompt: empty"),
    "prompt-100kB": ({"prompt": "x" * 100_000}, "prompt: 100000 characters"),
    "prompt-controls-only": ({"prompt": "\x00\x07\u200b\x1b"}, "prompt: no visible characters"),
    "width-0": ({"width": 0}, "width: must be a positive multiple of 64, got 0"),
    "width-63": ({"width": 63}, "width: must be a positive multiple of 64, got 63"),
    "width-100000": ({"width": 100000}, "width: must be a positive multiple of 64, got 100000"),
    "steps-0": ({"num_inference_steps": 0}, "num_inference_steps: must be >= 1, got 0"),
    "steps--1": ({"num_inference_steps": -1}, "num_inference_steps: must be >= 1, got -1"),
    "steps-1e6": ({"num_inference_steps": 10**6}, "num_inference_steps: 1000000 is above"),
    "guidance-nan": ({"guidance_scale": math.nan}, "guidance_scale: must be finite, got nan"),
    "guidance-inf": ({"guidance_scale": math.inf}, "guidance_scale: must be finite, got inf"),
    "seed--2": ({"seed": -2.0}, "seed: must be -1 or in [0, 2**64), got -2"),
    "seed-2^70": ({"seed": 2.0**70}, f"seed: must be -1 or in [0, 2**64), got {2**70}"),
    "seed-1.5": ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
    # `height` is a text column in this table: the wrong type for every row that sets it.
    "height-text": ({"height": "64"}, "height: expected an integer, got '64'"),
    "image-garbage": ({"image": b"not an image"}, "image: not a readable image: <12 bytes>"),
    "image-truncated": ({"image": b"\x89PNG\r\n"}, "image: not a readable image: <6 bytes>"),
    "image-too-small": ({"image": png(40, 40)}, "image: 40x40 is too small"),
}
GOOD = {
    "good-plain": {"prompt": "a red cat"},
    "good-controls": {"prompt": "a cat\x00 in\x1b[31m red\r\n"},
    "good-mixed-scripts": {"prompt": "кот 猫 cat قطة 🐈 γάτα"},
    "good-settings": {"prompt": "a tree", "width": 128, "seed": 7.0, "guidance_scale": 0.0},
    "good-image": {"prompt": "a dog", "image": png(100, 70)},
}


# Bad ids: the `case` column tells these rows apart (they get ids derived from the row).
BAD_IDS = {
    "id-null": (None, "id: expected a non-empty string or integer, got None"),
    "id-empty": ("", "id: expected a non-empty string or integer, got ''"),
    "id-dup-1": ("dup", "id: 'dup' is not unique (2 input rows give it)"),
    "id-dup-2": ("dup", "id: 'dup' is not unique (2 input rows give it)"),
}


def poisoned_table() -> pa.Table:
    rows = {**{k: v for k, (v, _) in BAD.items()}, **GOOD, **{k: {} for k in BAD_IDS}}
    cases = list(rows)
    ids = [BAD_IDS[c][0] if c in BAD_IDS else c for c in cases]

    def column(name, type_):
        return pa.array([rows[c].get(name) for c in cases], type_)

    return pa.table(
        {
            "id": ids,
            "case": cases,
            "prompt": [rows[c].get("prompt", "a fox") for c in cases],
            "width": column("width", pa.int64()),
            "height": column("height", pa.string()),
            "num_inference_steps": column("num_inference_steps", pa.int64()),
            "guidance_scale": column("guidance_scale", pa.float64()),
            "seed": column("seed", pa.float64()),
            "image": column("image", pa.binary()),
        }
    )


@pytest.mark.slow
def test_poisoned_table_completes_with_every_bad_row_named_and_every_good_image(
    ray_local, tmp_path, tiny_dir
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(poisoned_table(), inputs / "part-00.parquet")
    # A file without the prompt column (nor most others): its rows fail one by one.
    pq.write_table(
        pa.table({"id": ["no-prompt-1", "no-prompt-2"], "case": ["no-prompt-1", "no-prompt-2"]}),
        inputs / "part-01.parquet",
    )
    # Ray Data infers a schema from the first 16 files only, and drops the columns of the
    # 17th that those lack: its seed would be silently ignored without k3batch's schema.
    for i in range(2, 16):
        pq.write_table(
            pa.table({"id": [f"filler-{i}"], "case": [f"filler-{i}"]}),
            inputs / f"part-{i:02d}.parquet",
        )
    late = {"id": ["late-columns"], "case": ["late-columns"], "prompt": ["an owl"]}
    late |= {"seed": pa.array([42.0]), "note": ["kept"]}
    pq.write_table(pa.table(late), inputs / "part-16.parquet")
    result = run_job(load_config(data=small(tmp_path, str(inputs), tiny_dir)))
    run = result.run
    meta = {m["case"]: m for m in metadata(tmp_path / "out").values()}
    expected = {k: e for k, (_, e) in {**BAD, **BAD_IDS}.items()}
    expected.update({"no-prompt-1": "prompt: missing (null)", "no-prompt-2": "prompt: missing"})
    expected.update({f"filler-{i}": "prompt: missing (null)" for i in range(2, 16)})
    assert meta["late-columns"]["status"] == "ok", meta["late-columns"]["error"]
    assert (meta["late-columns"]["seed"], meta["late-columns"]["note"]) == (42, "kept")
    assert result.ok and run["accounting"]["ok"], run["accounting"]
    assert run["rows_in"] == run["rows_out"] == len(meta) == len(expected) + len(GOOD) + 1
    for case, needle in expected.items():
        row = meta[case]
        assert row["status"] == "error" and row["image_uri"] is None, case
        assert needle in row["error"], (case, row["error"])
    # Rows without a usable id are kept under an id derived from the row, never "dup" twice.
    assert {meta[c]["id"] for c in BAD_IDS}.isdisjoint({"dup", "", None})
    for row_id in GOOD:
        row = meta[row_id]
        assert row["status"] == "ok", (row_id, row["error"])
        with Image.open(row["image_uri"]) as image:
            assert image.size == (row["width"], row["height"])
    assert meta["good-settings"]["width"] == 128 and meta["good-image"]["width"] == 64
    assert run["ok"] == len(GOOD) + 1 and run["error"] == len(expected)


@pytest.mark.slow
def test_unreadable_inpainting_inputs_and_text_seeds_are_row_errors(ray_local, tmp_path, tiny_dir):
    mask = png(100, 70, grey=True)
    (tmp_path / "image.png").write_bytes(png(100, 70))
    (tmp_path / "garbage.png").write_bytes(b"GIF89a but not really")
    image = str(tmp_path / "image.png")
    table = pa.table(
        {
            "id": ["good", "missing-file", "garbage", "broken-mask", "mask-size", "seed-text"],
            "prompt": ["a cat"] * 6,
            # URIs in a text column, masks as bytes in a binary one
            "image": [image, str(tmp_path / "nowhere.png"), str(tmp_path / "garbage.png")]
            + [image] * 3,
            "mask": [mask, mask, mask, b"\x89PNG broken", png(50, 50, grey=True), mask],
            "seed": pa.array([None] * 5 + ["abc"], pa.string()),  # a text column
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = small(
        tmp_path, str(tmp_path / "in.parquet"), tiny_dir, model={"name": "kandinsky3-inpaint"}
    )
    result = run_job(load_config(data=cfg))
    meta = metadata(tmp_path / "out")
    assert result.ok and len(meta) == 6
    assert meta["good"]["status"] == "ok", meta["good"]["error"]
    errors = {k: m["error"] for k, m in meta.items() if m["status"] == "error"}
    assert errors["missing-file"].startswith("image: cannot read")
    assert errors["garbage"].startswith("image: not a readable image: '")
    assert errors["broken-mask"].startswith("mask: not a readable image")
    assert errors["mask-size"].startswith("mask: size 50x50 differs")
    assert errors["seed-text"] == "seed: expected an integer, got 'abc'"


def test_input_files_disagreeing_on_a_column_type_are_refused_at_start(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "seed": [1]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "seed": ["x"]}), tmp_path / "in" / "b.parquet")
    data = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(ConfigError) as err:
        cfg = load_config(data=data)
        inspect_input(cfg, kinds.get(cfg.job))
    message = str(err.value)
    assert "column 'seed' is int64 in" in message and "but string in" in message
    assert "a.parquet" in message and "b.parquet" in message and "\n" not in message


def prompts(tmp_path, n, special=None):
    rows = [f"prompt number {i}" for i in range(n)]
    for i, text in (special or {}).items():
        rows[i] = text
    pq.write_table(
        pa.table({"id": [f"r{i:02d}" for i in range(n)], "prompt": rows}), tmp_path / "in.parquet"
    )
    return str(tmp_path / "in.parquet")


@pytest.mark.slow
def test_killed_actor_and_a_batch_failing_on_one_row_cost_a_retry_and_that_row(
    ray_local, tmp_path, tiny_dir, monkeypatch
):
    # The 2nd batch kills its actor's process (once); a batch holding POISON raises.
    monkeypatch.setenv("K3BATCH_TEST_CRASH_ON_BATCH", "2")
    monkeypatch.setenv("K3BATCH_TEST_FAIL_PROMPT", "POISON")
    uri = prompts(tmp_path, 10, {6: "POISON"})
    result = run_job(load_config(data=small(tmp_path, uri, tiny_dir, resources={"batch_size": 2})))
    meta = metadata(tmp_path / "out")
    assert result.ok and result.run["accounting"]["ok"], result.run["accounting"]
    assert sorted(meta) == [f"r{i:02d}" for i in range(10)]
    assert {k for k, m in meta.items() if m["status"] == "error"} == {"r06"}
    assert meta["r06"]["error"] == "generate: RuntimeError: test hook: failing on prompt 'POISON'"
    assert all((tmp_path / "out" / "images" / f"{k}.png").exists() for k in meta if k != "r06")
    # Two actors held the pool's seat: the first, killed, and its replacement.
    assert result.run["stages"]["generate"]["actors"] == 2
    assert result.run["stages"]["generate"]["rows"] == 10  # the lost batch is not counted twice


@pytest.mark.slow
def test_rows_that_kill_their_worker_every_time_fail_alone(
    ray_local, tmp_path, tiny_dir, monkeypatch
):
    """Eight rows, batches of 2: r03 ends its worker's process every time (a segfault), r06
    raises the error CUDA gives for an illegal address, after which every later call in that
    process would fail, so the worker ends itself and Ray replaces it. One death isolates a
    row (faults.max_crashes_per_row=1): only those two fail, no row is lost."""
    monkeypatch.setenv("K3BATCH_TEST_CRASH_PROMPT", "SEGFAULT")
    monkeypatch.setenv("K3BATCH_TEST_CUDA_ERROR_PROMPT", "ILLEGAL")
    uri = prompts(tmp_path, 8, {3: "SEGFAULT", 6: "ILLEGAL"})
    cfg = small(
        tmp_path, uri, tiny_dir, resources={"batch_size": 2}, faults={"max_crashes_per_row": 1}
    )
    result = run_job(load_config(data=cfg))
    meta = metadata(tmp_path / "out")
    assert result.ok and len(meta) == 8
    assert {k for k, m in meta.items() if m["status"] == "error"} == {"r03", "r06"}
    assert meta["r03"]["error"] == (
        "generate: the worker process died while generating this row alone, 1 time(s) "
        "(faults.max_crashes_per_row=1)"
    )
    assert meta["r06"]["error"].startswith("generate: the worker process died")
    # Their batch-mates ran again in a fresh worker and got their images.
    assert meta["r02"]["status"] == meta["r07"]["status"] == "ok"
    assert result.run["stages"]["generate"]["actors"] >= 3


def test_only_cuda_errors_that_poison_the_context_end_the_worker():
    import torch

    from k3batch.model.performance import poisons_process

    assert poisons_process(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert poisons_process(RuntimeError("CUDA error: device-side assert triggered"))
    assert not poisons_process(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not poisons_process(RuntimeError("expected scalar type Float but found Half"))
    assert not poisons_process(ValueError("an illegal value in the prompt"))


@pytest.mark.slow
def test_a_stalled_stage_fails_the_job_naming_it_and_a_rerun_resumes(
    ray_local, tmp_path, tiny_dir, monkeypatch, capsys
):
    import yaml

    uri = prompts(tmp_path, 8)
    cfg = small(
        tmp_path,
        uri,
        tiny_dir,
        resources={"batch_size": 2},
        # Above the model load and first batch even on a busy 2-core machine (see the field).
        faults={"stall_timeout_s": 30},
        output={"rows_per_file": 2},  # each batch committed as it is written
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("K3BATCH_TEST_HANG_AFTER_BATCHES", "2")
    assert main(["run", str(config), "--no-report", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("k3batch: job failed: faults.stall_timeout_s: no stage made progress")
    assert "stage 'generate' stopped after 4 of 8 rows" in err and "rerun" in err
    # The stuck actor went with the failed job: the session's CPUs are all free again.
    import time

    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)

    monkeypatch.delenv("K3BATCH_TEST_HANG_AFTER_BATCHES")
    assert main(["run", str(config), "--no-report", "--no-progress"]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["accounting"]["ok"] and run["resumed"] and run["rows_out"] == 8
    assert run["accounting"]["skipped_by_resume"] == 4 and run["rows_this_run"] == 4


@pytest.mark.slow
def test_a_broken_accounting_exits_non_zero_and_names_the_ids(
    ray_local, tmp_path, tiny_dir, capsys
):
    import yaml

    uri = prompts(tmp_path, 6)
    cfg = small(tmp_path, uri, tiny_dir, resources={"batch_size": 2}, output={"rows_per_file": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config), "--no-report", "--no-progress"]) == 0
    files = sorted((tmp_path / "out" / "metadata").glob("*.parquet"))
    assert len(files) >= 2
    # A record file lost after Ray committed it (its rows stay checkpointed as done), and
    # another one copied: the rerun has nothing to do, and the accounting must catch both.
    lost = sorted(pq.read_table(files[0]).column("id").to_pylist())
    twice = sorted(pq.read_table(files[1]).column("id").to_pylist())
    files[0].unlink()
    shutil.copy(files[1], files[1].with_name("copy-" + files[1].name))
    capsys.readouterr()
    assert main(["run", str(config), "--no-report", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "ACCOUNTING FAILED" in out
    line = err.strip().splitlines()[-1]
    rows_out = 6 - len(lost) + len(twice)
    assert line.startswith(f"k3batch: accounting failed: rows in 6, rows out {rows_out}")
    assert f"missing ({len(lost)}): {', '.join(map(repr, lost))}" in line
    assert f"ids twice ({len(twice)}): {', '.join(map(repr, twice))}" in line
    acc = json.loads((tmp_path / "out" / "run.json").read_text())["accounting"]
    assert not acc["ok"] and sorted(acc["missing_ids"]) == lost
    assert sorted(acc["duplicate_ids"]) == twice and acc["rows_written_twice"] == len(twice)


@pytest.mark.slow
def test_an_image_the_output_cannot_store_stops_the_job_in_one_line_and_a_rerun_resumes(
    ray_local, tmp_path, tiny_dir
):
    from k3batch.job.failures import JobFailed
    from k3batch.job.preflight import prepare_output, resolve_paths
    from k3batch.outputs import Output

    cfg = load_config(data=small(tmp_path, prompts(tmp_path, 6), tiny_dir))
    cfg = resolve_paths(cfg)
    prepare_output(
        cfg, Output.from_config(cfg)
    )  # the output is this job's, as after a first attempt
    blocked = tmp_path / "out" / "images" / "r04.png"
    blocked.mkdir(parents=True)  # a directory where the image must go: fails even as root
    with pytest.raises(JobFailed) as err:
        run_job(cfg)
    # The stage's own error reaches the driver (Ray would have wrapped it into
    # "UserCodeException: UDF failed to process a data block").
    assert str(err.value).startswith(f"output.uri: cannot write {blocked}: IsADirectoryError")
    assert str(err.value).endswith("rerun the same command to resume")
    blocked.rmdir()
    # A metadata write the failure cut short: its pending checkpoint and a file with no footer
    # yet. The rerun must not trip over it, and Ray deletes both.
    pending = tmp_path / "out" / "_k3batch" / "checkpoint" / "cut_000009.pending.parquet"
    pq.write_table(pa.table({"row_hash": pa.array([1], pa.uint64())}), pending)
    half = tmp_path / "out" / "metadata" / "cut_000009-0.parquet"
    half.write_bytes(b"PAR1")
    again = run_job(cfg)
    assert again.ok and again.run["resumed"] and again.run["rows_out"] == again.run["ok"] == 6
    assert (tmp_path / "out" / "images" / "r04.png").is_file()
    assert not half.exists() and not pending.exists()


# ------------------------------------------------------------------ flaky storage
def stop_store_once_writing(server, client, bucket, prefix, back_after=None):
    """A thread that stops the store as soon as the job has written an object under `prefix`
    and, with `back_after`, starts it again that many seconds later. Returns (thread, what
    it saw: objects written before the stop, seconds the store was away)."""
    import threading
    import time

    seen = {}

    def run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
            if listed:
                seen["written_before"] = listed
                break
            time.sleep(0.1)
        stopped = time.monotonic()
        server.stop()
        if back_after is not None:
            time.sleep(back_after)
            server.start()
            seen["away_seconds"] = time.monotonic() - stopped

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def s3_job(tmp_path, tiny_dir, endpoint, bucket, n, **storage):
    uri = prompts(tmp_path, n)
    cfg = small(
        tmp_path,
        uri,
        tiny_dir,
        resources={"batch_size": 2},
        output={"uri": f"s3://{bucket}/run"},
        storage={"endpoint_url": endpoint, **storage},
    )
    return load_config(data=cfg)


@pytest.mark.slow
def test_store_away_for_seconds_during_writes_costs_retries_not_rows(
    ray_local, flaky_s3, tmp_path, tiny_dir
):
    import boto3

    client = boto3.client("s3", endpoint_url=flaky_s3.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="flaky")
    n = 16
    # Retries spaced up to 20 s apart, 20 of them: minutes of patience for a restart that
    # takes SeaweedFS 5-20 s here.
    cfg = s3_job(tmp_path, tiny_dir, flaky_s3.endpoint, "flaky", n, max_attempts=20)
    thread, seen = stop_store_once_writing(flaky_s3, client, "flaky", "run/images/", 2)
    result = run_job(cfg)
    thread.join()
    assert seen["written_before"] < n and seen["away_seconds"] > 5, seen
    assert result.ok and (result.run["ok"], result.run["rows_out"]) == (n, n), result.run
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="flaky", Prefix="run/images/")
    images = [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(".png")]
    assert sorted(images) == [f"run/images/r{i:02d}.png" for i in range(n)]


@pytest.mark.slow
def test_store_gone_for_good_fails_in_one_line_and_a_rerun_resumes(
    ray_local, flaky_s3, tmp_path, tiny_dir
):
    import boto3

    from k3batch.job.failures import JobFailed

    client = boto3.client("s3", endpoint_url=flaky_s3.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="gone")
    n = 12
    cfg = s3_job(tmp_path, tiny_dir, flaky_s3.endpoint, "gone", n, max_attempts=2)
    thread, seen = stop_store_once_writing(flaky_s3, client, "gone", "run/images/")
    with pytest.raises(JobFailed) as err:
        run_job(cfg)
    thread.join()
    message = str(err.value)
    assert "\n" not in message and "output.uri: " in message, message
    assert "s3://gone/run" in message and "rerun the same command to resume" in message
    flaky_s3.start()
    # Back, and the rerun resumes (storage settings are not part of the job: more patience).
    again = run_job(s3_job(tmp_path, tiny_dir, flaky_s3.endpoint, "gone", n))
    run = again.run
    assert again.ok and run["resumed"] and (run["rows_out"], run["ok"]) == (n, n), run
    assert run["rows_this_run"] + run["skipped_by_resume"] == n and run["rows_this_run"] > 0


# ------------------------------------------------------------------ bad environment
@pytest.mark.slow
def test_unreachable_store_and_missing_credentials_stop_at_start_in_one_line(
    s3_server, s3_bucket, tmp_path, monkeypatch, capsys, request
):
    import s3fs
    import yaml

    from .conftest import free_port

    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), buf)
    client.put_object(Bucket=bucket, Key="in.parquet", Body=buf.getvalue())
    local_input = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a cat"]}), local_input)

    def run(input_uri, **storage):
        data = {
            "input": {"uri": input_uri},
            "model": {"path": str(tmp_path / "tiny"), "make_tiny": True},
            "output": {"uri": f"s3://{bucket}/out"},
            "storage": {"endpoint_url": s3_server, **storage},
        }
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(data))
        s3fs.S3FileSystem.clear_instance_cache()  # each case builds its own client
        code = main(["run", str(config), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    # Clients built without credentials must not outlive the test in fsspec's instance cache.
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    dead = f"http://127.0.0.1:{free_port()}"
    line = run(f"s3://{bucket}/in.parquet", endpoint_url=dead, max_attempts=2)
    assert line.startswith(f"k3batch: input.uri: cannot read s3://{bucket}/in.parquet: ")
    assert "EndpointConnectionError" in line and dead in line

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    line = run(f"s3://{bucket}/in.parquet")
    assert line.startswith("k3batch: input.uri: cannot read") and "NoCredentialsError" in line
    line = run(local_input)  # the input is fine, the output cannot be reached
    assert line.startswith(f"k3batch: output.uri: cannot write to s3://{bucket}/out: ")
    assert "NoCredentialsError" in line

    # Nothing was written, no model built: all of it happened before any work.
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == ["in.parquet"]
    assert not (tmp_path / "tiny").exists()


def test_a_hub_model_that_is_not_there_stops_at_start(tmp_path):
    from k3batch.job.preflight import check_model

    # Offline (as the tests run): a repo id must be in the local cache.
    data = {
        "input": {"uri": "x"},
        "output": {"uri": "y"},
        "model": {"path": "k3batch-test/no-such-model"},
    }
    cfg = load_config(data=data)
    with pytest.raises(ConfigError, match=r"model.path: 'k3batch-test/no-such-model' is not in"):
        check_model(cfg, kinds.get(cfg.job))


def test_a_cluster_too_small_for_the_actor_pools_gets_a_warning_naming_the_cpus(
    ray_local, tmp_path, tiny_dir, caplog
):
    import logging

    import ray

    from k3batch.ray_start.jobs import init_ray

    have = int(ray.cluster_resources()["CPU"])
    data = small(tmp_path, prompts(tmp_path, 2), tiny_dir)
    data["resources"] = {**data.get("resources", {}), "num_actors": have, "num_cpus_per_actor": 1}
    cfg = load_config(data=data)
    with caplog.at_level(logging.WARNING, logger="k3batch.ray_start.budget"):
        init_ray(cfg, kinds.get(cfg.job))  # Ray is already up: a cluster k3batch did not start
    assert f"the Ray cluster has {have} CPUs and this job needs {have + 1}" in caplog.text
    caplog.clear()
    data["resources"]["num_actors"] = have - 1
    cfg = load_config(data=data)
    with caplog.at_level(logging.WARNING, logger="k3batch.ray_start.budget"):
        init_ray(cfg, kinds.get(cfg.job))
    assert "the Ray cluster has" not in caplog.text


def test_a_cluster_that_can_never_fit_the_pools_is_refused_at_start_with_the_numbers(
    ray_local, tmp_path, tiny_dir, caplog, monkeypatch
):
    """As the GPU check: short now is a warning (with how long the job will wait); an
    autoscaler (v2) whose node groups can never hold the pools is a refusal at start."""
    import logging

    import ray

    from k3batch import gpus
    from k3batch.ray_start import budget

    have = int(ray.cluster_resources()["CPU"])
    data = small(tmp_path, prompts(tmp_path, 2), tiny_dir, faults={"stall_timeout_s": 900})
    data["resources"] = {**data.get("resources", {}), "num_actors": have, "num_cpus_per_actor": 1}
    cfg = load_config(data=data)
    kind = kinds.get(cfg.job)
    with caplog.at_level(logging.WARNING, logger="k3batch.ray_start.budget"):
        budget.check_cluster_cpus(cfg, kind, resumed=False)  # no autoscaler: it may grow
    assert "stop after 900 s without progress (faults.stall_timeout_s)" in caplog.text
    # Node groups that add at most 2 CPUs, 1 a node: never more than the CPUs there are now.
    monkeypatch.setattr(gpus, "autoscaler_limits_of", lambda resource: (2.0, 1.0))
    with pytest.raises(ConfigError) as refused:
        budget.check_cluster_cpus(cfg, kind, resumed=False)
    assert str(refused.value).startswith(
        f"CPUs: the Ray cluster has {have} CPUs and this job needs {have + 1} (actor pools "
        f"{have}, plus one for Ray Data's tasks), and the cluster can grow to {have} CPUs, at "
        f"most {have} on a node"
    )
    # One actor wider than any node type ever is: refused even with CPUs enough in all.
    data["resources"].update(num_actors=1, num_cpus_per_actor=have + 1)
    wide = load_config(data=data)
    monkeypatch.setattr(gpus, "autoscaler_limits_of", lambda resource: (64.0, 2.0))
    with pytest.raises(ConfigError) as refused:
        budget.check_cluster_cpus(wide, kind, resumed=False)
    assert (
        f"one actor of resources (generation) needs {have + 1} on one node, where the most any "
        f"node has is {have}, and the cluster can grow to 64 CPUs, at most {have} on a node"
    ) in str(refused.value)
