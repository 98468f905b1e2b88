"""The stage contract and how a stage's output merges into an Arrow batch."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

from k3batch.schema import ERROR, STATUS, STATUS_COLUMNS, STATUS_ERROR, STATUS_OK

# A stage that turns a row into several (or none) returns, under this key, the input row of
# each output row: the columns it does not set are copied from there (GenerateStage's images).
SOURCE_ROWS = "__source_rows__"


class Stage:
    """A batch transform. Subclasses set `needs`, `adds` (column -> Arrow type) and `drops`.

    Output rows are the input rows, unless the output carries `SOURCE_ROWS`."""

    needs: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()  # read when the batch has them
    adds: ClassVar[dict[str, pa.DataType]] = {}
    drops: ClassVar[tuple[str, ...]] = ()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def prepare(self, table: pa.Table) -> pa.Table:
        """Arrow-level preparation before the batch is read (default: none)."""
        return table

    def check_columns(self, columns) -> None:
        missing = [c for c in self.needs if c not in columns]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs column(s) {missing}; the batch has {sorted(columns)}"
            )


def apply_stage(stage: Stage, table: pa.Table) -> pa.Table:
    """Run `stage` on an Arrow batch: other columns pass through, added ones are set or replaced."""
    return run_stage(stage, table)[0]


def run_stage(stage: Stage, table: pa.Table) -> tuple[pa.Table, list[int] | None]:
    """`apply_stage`, also returning the input row of each output row when the stage
    expanded rows (None when output rows are the input rows)."""
    table = stage.prepare(table)
    stage.check_columns(table.column_names)
    names = [*stage.needs, *(c for c in stage.optional if c in table.column_names)]
    batch = {name: table.column(name).to_pylist() for name in names}
    out = stage(batch)
    source = out.pop(SOURCE_ROWS, None)
    if source is not None:
        table = table.take(pa.array(source, pa.int64()))
    for name, type_ in stage.adds.items():
        column = pa.array(out[name], type=type_)
        if len(column) != table.num_rows:
            raise ValueError(
                f"{type(stage).__name__} returned {len(column)} values for {name!r}, "
                f"expected {table.num_rows}"
            )
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    keep = [c for c in table.column_names if c not in stage.drops]
    return table.select(keep), source


def start_output(batch: dict[str, list], adds, carry: tuple[str, ...] = ()) -> dict[str, list]:
    """A stage's output columns for `batch`: each row's status and error (and the `carry`
    columns the stage may rewrite) carried over, so a row in error stays so; every other
    added column empty."""
    n = len(batch[STATUS])
    kept = (*STATUS_COLUMNS, *carry)
    return {name: list(batch[name]) if name in kept else [None] * n for name in adds}


def ok_rows(batch: dict[str, list]) -> list[int]:
    """Indices of the rows still ok: a stage works on these and passes the others through."""
    return [i for i, status in enumerate(batch[STATUS]) if status == STATUS_OK]


def fail_row(out: dict[str, list], i: int, field: str | None, reason) -> None:
    """Mark row `i` failed, naming the field (or stage) at fault: `field: reason`; an
    exception reads `Type: message`."""
    text = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
    out[STATUS][i] = STATUS_ERROR
    out[ERROR][i] = f"{field}: {text}" if field else text
