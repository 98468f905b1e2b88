"""Storage settings, config checks and job fingerprints (no Ray, no server)."""

import pyarrow.fs as pafs
import pytest

from k3batch import resume, storage
from k3batch.config import ConfigError, load_config

BASE = {"input": {"uri": "in.parquet"}, "output": {"uri": "out"}}


def config(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return load_config(data=data)


def test_s3_settings_become_s3fs_options_and_reach_other_protocols_as_given():
    settings = config(
        storage={
            "endpoint_url": "http://127.0.0.1:9000",
            "region": "eu-west-1",
            "profile": "research",
            "options": {"requester_pays": True},
        }
    ).storage.model_dump()
    options = storage.storage_options("s3://bucket/x", settings)
    assert options["endpoint_url"] == "http://127.0.0.1:9000"
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert options["profile"] == "research" and options["requester_pays"] is True
    # Other protocols get only the generic options; local paths get none.
    assert storage.storage_options("memory://x", settings) == {"requester_pays": True}
    assert storage.storage_options("/tmp/x", settings) == {}


def test_s3_requests_retry_with_backoff_as_configured_and_options_refine_it():
    settings = config(storage={"max_attempts": 4, "retry_mode": "adaptive"}).storage.model_dump()
    botocore = storage.storage_options("s3://bucket/x", settings)["config_kwargs"]
    # botocore's `total_max_attempts` counts the first try (its `max_attempts` would not).
    assert botocore["retries"] == {"total_max_attempts": 4, "mode": "adaptive"}
    assert (botocore["connect_timeout"], botocore["read_timeout"]) == (10.0, 60.0)
    settings["options"] = {"config_kwargs": {"read_timeout": 5, "max_pool_connections": 50}}
    botocore = storage.storage_options("s3://bucket/x", settings)["config_kwargs"]
    assert botocore["retries"]["total_max_attempts"] == 4 and botocore["read_timeout"] == 5
    assert botocore["max_pool_connections"] == 50
    # The filesystem gets them: its botocore client is built from these.
    fs, _ = storage.filesystem("s3://bucket/x", settings)
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 4, "mode": "adaptive"}


def test_any_fsspec_protocol_and_local_paths_get_filesystems(tmp_path):
    fs, path = storage.filesystem("memory://k3batch-test/a.txt")
    fs.pipe_file(path, b"x")
    arrow, arrow_path = storage.arrow_filesystem("memory://k3batch-test/a.txt")
    assert isinstance(arrow, pafs.PyFileSystem)
    with arrow.open_input_stream(arrow_path) as f:
        assert f.read() == b"x"
    local, local_path = storage.arrow_filesystem(str(tmp_path / "out"))
    assert isinstance(local, pafs.LocalFileSystem) and local_path == str(tmp_path / "out")


@pytest.mark.parametrize(
    ("section", "values", "needles"),
    [
        ("storage", {"options": {"secret": "x"}}, ["storage.options", "secret", "credentials"]),
        (
            "storage",
            {"options": {"client_kwargs": {"aws_secret_access_key": "x"}}},
            ["client_kwargs.aws_secret_access_key"],
        ),
        ("storage", {"options": {"key": "AKIA"}}, ["storage.options", "key"]),
        ("storage", {"endpoint_url": "127.0.0.1:9000"}, ["storage.endpoint_url", "http://"]),
        ("storage", {"endpoint_url": "http://u:p@host"}, ["storage.endpoint_url", "credentials"]),
        ("storage", {"endpoint_url": "u:p@host:9000"}, ["storage.endpoint_url", "credentials"]),
        ("output", {"uri": "s3://AKIA:secret@bucket/out"}, ["output.uri", "credentials"]),
        ("storage", {"password": "x"}, ["storage.password", "Extra inputs"]),
        ("output", {"format": "tfrecord"}, ["output.format", "tfrecord"]),
        ("output", {"shard_size": 0}, ["output.shard_size"]),
        ("storage", {"max_attempts": 0}, ["storage.max_attempts", "0"]),
        ("storage", {"retry_mode": "legacy"}, ["storage.retry_mode", "'legacy'"]),
        ("storage", {"connect_timeout_s": "soon"}, ["storage.connect_timeout_s", "'soon'"]),
        ("faults", {"stall_timeout_s": 0}, ["faults.stall_timeout_s", "0"]),
        ("faults", {"max_crashes_per_row": 0}, ["faults.max_crashes_per_row", "0"]),
        ("faults", {"timeout": 5}, ["faults.timeout", "Extra inputs"]),
    ],
)
def test_bad_storage_and_output_settings_are_one_line_errors(section, values, needles):
    with pytest.raises(ConfigError) as err:
        config(**{section: values})
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    # A refused secret is never echoed back.
    assert "AKIA:secret" not in message and "u:p@" not in message


def test_fingerprint_ignores_how_a_job_runs_but_not_what_it_makes():
    base = resume.job_identity(config())
    same = resume.job_identity(
        config(
            resources={"batch_size": 16, "num_actors": 3},
            ray={"num_cpus": 8},
            storage={"endpoint_url": "http://other:9000"},
            output={"overwrite": True},
            model={"device": "cpu"},
            faults={"stall_timeout_s": 60, "max_crashes_per_row": 5},
        )
    )
    assert resume.fingerprint(same) == resume.fingerprint(base)
    changed = resume.job_identity(config(output={"format": "webdataset"}, generation={"seed": 3}))
    assert resume.fingerprint(changed) != resume.fingerprint(base)
    assert resume.differences(base, changed) == ["generation.seed", "output.format"]


def test_only_flash_x2_fingerprints_its_whole_canvas_threshold():
    """x4 / x2 outputs keep the fingerprint they had before the Flash-only field existed."""
    up = {"path": "somewhere", "make_tiny": True}
    x4 = resume.job_identity(config(upscale={**up, "model": "x4"}))
    assert "flash_whole_canvas_side" not in x4["upscale"]
    lowered = resume.job_identity(
        config(upscale={**up, "model": "x4", "flash_whole_canvas_side": 2048})
    )
    assert resume.fingerprint(lowered) == resume.fingerprint(x4)
    flash = {**up, "model": "flash-x2"}
    a = resume.job_identity(config(upscale=flash))
    b = resume.job_identity(config(upscale={**flash, "flash_whole_canvas_side": 2048}))
    assert resume.differences(a, b) == ["upscale.flash_whole_canvas_side"]


def test_storage_failures_that_a_rerun_can_outlast_are_told_apart():
    import errno

    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert storage.unavailable(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.unavailable(ReadTimeoutError(endpoint_url="http://x"))
    assert storage.unavailable(ConnectionRefusedError())
    # s3fs's translation of S3's 500 InternalError and 503 SlowDown
    assert storage.unavailable(OSError(errno.EREMOTEIO, "We encountered an internal error"))
    assert storage.unavailable(OSError(errno.EBUSY, "Please reduce your request rate"))
    assert not storage.unavailable(PermissionError(errno.EACCES, "Access Denied"))
    assert not storage.unavailable(FileNotFoundError("s3://bucket/x"))
    assert not storage.unavailable(ValueError("bad"))
