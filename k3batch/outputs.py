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

    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    schema = records_schema(cfg, files)
    if columns is not None:
        columns = [*columns, *(c for c in optional if c in schema.names)]
    return pa.concat_tables(iter_records(cfg, files, columns, schema))


def records_schema(cfg: JobConfig, files: list[str]):
    """The record files' unified schema (non-empty list), from their footers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    return pa.unify_schemas([pq.read_schema(f, filesystem=fs) for f in files])


def iter_records(cfg: JobConfig, files: list[str], columns: list[str] | None, schema):
    """Each record file's rows, one file at a time, as a table on `schema` (the files'
    unified one: a column a file lacks reads as nulls) cut to `columns` (None: all).

    File by file with plain Parquet reads, not Arrow's dataset scanner: after a scan of a
    job's record files the scanner's thread pools kept ~30 MiB more in the driver than this
    (12,000 rows, 94 to 375 files alike), and what the driver keeps must not grow with the
    table.
    """
    import pyarrow as pa

    fs, _ = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    for path in files:
        table = read_file(fs, path, schema.names)
        have = table.column_names
        yield pa.table(
            [
                table.column(field.name).cast(field.type)
                if field.name in have
                else pa.nulls(table.num_rows, field.type)
                for field in schema
            ],
            schema=schema,
        )


def read_file(fs, path: str, columns):
    """Those of `columns` that one Parquet file has, read whole (see iter_records: a plain
    read, not Arrow's dataset scanner)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        return parquet.read(columns=[c for c in columns if c in names], use_threads=False)


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
    """After a run: the image folder's metadata file, or shard numbers without gaps.

    The metadata file is written record file by record file: a job of millions of rows
    never has its whole table in the driver's memory.
    """
    settings = cfg.storage.model_dump()
    if cfg.output.format == "webdataset":
        fs, root = storage.filesystem(storage.join(cfg.output.uri, "shards"), settings)
        shards.renumber(fs, root, shards.digits(num_rows))
        return
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = record_files(cfg)
    schema = (
        records_schema(cfg, files)
        if files
        else pa.schema([(ID_COLUMN, pa.uint64()), ("status", pa.string())])
    )
    ok = pc.field("status") == "ok"
    # `datasets` fails on uint64 values above 2**63 - 1 (OverflowError while building its
    # Arrow table); such a column (a seed given in the input) is written as int64 when all
    # its values fit, as text otherwise: a first pass over those columns alone decides.
    wide = [f.name for f in schema if f.name != ID_COLUMN and pa.types.is_uint64(f.type)]
    top = dict.fromkeys(wide, 0)
    for table in iter_records(cfg, files, [*wide, "status"], schema) if wide else []:
        table = table.filter(ok)
        for name in wide:
            top[name] = max(top[name], pc.max(table.column(name)).as_py() or 0)
    casts = {name: pa.int64() if top[name] < 2**63 else pa.string() for name in wide}
    columns = [f for f in schema if f.name != ID_COLUMN]
    out_schema = pa.schema(
        [pa.field("file_name", pa.string())]
        + [pa.field(f.name, casts.get(f.name, f.type)) for f in columns]
    )
    fs, root = storage.filesystem(storage.join(cfg.output.uri, "images"), settings)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{HF_METADATA}", "wb") as sink, pq.ParquetWriter(sink, out_schema) as w:
        for table in iter_records(cfg, files, [f.name for f in columns], schema):
            table = table.filter(ok)
            if table.num_rows == 0:
                continue
            names = [posixpath.basename(u) for u in table.column("image_uri").to_pylist()]
            arrays = [pa.array(names, pa.string())] + [
                table.column(f.name).cast(casts[f.name])
                if f.name in casts
                else table.column(f.name)
                for f in columns
            ]
            w.write_table(pa.table(arrays, schema=out_schema))


def clear(fs, root: str) -> None:
    for entry in ENTRIES:
        if fs.exists(f"{root}/{entry}"):
            fs.rm(f"{root}/{entry}", recursive=True)
