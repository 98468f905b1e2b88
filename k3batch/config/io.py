"""`input:`, `storage:` and `output:`: where rows come from and go to, and how they are reached
(no secrets in a config)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from k3batch.config.base import Strict


class InputConfig(Strict):
    uri: str = Field(
        description="Parquet file or directory of Parquet files: a local path or any fsspec URI "
        "(s3://bucket/prompts/, gs://...)."
    )
    prompt_column: str = Field("prompt", description="Column holding the text prompt.")
    id_column: str = Field(
        "id",
        description="Column holding a stable row id. When the table has no such column, ids are "
        "derived from the source file and row position, so a rerun gives the same ids.",
    )
    image_column: str = Field(
        "image",
        description="`job: upscale`: the column of the images to upscale (a URI or the image's "
        "bytes), e.g. `image_uri` to upscale what a generation job wrote (its metadata as the "
        "input). Generation jobs read `image` for image-to-image and inpainting rows.",
    )
    beautified_prompt_column: str | None = Field(
        None,
        description="Column of already beautified prompts (e.g. `beautified_prompt` written by "
        "a beautify-only job): generation uses it, and the original prompt where it is empty; "
        "the LLM does not run. null: none (or beautify.enabled runs the LLM).",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str) -> str:
        return _no_userinfo(v)


_SECRET_OPTION = re.compile(
    r"secret|password|token|credential|sas|account_key|^key$|access_key", re.I
)


class SecretInValue(ValueError):
    """A value that holds a credential: its error message never repeats the value."""


def _no_userinfo(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        raise SecretInValue(
            f"must not carry credentials (user:password@host), got {scheme}://***@...; "
            "give them through the environment or storage.profile"
        )
    return uri


def _secret_keys(options: Any, path: str = "") -> list[str]:
    if not isinstance(options, dict):
        return []
    found = []
    for key, value in options.items():
        name = f"{path}{key}"
        if _SECRET_OPTION.search(str(key)):
            found.append(name)
        found += _secret_keys(value, f"{name}.")
    return found


class StorageConfig(Strict):
    """How every input and output URI is reached (fsspec; s3:// through s3fs).

    Holds no secrets: credentials come from the environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, instance roles) or a named profile, on the
    driver and on every Ray worker alike.
    """

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for s3:// URIs (MinIO, SeaweedFS, R2, Ceph), e.g. "
        "http://127.0.0.1:9000. null: AWS, or AWS_ENDPOINT_URL when set.",
    )
    region: str | None = Field(
        None, description="S3 region for s3:// URIs; null: the profile's or environment's."
    )
    profile: str | None = Field(
        None,
        description="Named profile from ~/.aws/credentials or ~/.aws/config (the file must "
        "exist on every Ray node). null: environment credentials or an instance role.",
    )
    anonymous: bool = Field(False, description="Read public s3:// buckets without credentials.")
    max_attempts: int = Field(
        10,
        ge=1,
        le=100,
        description="Attempts per s3:// request, the first included (botocore's retries, "
        "exponential backoff with jitter, at most 20 s apart): a store that is unreachable, "
        "throttling or answering 5xx for a few seconds costs retries, not rows. A write that "
        "still fails stops the job with a storage error; rerunning it resumes. 1: no retries.",
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description="botocore retry mode for s3:// requests: `standard`, or `adaptive` "
        "(standard plus client-side rate limiting when the store throttles).",
    )
    connect_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds to wait for a connection to the s3:// endpoint before the attempt "
        "counts as failed (botocore's default is 60).",
    )
    read_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for an s3:// response before the attempt fails."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec storage options for every URI's filesystem (any protocol), "
        "e.g. {requester_pays: true} for s3 or {project: my-project} for gs. Secrets are refused "
        "here: they would be written into run.json.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "@" in v.split("://", 1)[-1].split("/", 1)[0]:
            raise SecretInValue(
                "must not carry credentials (user:password@host); give them through the "
                "environment or storage.profile"
            )
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        secret = _secret_keys(v)
        if secret:
            raise ValueError(
                f"{', '.join(secret)} look like credentials; keep secrets out of the config "
                "(environment variables or storage.profile)"
            )
        return v


class OutputConfig(Strict):
    uri: str = Field(
        description="Output directory: a local path or an fsspec URI (s3://bucket/run/)."
    )
    format: Literal["files", "webdataset"] = Field(
        "files",
        description="`files`: images/<key>.<ext> plus metadata/*.parquet (and images/metadata.parquet, "
        "so the folder loads as a Hugging Face image folder). `webdataset`: tar shards "
        "shards/00000.tar ... holding <key>.<ext>, <key>.txt (prompt) and <key>.json (metadata), "
        "each with a Parquet index shards/00000.parquet of all its rows (img2dataset's layout).",
    )
    shard_size: int = Field(
        256,
        ge=1,
        description="Rows per webdataset shard (a target: a shard holds whole generation batches, "
        "and the last one of a run may be smaller). Ignored by `files`.",
    )
    rows_per_file: int = Field(
        256,
        ge=1,
        description="Rows per metadata file under metadata/, at least (`files` only; the last "
        "file of a run may hold fewer): Ray Data gathers the rows of several batches into one "
        "Parquet file, so a table of millions of rows leaves thousands of files, not one per "
        "batch. A row counts as finished for resume once its file is written: a run stopped "
        "part-way generates the rows of unwritten files again, up to about this many.",
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")
    overwrite: bool = Field(
        False,
        description="Replace a previous run found in `uri`. Without it, a rerun of the same job "
        "resumes (only rows without finished output are generated) and a different job into a "
        "used output is refused (`k3batch run --overwrite` sets this).",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str) -> str:
        return _no_userinfo(v)
