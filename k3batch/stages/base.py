"""The stage contract and how a stage's output merges into an Arrow batch."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa


class Stage:
    """A batch transform. Subclasses set `needs`, `adds` (column -> Arrow type) and `drops`."""

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
    table = stage.prepare(table)
    stage.check_columns(table.column_names)
    names = [*stage.needs, *(c for c in stage.optional if c in table.column_names)]
    batch = {name: table.column(name).to_pylist() for name in names}
    out = stage(batch)
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
    return table.select(keep)
