"""What a report says of every row of a run, read from its metadata files a file at a time: the
counts, error kinds and examples and generation timing (from the files' stats when every file
has them, else from their rows), and the sample rows drawn for the page and the sheet."""

from __future__ import annotations

import math
import random
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field

from k3batch import schema, storage
from k3batch.metrics import error_kinds
from k3batch.outputs import records
from k3batch.report.contact_sheet import beautify

MAX_ERROR_EXAMPLES = 20

METADATA_COLUMNS = (
    schema.ID,
    schema.PROMPT,
    schema.STATUS,
    schema.ERROR,
    schema.IMAGE_URI,
    schema.SEED,
    schema.WIDTH,
    schema.HEIGHT,
    schema.NUM_INFERENCE_STEPS,
    schema.GUIDANCE_SCALE,
    schema.GENERATE_SECONDS,
)


def metadata_files(fs, root: str) -> list[str]:
    meta = f"{root}/metadata"
    files = storage.list_files(fs, meta, ".parquet")
    if not files:
        raise FileNotFoundError(
            f"no metadata Parquet files under {meta}: is this a k3batch output?"
        )
    return files


def _with_image(table):
    """Rows in `ok` with an image (none when the table has no image column)."""
    import pyarrow.compute as pc

    if schema.IMAGE_URI not in table.column_names:
        return table.slice(0, 0)
    return table.filter(
        pc.and_(
            pc.equal(table[schema.STATUS], schema.STATUS_OK), pc.is_valid(table[schema.IMAGE_URI])
        )
    )


SCAN_COLUMNS = (
    schema.ID,
    schema.PROMPT,
    schema.STATUS,
    schema.ERROR,
    schema.IMAGE_URI,
    schema.GENERATE_SECONDS,
)


@dataclass
class Scan:
    """What the page says of every row, gathered a metadata file at a time: a run of millions
    of rows is never one table in memory."""

    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    error_examples: list[dict] = field(default_factory=list)
    seconds: array = field(default_factory=lambda: array("d"))  # generate_seconds
    ok_ids: list = field(default_factory=list)  # per file, Arrow: ids of rows with an image

    def add(self, table) -> None:
        import pyarrow as pa

        names = table.column_names
        self.rows += table.num_rows
        self.statuses.update(table.column(schema.STATUS).to_pylist())
        for i, err in enumerate(
            table.column(schema.ERROR).to_pylist() if schema.ERROR in names else []
        ):
            if not err:
                continue
            self.error_kinds.update(error_kinds(err))
            if len(self.error_examples) < MAX_ERROR_EXAMPLES:
                self.error_examples.append(
                    {
                        "id": table[schema.ID][i].as_py(),
                        "prompt": beautify(table[schema.PROMPT][i].as_py(), 120),
                        "error": err,
                    }
                )
        if schema.GENERATE_SECONDS in names:
            values = table.column(schema.GENERATE_SECONDS).to_pylist()
            self.seconds.extend(v for v in values if v is not None)
        ids = _with_image(table).column(schema.ID)
        self.ok_ids.append(ids.combine_chunks().cast(pa.string()))

    def generate_timing(self) -> dict | None:
        values = sorted(self.seconds)
        if not values:
            return None
        return {
            "images": len(values),
            "mean": statistics.fmean(values),
            "p50": values[len(values) // 2],
            "p95": values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)],
        }


def scan_rows(fs, files: list[str]) -> Scan:
    scan = Scan()
    for path in files:
        scan.add(records.read_file(fs, path, SCAN_COLUMNS))
    return scan


@dataclass
class StatsScan:
    """What the page says of every row, from the metadata files' stats (`outputs.stats`):
    one small file each instead of their rows. Only the few error examples are read from
    rows, from files whose stats count errors."""

    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    error_examples: list[dict] = field(default_factory=list)
    seconds_count: int = 0
    seconds_sum: float = 0.0
    successes: list[int] = field(default_factory=list)  # per file

    @classmethod
    def read(cls, fs, files: list[str], found: dict[str, dict]) -> StatsScan:
        scan = cls()
        for path in files:
            st = found[path]
            scan.rows += st["count"]
            scan.statuses.update(st["status_dict"])
            scan.error_kinds.update(st["errors_by_field"])
            scan.successes.append(st["successes"])
            if st.get("generate_seconds"):
                scan.seconds_count += st["generate_seconds"]["count"]
                scan.seconds_sum += st["generate_seconds"]["sum"]
            if st["failed_to_generate"] and len(scan.error_examples) < MAX_ERROR_EXAMPLES:
                errors = Scan()
                errors.add(records.read_file(fs, path, SCAN_COLUMNS))
                room = MAX_ERROR_EXAMPLES - len(scan.error_examples)
                scan.error_examples += errors.error_examples[:room]
        return scan

    def generate_timing(self) -> dict | None:
        """Count and mean only: the stats keep sums, not the values a median needs."""
        if not self.seconds_count:
            return None
        return {
            "images": self.seconds_count,
            "mean": self.seconds_sum / self.seconds_count,
            "p50": None,
            "p95": None,
        }


def pick_by_stats(fs, files: list[str], scan: StatsScan, n: int, seed: int) -> list[dict]:
    """`n` ok rows with images, the same ones each time for the same metadata: positions drawn
    with `seed` among the ok rows of the files in name order, then read from the files that
    hold them (their stats say how many each has)."""
    import pyarrow.compute as pc

    total = sum(scan.successes)
    chosen = sorted(random.Random(seed).sample(range(total), min(n, total)))
    picked, start = [], 0
    for path, count in zip(files, scan.successes, strict=True):
        local = [c - start for c in chosen if start <= c < start + count]
        start += count
        if not local:
            continue
        table = records.read_file(fs, path, METADATA_COLUMNS)
        ok = table.filter(pc.equal(table[schema.STATUS], schema.STATUS_OK)).to_pylist()
        picked += [ok[j] for j in local if j < len(ok) and ok[j].get(schema.IMAGE_URI)]
    return picked


def pick_rows(fs, files: list[str], scan: Scan, n: int, seed: int) -> list[dict]:
    """`n` ok rows with images, the same ones each time for the same metadata: drawn with
    `seed` from those rows sorted by id, then read back whole from the files that hold them
    (the scan's ids are per file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.chunked_array(scan.ok_ids, pa.string())
    chosen = sorted(random.Random(seed).sample(range(len(ids)), min(n, len(ids))))
    if not chosen:
        return []
    wanted = ids.take(pc.sort_indices(ids).take(pa.array(chosen))).to_pylist()
    wanted_set = pa.array(wanted, pa.string())
    found: dict[str, dict] = {}
    for path, file_ids in zip(files, scan.ok_ids, strict=True):
        if not pc.any(pc.is_in(file_ids, value_set=wanted_set)).as_py():
            continue
        table = _with_image(records.read_file(fs, path, METADATA_COLUMNS))
        keep = pc.is_in(table[schema.ID].cast(pa.string()), value_set=wanted_set)
        for row in table.filter(keep).to_pylist():
            found.setdefault(str(row[schema.ID]), row)
    return [found[i] for i in wanted if i in found]
