"""Input inspection at pre-flight: the Parquet footers, the prompt column, one schema for
all files, and ids that repeat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k3batch import storage
from k3batch.config import ConfigError, JobConfig

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind
    from k3batch.rows import RowRules


@dataclass
class InputInfo:
    files: list[str]
    columns: list[str]
    num_rows: int
    schema: object = None  # pyarrow.Schema: every input file's columns, unified
    duplicate_ids: dict = field(default_factory=dict)  # id -> rows that give it (2 or more)
    # Records the job must write: one per image (num_images_per_prompt per row), or one per
    # row for kinds that make no images. None: as many as rows.
    num_records: int | None = None
    # Rows in each of `files`, from their footers: with the paths, what Ray's row hashes
    # are made of (a rerun with nothing left to do is told by them: `resume.completed`).
    file_rows: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.num_records is None:
            self.num_records = self.num_rows


def inspect_input(cfg: JobConfig, kind: JobKind) -> InputInfo:
    """Parquet footers only: the input exists, has the columns the job's `kind` needs, and
    how many rows (and, for a kind that makes images, how many images its rows ask for)."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(cfg.input.uri, cfg.storage.model_dump())
    try:
        if not fs.exists(path):
            raise ConfigError(f"input.uri: no such file or directory: {cfg.input.uri}")
        files = (
            [path]
            if fs.isfile(path)
            else sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        )
    except ConfigError:
        raise
    except Exception as e:  # storage errors: unreachable endpoint, credentials, permissions
        raise ConfigError(
            f"input.uri: cannot read {cfg.input.uri}: {type(e).__name__}: {e}"
        ) from None
    if not files:
        raise ConfigError(f"input.uri: no .parquet files under {cfg.input.uri}")
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        fragments = list(dataset.get_fragments())
        schemas = [fragment.physical_schema for fragment in fragments]
        file_rows = [fragment.count_rows() for fragment in fragments]
        num_rows = sum(file_rows)
    except Exception as e:
        raise ConfigError(
            f"input.uri: not a readable Parquet table: {cfg.input.uri}: {e}"
        ) from None
    schema = unified_schema(files, schemas)
    columns = schema.names
    for name, column in kind.input_columns(cfg).items():
        if column not in columns:
            raise ConfigError(
                f"{name}: column {column!r} is not in the input table "
                f"(columns: {', '.join(columns)})"
            )
    beautified = cfg.input.beautified_prompt_column
    if beautified and beautified not in columns:
        raise ConfigError(
            f"input.beautified_prompt_column: column {beautified!r} is not in the input table "
            f"(columns: {', '.join(columns)})"
        )
    duplicates = {}
    if cfg.input.id_column in columns:
        try:
            ids = pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table(
                columns=[cfg.input.id_column]
            )
        except Exception as e:
            raise ConfigError(f"input.uri: cannot read {cfg.input.uri}: {e}") from None
        duplicates = repeated_ids(ids.column(0), cfg.input.id_column)
    num_records = num_rows
    if kind.makes_images:
        num_records = count_images(cfg, kind.record_rules(cfg), files, fs, schema, num_rows)
    return InputInfo(
        files=files,
        columns=columns,
        num_rows=num_rows,
        schema=schema,
        duplicate_ids=duplicates,
        num_records=num_records,
        file_rows=file_rows,
    )


def count_images(cfg: JobConfig, rules: RowRules, files, fs, schema, num_rows: int) -> int:
    """Images the rows ask for, counted as validation reads each row's
    `num_images_per_prompt` (a bad value is one error record). `rules`: the kind's
    `record_rules`."""
    import pyarrow.dataset as pads

    from k3batch.rows.seeds import records_of

    if rules.images_column is None or rules.images_column not in schema.names:
        return num_rows * rules.num_images_per_prompt
    try:
        column = (
            pads.dataset(files, schema=schema, filesystem=fs, format="parquet")
            .to_table(columns=[rules.images_column])
            .column(0)
        )
    except Exception as e:
        raise ConfigError(f"input.uri: cannot read {cfg.input.uri}: {e}") from None
    # Distinct values only become Python objects (nulls are one of them: the default).
    return sum(records_of(v, rules) * n for v, n in value_counts(column).items())


MAX_DUPLICATE_IDS = 10_000


def value_counts(column, at_least: int = 1) -> dict:
    """value -> rows holding it, for the values at least `at_least` rows hold. Counted in
    Arrow: only those values become Python objects, not one per row of a large table."""
    import pyarrow.compute as pc

    counts = pc.value_counts(column)
    if at_least > 1:
        counts = counts.filter(pc.greater_equal(counts.field("counts"), at_least))
    return dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )


def repeated_ids(column, name: str) -> dict[str, int]:
    """Ids that more than one input row gives (as ValidateStage spells ids), with counts.

    Such rows would share an image key and overwrite each other's image: they become row
    errors instead. A table where nearly every id repeats is refused: its id column is not
    an id.
    """
    repeated: dict[str, int] = {}
    for value, n in value_counts(column, at_least=2).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, str) and value):
            repeated[str(value)] = repeated.get(str(value), 0) + n
    if len(repeated) > MAX_DUPLICATE_IDS:
        shown = ", ".join(repr(v) for v in list(repeated)[:5])
        raise ConfigError(
            f"input.id_column: {len(repeated)} values of column {name!r} repeat (e.g. {shown}); "
            "ids must be unique: fix the column, or name another with input.id_column"
        )
    return repeated


def unified_schema(files: list[str], schemas: list):
    """One schema for all input files: a column missing from a file reads as nulls there
    (so its rows fail on a missing prompt, row by row), int32 and int64 unify, and so on.

    Ray Data infers its schema from a sample of the files and cannot read a column that is a
    number in one file and text in another: such input is refused here, naming the column.
    """
    import pyarrow as pa

    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    seen: dict[str, tuple] = {}
    for path, schema in zip(files, schemas, strict=True):
        for column in schema:
            if column.name not in seen:
                seen[column.name] = (column.type, path)
                continue
            first_type, first_path = seen[column.name]
            try:
                pa.unify_schemas(
                    [pa.schema([(column.name, first_type)]), pa.schema([column])],
                    promote_options="permissive",
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise ConfigError(
                    f"input.uri: column {column.name!r} is {first_type} in {first_path} but "
                    f"{column.type} in {path}; every input file must give a column one type"
                ) from None
    raise ConfigError("input.uri: the input files' schemas cannot be combined")
