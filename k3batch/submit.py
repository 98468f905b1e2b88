"""`k3batch submit`: run a job on a Ray cluster through the Ray Jobs API.

The project directory travels as the job's `working_dir` (so the cluster runs this exact
code and the config inside it); the cluster's image provides the dependencies. The config is
validated here first, so a bad one fails before anything is uploaded; a dashboard that cannot
be reached is one line within seconds (`k3batch.ray_start.connect.jobs_client`).
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

from k3batch.config import ConfigError, load_config
from k3batch.ray_start.connect import Target, jobs_client

# Never uploaded: environments, caches, outputs and VCS data (Ray caps working_dir size).
EXCLUDES = [
    ".venv/",
    ".cache/",
    "out/",
    ".git/",
    "**/__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root(start: Path) -> Path:
    for parent in [start, *start.parents]:
        if (parent / "pyproject.toml").exists() and (parent / "k3batch").is_dir():
            return parent
    return start


def build_submission(config: str, overrides: list[str], working_dir: str | None) -> dict:
    """Entry point and runtime env for the job; raises ConfigError for a bad config."""
    load_config(config, overrides)  # fail fast, before any upload
    root = Path(working_dir).resolve() if working_dir else project_root(Path.cwd().resolve())
    config_path = Path(config).resolve()
    try:
        relative = config_path.relative_to(root)
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the working dir {root}: put it inside (it travels with the job)"
        ) from None
    args = ["python", "-m", "k3batch.cli", "run", relative.as_posix()]
    for item in overrides:
        args += ["--set", item]
    return {
        "entrypoint": shlex.join(args),
        "runtime_env": {"working_dir": str(root), "excludes": EXCLUDES},
    }


async def _stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def submit(
    where: Target,
    config: str,
    overrides: list[str],
    *,
    wait: bool,
    working_dir: str | None = None,
    job_id: str | None = None,
) -> int:
    spec = build_submission(config, overrides, working_dir)
    client = jobs_client(where)  # the cluster's dashboard, or one line within seconds
    address = where.address
    job_id = client.submit_job(
        entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"], submission_id=job_id
    )
    print(f"k3batch: submitted {job_id} to {address}: {spec['entrypoint']}", flush=True)
    if not wait:
        print(f"k3batch: follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    asyncio.run(_stream(client, job_id))
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL:  # the log stream can end just before the status settles
        import time

        time.sleep(1)
        status = str(client.get_job_status(job_id).value)
    print(f"k3batch: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
