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
rows_per_file, device, how scoring runs; the scores section when off), plus the content hash
of each `model.lora` file. The same job resumes; a different one is refused unless
`output.overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os

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
    # An image does not depend on its batch, on how windows share UNet calls, or on compile.
    "upscale": {
        "batch_size",
        "compile",
        "device",
        "max_tiles_per_call",
        "num_actors",
        "num_cpus_per_actor",
        "num_gpus_per_actor",
    },
}

SPEED_ONLY = ("movq_attention", "cudnn_benchmark")
SPEED_ONLY_COMPILE = ("scope", "conv_1x1_as_mm", "coordinate_descent_tuning", "artifacts")


def job_identity(cfg: JobConfig) -> dict:
    data = cfg.model_dump(mode="json")
    for section, fields in _NOT_FINGERPRINTED.items():
        if fields is None:
            data.pop(section, None)
        else:
            for name in fields:
                data[section].pop(name, None)
    # Speed settings added after outputs existed that leave images as they are: out, so
    # those outputs keep their fingerprint (and a resume may change them). FP8 changes
    # images: in, when on.
    perf = data["model"]["performance"]
    for name in SPEED_ONLY:
        perf.pop(name, None)
    for name in SPEED_ONLY_COMPILE:
        perf["compile"].pop(name, None)
    if not perf.get("fp8"):
        perf.pop("fp8", None)
    if cfg.model.lora:
        from k3batch.model.adapters.lora import sha256

        # Paths and scales are in the config; the content too: a file rewritten in place
        # would otherwise resume into a mix of two LoRAs' images.
        data["model"]["lora_sha256"] = [
            sha256(lora.path) if os.path.isfile(lora.path) else None for lora in cfg.model.lora
        ]
    from k3batch.model import family

    # Fields only other families read stay out: outputs written before a family's fields
    # existed (Kandinsky 3 outputs before 2.2's) keep their fingerprint.
    own = family.of(cfg.model.name)
    for other in family.FAMILIES.values():
        if other is own:
            continue
        for name in other.model_fields:
            data["model"].pop(name, None)
        for c in other.components:
            if c not in own.components:
                data["model"]["dtype"].pop(c, None)
        for name in other.generation_fields:
            data["generation"].pop(name, None)
    if not cfg.scores.enabled:
        # Outputs written before the section existed keep their fingerprint.
        data.pop("scores", None)
    if not cfg.upscale.enabled:
        data.pop("upscale", None)  # as scores
    elif cfg.upscale.model != "flash-x2":
        # Only Flash x2 reads it: x4 / x2 outputs keep the fingerprint they had before it.
        data["upscale"].pop("flash_whole_canvas_side", None)
    if cfg.job != "upscale":
        data["input"].pop("image_column", None)
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


# Written when a run ends with every record accounted for; removed when a run starts work.
COMPLETE = "complete.json"


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _made_of(info, record_sizes: dict[str, int]) -> dict:
    """What a finished output is made of: the input (each file's path and rows: what Ray's
    row hashes are made of, so the same files and counts give the same records), the records
    it asks for, and the record files (names and sizes, from one listing)."""
    return {
        "input": _digest([[str(f) for f in info.files], list(info.file_rows)]),
        "records_expected": info.num_records,
        "record_files": _digest(sorted([str(f), int(n)] for f, n in record_sizes.items())),
    }


def completion(info, record_sizes: dict[str, int], counts: dict) -> dict:
    """`_k3batch/complete.json` for an output whose accounting (`counts`, as
    `job.accounting.account` returns them) found every record once."""
    return {**_made_of(info, record_sizes), "counts": counts}


def write_completed(fs, root: str, record: dict) -> None:
    fs.pipe_file(f"{root}/{STATE_DIR}/{COMPLETE}", json.dumps(record, indent=2).encode())


def clear_completed(fs, root: str) -> None:
    """Before a run writes: an output part-way through a run is not complete."""
    path = f"{root}/{STATE_DIR}/{COMPLETE}"
    if fs.exists(path):
        fs.rm(path)


def completed(fs, root: str, info, record_sizes: dict[str, int]) -> dict | None:
    """The accounting of the run that finished this output, when a rerun has nothing left
    to do: that run ended with every record accounted for, and neither the input (files,
    rows per file, records asked for) nor the record files (names, sizes) changed since.
    Ray's checkpoint filter would then leave no row; this says so from pre-flight's footers
    and one listing, without starting the job's pools or reading a record. None otherwise:
    any change (rows appended, a record file lost or rewritten) is a normal resumed run."""
    path = f"{root}/{STATE_DIR}/{COMPLETE}"
    if not fs.exists(path):
        return None
    record = json.loads(fs.cat_file(path))
    if {k: v for k, v in record.items() if k != "counts"} != _made_of(info, record_sizes):
        return None
    return record["counts"]


def checkpoint_config(cfg: JobConfig, rules):
    """Ray Data's CheckpointConfig for this job's output (kept after success: a rerun of a
    finished job then generates nothing, and rows appended to the input later are the only
    ones generated).

    A generation job commits records (images) by `record_hash`; the filter below turns the
    committed records back into the input rows (and images) still to make. `rules`: the
    job kind's `record_rules` (`rows.RowRules`), for each row's number of records.
    """
    from ray.data.checkpoint import CheckpointConfig

    uri = state_uri(cfg.output.uri, "checkpoint")
    fs, path = storage.arrow_filesystem(uri, cfg.storage.model_dump())
    return CheckpointConfig(
        id_column=schema.RECORD_HASH,
        checkpoint_path=uri if storage.is_remote(uri) else path,
        override_filesystem=fs,
        delete_checkpoint_on_success=False,
        checkpoint_filter_cls=image_filter(rules),
    )


def image_filter(rules):
    """A Ray checkpoint filter for records that are images: an input row is dropped once all
    its images are committed; a row with some committed goes on with their `k` in
    `images_done`, and GenerateStage makes only the others. `rules`: the job's RowRules, for
    each row's number of images (as validation reads it)."""
    from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

    class ImageCheckpointFilter(NumpyArrayBasedCheckpointFilter):
        def filter_rows_for_block(self, block):
            return filter_images(block, self.checkpointed_ids, rules)

    return ImageCheckpointFilter


def filter_images(block, committed, rules):
    """`ImageCheckpointFilter`'s work on one Arrow block: `committed` is the sorted array of
    committed record hashes."""
    import numpy as np
    import pyarrow as pa

    from k3batch.rows.records import image_index, record_hashes
    from k3batch.rows.seeds import records_of

    n = block.num_rows
    if n == 0:
        return block
    if rules.images_column and rules.images_column in block.column_names:
        values = block.column(rules.images_column).to_pylist()
        counts = np.array([records_of(v, rules) for v in values], dtype=np.int64)
    else:
        counts = np.full(n, rules.num_images_per_prompt, dtype=np.int64)
    owner, ks = image_index(counts)
    hashes = block.column(schema.ROW_HASH).to_numpy(zero_copy_only=False).astype(np.uint64)
    ids = record_hashes(hashes[owner], ks)
    at = np.searchsorted(committed, ids)
    inside = at < committed.size
    done = np.zeros(ids.size, dtype=bool)
    done[inside] = committed[at[inside]] == ids[inside]
    done_per_row = np.bincount(owner, weights=done, minlength=n).astype(np.int64)
    keep = done_per_row < counts
    done_ks = [[] for _ in range(n)]
    for i, k in zip(owner[done], ks[done], strict=True):
        done_ks[i].append(int(k))
    column = pa.array(
        [done_ks[i] for i in np.flatnonzero(keep)], type=schema.TYPES[schema.IMAGES_DONE]
    )
    kept = block.filter(pa.array(keep))
    if schema.IMAGES_DONE in kept.column_names:
        kept = kept.drop_columns([schema.IMAGES_DONE])
    return kept.append_column(schema.IMAGES_DONE, column)
