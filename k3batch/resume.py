"""Resume after preemption: which job an output holds, and Ray Data's checkpoint for it.

Resuming uses Ray Data's own checkpointing (`DataContext.checkpoint_config`): the Write at
the end of the job records the ids of the rows it committed, with a two-phase commit around
each output file, and a rerun drops those rows right after the Read. The id is the input's
`row_hash` (Ray's hash of source file and row position, added by `read_parquet`): it exists
from the Read on, is unique per input row and never null, whether or not the table has an id
column, while user ids may be missing, malformed or repeated (those rows are still
accounted for, as errors).

An output remembers its job in `_k3batch/job.json`: a fingerprint of the config without the
fields that cannot change the output (resources, ray, storage, faults, overwrite,
rows_per_file, device, how scoring runs; the scores section when off). The same job resumes;
a different one is refused unless `output.overwrite`.
"""

from __future__ import annotations

import hashlib
import json

from k3batch import schema, storage
from k3batch.config import JobConfig

STATE_DIR = "_k3batch"
# How the job runs, not what it produces: these may change between a run and its resume.
_NOT_FINGERPRINTED = {
    "resources": None,
    "ray": None,
    "storage": None,
    "faults": None,
    "output": {"overwrite", "rows_per_file"},
    "model": {"device"},
    "scores": {"batch_size", "device", "num_actors", "num_cpus_per_actor", "num_gpus_per_actor"},
}


def job_identity(cfg: JobConfig) -> dict:
    data = cfg.model_dump(mode="json")
    for section, fields in _NOT_FINGERPRINTED.items():
        if fields is None:
            data.pop(section, None)
        else:
            for name in fields:
                data[section].pop(name, None)
    if not cfg.scores.enabled:
        # Outputs written before the section existed keep their fingerprint.
        data.pop("scores", None)
    return data


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def state_uri(output_uri: str, *parts: str) -> str:
    return storage.join(output_uri, STATE_DIR, *parts)


def read_job(fs, root: str) -> dict | None:
    path = f"{root}/{STATE_DIR}/job.json"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_job(fs, root: str, identity: dict) -> None:
    record = {"fingerprint": fingerprint(identity), "job": identity}
    fs.makedirs(f"{root}/{STATE_DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{STATE_DIR}/job.json", json.dumps(record, indent=2).encode())


def checkpoint_config(cfg: JobConfig):
    """Ray Data's CheckpointConfig for this job's output (kept after success: a rerun of a
    finished job then generates nothing, and rows appended to the input later are the only
    ones generated)."""
    from ray.data.checkpoint import CheckpointConfig

    uri = state_uri(cfg.output.uri, "checkpoint")
    fs, path = storage.arrow_filesystem(uri, cfg.storage.model_dump())
    return CheckpointConfig(
        id_column=schema.ROW_HASH,
        checkpoint_path=uri if storage.is_remote(uri) else path,
        override_filesystem=fs,
        delete_checkpoint_on_success=False,
    )
