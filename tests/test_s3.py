"""End to end against a real S3-compatible store (SeaweedFS): prompts from a bucket, images
and metadata to a bucket, checked with boto3."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.config import load_config
from k3batch.job.run import run_job
from k3batch.rows.records import object_key

from .conftest import S3_KEY, S3_SECRET, job_config

pytestmark = pytest.mark.slow

IDS = ["cat", "a/b", "../../escape", "x" * 2000, "ctl\x00\n\x1b", "empty"]
PROMPTS = ["a cat", "a dog", "a fox", "an owl", "a boat", ""]


def objects(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def get(client, bucket, key) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_job_reads_a_bucket_and_writes_images_and_metadata_to_a_bucket(
    ray_local, s3_server, s3_bucket, tiny_dir, tmp_path, capfd
):
    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": IDS, "prompt": PROMPTS}), buf)
    client.put_object(Bucket=bucket, Key="prompts/part-0.parquet", Body=buf.getvalue())
    cfg = job_config(
        tmp_path,
        f"s3://{bucket}/prompts/",
        tiny_dir,
        output={"uri": f"s3://{bucket}/runs/r1"},
        storage={"endpoint_url": s3_server, "region": "us-east-1"},
    )
    result = run_job(load_config(data=cfg))
    assert result.ok, result.run
    assert (result.run["rows_in"], result.run["ok"], result.run["error"]) == (6, 5, 1)

    keys = objects(client, bucket)
    # Nothing escaped the output prefix, whatever the ids held.
    assert all(k.startswith(("prompts/", "runs/r1/")) for k in keys), sorted(keys)
    images = {k for k in keys if k.startswith("runs/r1/images/") and k.endswith(".png")}
    assert images == {f"runs/r1/images/{object_key(i)}.png" for i in IDS[:5]}
    for key in images:
        assert keys[key] > 0
        with Image.open(io.BytesIO(get(client, bucket, key))) as image:
            assert image.size == (64, 64) and image.mode == "RGB"

    parts = [k for k in keys if k.startswith("runs/r1/metadata/") and k.endswith(".parquet")]
    meta = pa.concat_tables(
        [pq.read_table(io.BytesIO(get(client, bucket, k))) for k in parts]
    ).to_pylist()
    by_id = {m["id"]: m for m in meta}
    assert sorted(by_id) == sorted(IDS) and len(meta) == 6
    assert by_id["empty"]["status"] == "error" and by_id["empty"]["image_uri"] is None
    assert by_id["a/b"]["image_uri"] == f"s3://{bucket}/runs/r1/images/{object_key('a/b')}.png"

    run = json.loads(get(client, bucket, "runs/r1/run.json"))
    assert run["accounting"]["ok"] and run["config"]["storage"]["endpoint_url"] == s3_server
    # Credentials came from the environment and went nowhere: not into any object, not into
    # the driver's or the workers' logs.
    for key in objects(client, bucket, "runs/r1/"):
        body = get(client, bucket, key)
        assert S3_SECRET.encode() not in body and S3_KEY.encode() not in body, key
    logs = capfd.readouterr()
    assert S3_SECRET not in logs.out + logs.err


def test_named_profile_reaches_the_bucket(s3_server, s3_bucket, tmp_path, monkeypatch):
    """storage.profile: credentials from a named profile, none in the environment."""
    from k3batch.job import kinds
    from k3batch.job.inputs import inspect_input

    def inspect(data):
        cfg = load_config(data=data)
        return inspect_input(cfg, kinds.get(cfg.job))

    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), buf)
    client.put_object(Bucket=bucket, Key="p/in.parquet", Body=buf.getvalue())
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[k3test]\naws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    data = {
        "input": {"uri": f"s3://{bucket}/p/in.parquet"},
        "output": {"uri": f"s3://{bucket}/out"},
        "storage": {"endpoint_url": s3_server, "profile": "k3test"},
    }
    assert inspect(data).num_rows == 3
    data["storage"]["profile"] = "nosuchprofile"
    with pytest.raises(Exception, match="input.uri: cannot read"):
        inspect(data)


def test_webdataset_shards_to_a_bucket_resume_and_renumber_there(
    ray_local, s3_server, s3_bucket, tiny_dir, tmp_path
):
    import webdataset as wds

    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"prompt": [f"prompt {i}" for i in range(6)], "n": list(range(6))}), buf
    )
    client.put_object(Bucket=bucket, Key="in.parquet", Body=buf.getvalue())
    cfg = job_config(
        tmp_path,
        f"s3://{bucket}/in.parquet",
        tiny_dir,
        resources={"batch_size": 2},
        output={"uri": f"s3://{bucket}/wds", "format": "webdataset", "shard_size": 2},
        storage={"endpoint_url": s3_server},
    )
    assert run_job(load_config(data=cfg)).ok

    def shard_keys():
        return sorted(k for k in objects(client, bucket, "wds/shards/") if not k.endswith("/"))

    first = shard_keys()
    numbers = sorted({k.rsplit("/", 1)[1][:5] for k in first})
    assert numbers == [f"{i:05d}" for i in range(len(numbers))] and len(numbers) >= 2
    assert first == sorted(
        f"wds/shards/{n}{e}" for n in numbers for e in (".tar", ".parquet", "_stats.json")
    )

    # Shard 00000 never committed, as after a preemption: the rerun regenerates its rows into
    # a new shard, then renames it into the gap (a copy and delete on S3).
    lost = pq.read_table(io.BytesIO(get(client, bucket, "wds/shards/00000.parquet")))
    for key in (
        "wds/shards/00000.tar",
        "wds/shards/00000.parquet",
        "wds/_k3batch/checkpoint/00000.parquet",
    ):
        client.delete_object(Bucket=bucket, Key=key)
    again = run_job(load_config(data=cfg))
    assert again.ok and again.run["rows_this_run"] == lost.num_rows
    assert shard_keys() == first
    # The regenerated shard's stats moved with it into the gap, over the lost shard's.
    for n in numbers:
        index = pq.read_table(io.BytesIO(get(client, bucket, f"wds/shards/{n}.parquet")))
        stats = json.loads(get(client, bucket, f"wds/shards/{n}_stats.json"))
        assert stats["count"] == index.num_rows and stats["successes"] == index.num_rows
    samples = []
    for n in numbers:
        path = tmp_path / f"{n}.tar"
        path.write_bytes(get(client, bucket, f"wds/shards/{n}.tar"))
        samples += list(wds.WebDataset(str(path), shardshuffle=False).decode("pil"))
    assert sorted(s["json"]["n"] for s in samples) == list(range(6))
    assert all(
        s["txt"] == f"prompt {s['json']['n']}" and s["png"].size == (64, 64) for s in samples
    )


def test_input_images_on_the_store_are_read_with_the_storage_settings(s3_server, s3_bucket):
    """An image-to-image row's `image` on an S3-compatible store is read through the job's
    `storage` section (its endpoint here), as the prompts are."""
    from k3batch.stages.prepare import PrepareImagesStage

    client, bucket = s3_bucket
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 30, 30)).save(buf, "PNG")
    client.put_object(Bucket=bucket, Key="inputs/a.png", Body=buf.getvalue())
    batch = {
        "id": ["a", "b"],
        "width": [None, None],
        "height": [None, None],
        "status": ["ok", "ok"],
        "error": [None, None],
        "image": [f"s3://{bucket}/inputs/a.png", f"s3://{bucket}/inputs/missing.png"],
        "mask": [None, None],
    }
    settings = {"endpoint_url": s3_server, "region": "us-east-1", "max_attempts": 1}
    out = PrepareImagesStage(storage_settings=settings)(batch)
    assert out["status"] == ["ok", "error"], out["error"]
    assert (out["width"][0], out["height"][0]) == (128, 64)
    assert len(out["source_rgb"][0]) == 128 * 64 * 3
    assert out["error"][1].startswith("image: cannot read 's3://")
    assert out["error"][1].endswith(f"FileNotFoundError: {bucket}/inputs/missing.png")


def test_beautify_only_job_reads_and_writes_the_store_with_the_storage_settings(
    ray_local, s3_server, s3_bucket, tmp_path
):
    """The beautify-only job reaches the bucket through `storage` (here its endpoint) both
    ways. Nothing listens for the LLM: every row says so in `beautify_error`, as designed."""
    from .conftest import free_port

    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"]}), buf)
    client.put_object(Bucket=bucket, Key="prompts/part-0.parquet", Body=buf.getvalue())
    cfg = {
        "job": "beautify",
        "input": {"uri": f"s3://{bucket}/prompts/"},
        "model": {"path": "no-diffusion-model-needed"},
        "beautify": {
            "enabled": True,
            "backend": "openai",
            "model": "no-llm",
            "openai": {
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "max_retries": 0,
                "retry_backoff_s": 0.05,
            },
        },
        "output": {"uri": f"s3://{bucket}/beautified"},
        "storage": {"endpoint_url": s3_server, "region": "us-east-1"},
    }
    result = run_job(load_config(data=cfg))
    assert result.ok and result.run["rows_out"] == 2, result.run
    keys = [k for k in objects(client, bucket, "beautified/metadata/") if k.endswith(".parquet")]
    rows = pa.concat_tables(
        pq.read_table(io.BytesIO(get(client, bucket, k))) for k in keys
    ).to_pylist()
    assert sorted(r["id"] for r in rows) == ["a", "b"]
    assert all(
        r["beautified_prompt"] is None and r["beautify_error"].startswith("openai: ") for r in rows
    ), rows
