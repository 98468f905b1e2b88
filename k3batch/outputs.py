"""Output layouts: where each format keeps its per-row records, and the finishing step.

files:       OUTPUT/images/<key>.<ext>, OUTPUT/metadata/*.parquet (one row per input row),
             OUTPUT/images/metadata.parquet (rows with an image, `file_name` relative to
             images/, without the resume key `row_hash`: the metadata file of a Hugging
             Face image folder)
webdataset:  OUTPUT/shards/NNNNN.tar + NNNNN.parquet (see k3batch.shards)
both:        OUTPUT/run.json, OUTPUT/_k3batch/ (job fingerprint, Ray's checkpoint)
"""

from __future__ import annotations

import posixpath

from k3batch import shards, storage
from k3batch.config import JobConfig
from k3batch.resume import ID_COLUMN, STATE_DIR

HF_METADATA = "metadata.parquet"
# Everything a run may leave in its output, removed by `output.overwrite`.
ENTRIES = ("metadata", "images", "shards", "run.json", STATE_DIR)


def records_dir(cfg: JobConfig) -> str:
    return "metadata" if cfg.output.format == "files" else "shards"


def record_files(cfg: JobConfig) -> list[str]:
    """The Parquet files holding one row per finished input row (both formats)."""
    fs, root = storage.filesystem(
        storage.join(cfg.output.uri, records_dir(cfg)), cfg.storage.model_dump()
    )
    files = storage.list_files(fs, root, ".parquet")
    if cfg.output.format == "webdataset":
        files = [f for f in files if shards.SHARD_NAME.match(posixpath.basename(f))]
    return files


def read_records(
    cfg: JobConfig,
    files: list[str],
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
):
    """One Arrow table from record files whose schemas may differ (input parts need not
    share their pass-through columns). `optional` columns are added when the files have them."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    schema = pa.unify_schemas([pq.read_schema(f, filesystem=fs) for f in files])
    if columns is not None:
        columns = [*columns, *(c for c in optional if c in schema.names)]
    return pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table(
        columns=columns
    )


def count_rows(cfg: JobConfig, files: list[str], skip_unreadable: bool = False) -> int:
    """Rows in these record files, from their footers. `skip_unreadable`: count a file
    without a readable footer as empty: a write that a failed or killed run left half-done
    (Ray deletes it, by its pending checkpoint, when the rerun starts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    total = 0
    for f in files:
        try:
            total += pq.read_metadata(f, filesystem=fs).num_rows
        except (pa.ArrowInvalid, OSError):
            if not skip_unreadable:
                raise
    return total


def finalise(cfg: JobConfig, num_rows: int) -> None:
    """After a run: the image folder's metadata file, or shard numbers without gaps."""
    settings = cfg.storage.model_dump()
    if cfg.output.format == "webdataset":
        fs, root = storage.filesystem(storage.join(cfg.output.uri, "shards"), settings)
        shards.renumber(fs, root, shards.digits(num_rows))
        return
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = read_records(cfg, record_files(cfg))
    table = table.filter(pc.equal(table.column("status"), "ok")).drop_columns([ID_COLUMN])
    names = [posixpath.basename(uri) for uri in table.column("image_uri").to_pylist()]
    table = table.add_column(0, "file_name", pa.array(names, pa.string()))
    for i, field in enumerate(table.schema):
        # `datasets` fails on uint64 values above 2**63 - 1 (OverflowError while building its
        # Arrow table); such a column (a seed given in the input) is written as text here.
        if pa.types.is_uint64(field.type):
            column = table.column(i)
            fits = len(column) == 0 or (pc.max(column).as_py() or 0) < 2**63
            table = table.set_column(
                i, field.name, column.cast(pa.int64() if fits else pa.string())
            )
    fs, root = storage.filesystem(storage.join(cfg.output.uri, "images"), settings)
    fs.makedirs(root, exist_ok=True)
    pq.write_table(table, f"{root}/{HF_METADATA}", filesystem=fs)


def clear(fs, root: str) -> None:
    for entry in ENTRIES:
        if fs.exists(f"{root}/{entry}"):
            fs.rm(f"{root}/{entry}", recursive=True)
