"""Reading an output's record files: the Parquet files holding one row per finished input
row (metadata/*.parquet for `files`, the shards' indexes for `webdataset`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.outputs import Output


def read_records(
    output: Output,
    files: list[str],
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
):
    """One Arrow table from record files whose schemas may differ (input parts need not
    share their pass-through columns). `optional` columns are added when the files have them."""
    import pyarrow as pa

    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns or []})
    schema = records_schema(output, files)
    if columns is not None:
        columns = [*columns, *(c for c in optional if c in schema.names)]
    return pa.concat_tables(iter_records(output, files, columns, schema))


def records_schema(output: Output, files: list[str]):
    """The record files' unified schema (non-empty list), from their footers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = output.filesystem()
    return pa.unify_schemas([pq.read_schema(f, filesystem=fs) for f in files])


def iter_records(output: Output, files: list[str], columns: list[str] | None, schema):
    """Each record file's rows, one file at a time, as a table on `schema` (the files'
    unified one: a column a file lacks reads as nulls) cut to `columns` (None: all).

    File by file with plain Parquet reads, not Arrow's dataset scanner: after a scan of a
    job's record files the scanner's thread pools kept ~30 MiB more in the driver than this
    (12,000 rows, 94 to 375 files alike), and what the driver keeps must not grow with the
    table.
    """
    import pyarrow as pa

    fs, _ = output.filesystem()
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


def count_rows(output: Output, files: list[str], skip_unreadable: bool = False) -> int:
    """Rows in these record files, from their footers. `skip_unreadable`: count a file
    without a readable footer as empty: a write that a failed or killed run left half-done
    (Ray deletes it, by its pending checkpoint, when the rerun starts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = output.filesystem()
    total = 0
    for f in files:
        try:
            total += pq.read_metadata(f, filesystem=fs).num_rows
        except (pa.ArrowInvalid, OSError):
            if not skip_unreadable:
                raise
    return total
