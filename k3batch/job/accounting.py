"""Accounting after a run: rows in = rows out = ok + error, no row and no id twice, read back
from the written records."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from k3batch import schema
from k3batch.config import JobConfig
from k3batch.job.inputs import InputInfo, value_counts
from k3batch.outputs import Output, records

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind
    from k3batch.rows import RowRules

SHOWN_IDS = 100  # ids listed per accounting problem in run.json (all are counted)


def account(cfg: JobConfig, kind: JobKind, info: InputInfo, output: Output) -> dict:
    """Records expected = records out = ok + error, no record and no id twice: read back from
    the written records (across every run into this output, each once). A record is an image:
    a row asking for N images has N (`k` = 0 .. N-1), so records = rows x N. When records are
    missing or doubled, the input is read again (through Ray, for its row hashes) to name them,
    each row's records counted by the job's `kind` (`record_rules`)."""
    import pyarrow.compute as pc

    table = records.read_records(
        output,
        output.record_files(),
        columns=[schema.ID, schema.STATUS, schema.ERROR],
        optional=(
            *schema.BEAUTIFY_COLUMNS,
            schema.WARNING,
            schema.ROW_HASH,
            schema.RECORD_HASH,
            schema.K,
        ),
    )
    beautify_columns = [c for c in schema.BEAUTIFY_COLUMNS if c in table.column_names]
    # Counted in Arrow: only repeated ids and the rows in error become Python objects (a
    # table of millions of rows would otherwise be millions of them in the driver).
    statuses = value_counts(table.column(schema.STATUS).drop_null())
    ids = table.column(schema.ID)
    if schema.K in table.column_names and pc.max(table.column(schema.K)).as_py():
        # A record is (id, k): "id/k" for the images after a row's first.
        k = table.column(schema.K)
        ids = pc.if_else(
            pc.fill_null(pc.greater(k, 0), False),
            pc.binary_join_element_wise(ids, pc.cast(k, "string"), "/"),
            ids,
        )
    duplicates = sorted(value_counts(ids.drop_null(), at_least=2))
    hash_column = next(
        (c for c in (schema.RECORD_HASH, schema.ROW_HASH) if c in table.column_names), None
    )
    repeated_rows = (
        sum(c - 1 for c in value_counts(table.column(hash_column).drop_null(), at_least=2).values())
        if hash_column
        else 0
    )
    errors_by_field = _fields_named(table.column(schema.ERROR))
    warnings_by_field = (
        _fields_named(table.column(schema.WARNING))
        if schema.WARNING in table.column_names
        else Counter()
    )
    rows_out = table.num_rows
    expected = info.num_records
    ok = statuses.get(schema.STATUS_OK, 0)
    failed = statuses.get(schema.STATUS_ERROR, 0)
    missing, unexpected = [], []
    if schema.ROW_HASH in table.column_names and (rows_out != expected or repeated_rows):
        missing, unexpected = compare_with_input(cfg, kind.record_rules(cfg), info, table)
    out = {
        "rows_in": info.num_rows,
        "records_expected": expected,
        "rows_out": rows_out,
        "ok": ok,
        "error": failed,
        "errors_by_field": dict(errors_by_field.most_common()),
        "warnings_by_field": dict(warnings_by_field.most_common()),
        "accounting": {
            "ok": rows_out == expected
            and ok + failed == rows_out
            and not duplicates
            and not repeated_rows
            and not missing
            and not unexpected,
            "rows_in": info.num_rows,
            "records_expected": expected,
            "rows_out": rows_out,
            "ok_plus_error": ok + failed,
            "other_status": rows_out - ok - failed,
            "duplicate_ids": duplicates[:SHOWN_IDS],
            "num_duplicate_ids": len(duplicates),
            "rows_written_twice": repeated_rows,
            "missing_ids": missing[:SHOWN_IDS],
            "num_missing": len(missing),
            "unexpected_ids": unexpected[:SHOWN_IDS],
            "num_unexpected": len(unexpected),
        },
    }
    if beautify_columns:
        out["beautify"] = beautify_counts(table)
    return out


def _fields_named(column) -> Counter:
    """How many rows name each field in an error (or warning) text like "prompt: ...; seed: ..."."""
    import pyarrow.compute as pc

    found = Counter()
    texts = column.drop_null()
    for text in texts.filter(pc.not_equal(texts, "")).to_pylist():
        for part in text.split("; "):
            found[part.split(":", 1)[0]] += 1
    return found


def compare_with_input(
    cfg: JobConfig, rules: RowRules, info: InputInfo, table
) -> tuple[list, list]:
    """Ids of input records (images) without a record, and of records of no input row, by
    record hash (from the row hash: the identity Ray gives each input row; user ids may
    repeat). An image after a row's first is named `id/k`."""
    from k3batch.dataflow import read_input
    from k3batch.rows.records import derived_id, image_index, record_hashes, record_name
    from k3batch.rows.seeds import records_of

    per_image = schema.RECORD_HASH in table.column_names
    ds = read_input(cfg, info.schema)
    id_column = cfg.input.id_column if cfg.input.id_column in info.columns else None
    images_column = (
        rules.images_column
        if per_image and rules.images_column and rules.images_column in info.columns
        else None
    )
    input_hashes, input_ids = [], []
    columns = [c for c in (id_column, schema.ROW_HASH, images_column) if c]
    for batch in ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None):
        hashes = batch.column(schema.ROW_HASH).to_pylist()
        # As ValidateStage names rows: the id column, or an id derived from the row hash.
        given = batch.column(id_column).to_pylist() if id_column else [None] * len(hashes)
        counts = (
            [records_of(v, rules) for v in batch.column(images_column).to_pylist()]
            if images_column
            else [rules.num_images_per_prompt if per_image else 1] * len(hashes)
        )
        row_ids = [
            str(i) if isinstance(i, (str, int)) and i != "" else derived_id(h)
            for i, h in zip(given, hashes, strict=True)
        ]
        owner, ks = image_index(counts)
        input_hashes += record_hashes([hashes[j] for j in owner], ks).tolist()
        input_ids += [record_name(row_ids[j], k) for j, k in zip(owner, ks, strict=True)]
    out_hashes = table.column(schema.RECORD_HASH if per_image else schema.ROW_HASH).to_pylist()
    out_ids = table.column(schema.ID).to_pylist()
    out_ks = table.column(schema.K).to_pylist() if schema.K in table.column_names else None
    written = set(out_hashes)
    known = set(input_hashes)
    missing = [i for h, i in zip(input_hashes, input_ids, strict=True) if h not in written]
    unexpected = [
        record_name(i, out_ks[j] if out_ks else 0)
        for j, (h, i) in enumerate(zip(out_hashes, out_ids, strict=True))
        if h not in known
    ]
    return missing, unexpected


def beautify_counts(table) -> dict:
    """How many rows the LLM beautified, how many requests failed, and which prompt was used."""
    counts = {}
    if schema.BEAUTIFIED_PROMPT in table.column_names:
        counts["beautified"] = sum(
            1 for t in table.column(schema.BEAUTIFIED_PROMPT).to_pylist() if t
        )
    if schema.BEAUTIFY_ERROR in table.column_names:
        counts["errors"] = sum(1 for e in table.column(schema.BEAUTIFY_ERROR).to_pylist() if e)
    if schema.BEAUTIFY_FALLBACK in table.column_names:
        fallbacks = Counter(table.column(schema.BEAUTIFY_FALLBACK).to_pylist())
        counts["fallbacks"] = {str(k): v for k, v in fallbacks.most_common()}
    return counts
