"""Normalise and validate input rows; give each a stable id."""

from __future__ import annotations

import pyarrow as pa

from k3batch import schema
from k3batch.rows import records
from k3batch.rows import rules as row_rules
from k3batch.rows.check import normalise_row
from k3batch.rows.values import show
from k3batch.stages.base import Stage


class ValidateStage(Stage):
    adds = schema.types(*schema.VALIDATED_COLUMNS)

    def __init__(
        self,
        rules: row_rules.RowRules,
        prompt_column: str = schema.PROMPT,
        id_column: str = schema.ID,
        duplicate_ids: dict[str, int] | None = None,
    ):
        self.rules = rules
        self.prompt_column = prompt_column
        self.id_column = id_column
        # Ids several input rows give (found before the job starts, across all files).
        self.duplicate_ids = duplicate_ids or {}
        self.needs = (prompt_column,)
        self.optional = (
            id_column,
            schema.ROW_HASH,
            *schema.OVERRIDE_COLUMNS,
            *schema.IMAGE_COLUMNS,
            *schema.K22_OVERRIDE_COLUMNS,
            *schema.K22_INPUT_COLUMNS,
            *schema.CONTROLNET_COLUMNS,
            *schema.IP_ADAPTER_COLUMNS,
        )
        # The settings this job's rows resolve beyond every job's (a prior's, a hinted row's
        # ControlNet settings, the IP-Adapter's scale); other jobs' outputs keep their columns.
        self.adds = self.adds | schema.types(*rules.capabilities.validated_columns())

    def prepare(self, table: pa.Table) -> pa.Table:
        names = [f"input_{c}" if c in schema.OUTPUT_ONLY_COLUMNS else c for c in table.column_names]
        if self.id_column not in names and schema.ROW_HASH not in names:
            raise KeyError(
                f"ValidateStage needs an {self.id_column!r} column or a {schema.ROW_HASH!r} column to derive ids from"
            )
        return table.rename_columns(names)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[self.prompt_column])
        out: dict[str, list] = {name: [] for name in self.adds}
        for i in range(n):
            raw = {c: batch[c][i] for c in batch}
            row_id, id_error = self.row_id(batch, i)
            raw[schema.ID] = row_id
            row = normalise_row(raw, self.prompt_column, self.rules)
            if id_error:
                row[schema.STATUS] = schema.STATUS_ERROR
                row[schema.ERROR] = "; ".join(e for e in (id_error, row[schema.ERROR]) if e)
            for name in self.adds:
                out[name].append(row[name])
        return out

    def row_id(self, batch: dict[str, list], i: int) -> tuple[str, str | None]:
        """Row `i`'s id and the error of a bad or repeated id (None when fine)."""
        ids = batch.get(self.id_column)
        hashes = batch.get(schema.ROW_HASH)
        id_error = None
        value = ids[i] if ids is not None else None
        if ids is None:
            return records.derived_id(hashes[i]), None
        if (isinstance(value, str) and value) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            row_id = str(value)
            if row_id not in self.duplicate_ids:
                return row_id, None
            # Rows sharing an id would share an image key: none of them may use it.
            id_error = (
                f"{self.id_column}: {show(value)} is not unique "
                f"({self.duplicate_ids[row_id]} input rows give it)"
            )
        else:
            id_error = (
                f"{self.id_column}: expected a non-empty string or integer, got {show(value)}"
            )
        # Keep the row (accounted for, with an error) under a derived id when we can.
        return (records.derived_id(hashes[i]) if hashes is not None else f"row-{i}"), id_error
