"""Per-file stats, as img2dataset writes them: for each record file `X.parquet` an
`X_stats.json` with its counts by status and by error field, generation timings, the config
hash and the k3batch version, so counting a run reads one small file per record file
instead of its rows. A webdataset shard's sits next to it (`shards/00003_stats.json`, as
img2dataset's); a metadata file's goes in `metadata/_stats/`, so that `metadata/` stays a
folder of Parquet files only, which Arrow, Ray and `datasets` read as one table (Arrow and
Ray skip `_`-prefixed entries).

Counts are of records, that is of images (with `num_images_per_prompt` one prompt row
makes several). A stats file is written after its record file, in the same write task, so
Ray's checkpoint commits both or neither; its name begins with its record file's, so the
cleanup of a half-done write on resume (which matches file names under the output folder by
prefix, subfolders included) deletes both. A record file without its stats file (a killed
run that is not rerun) is counted from its rows instead (`read_stats` leaves it out).
"""

from __future__ import annotations

import json
import posixpath
import time
from datetime import UTC, datetime

from k3batch import __version__, schema

SUFFIX = "_stats.json"
# What a stats file is computed from (those a record file has).
COLUMNS = (schema.STATUS, schema.ERROR, schema.GENERATE_SECONDS)


def stats_path(record_path: str, folder: str = "") -> str:
    """`shards/00003.parquet` -> `shards/00003_stats.json`; with `folder="_stats"`,
    `metadata/X-0.parquet` -> `metadata/_stats/X-0_stats.json`."""
    parent, name = posixpath.split(record_path)
    return posixpath.join(parent, folder, name.removesuffix(".parquet") + SUFFIX)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def file_stats(table, config_hash: str | None, start: float, end: float | None = None) -> dict:
    """The stats of one record file's rows (`table` holds at least `status`; `error` and
    `generate_seconds` when the file has them). `start`/`end`: the write's times (epoch s)."""
    import pyarrow.compute as pc

    from k3batch.job.accounting import _fields_named
    from k3batch.job.inputs import value_counts

    end = time.time() if end is None else end
    names = table.column_names
    statuses = value_counts(table.column(schema.STATUS).drop_null())
    errors = _fields_named(table.column(schema.ERROR)) if schema.ERROR in names else {}
    timing = None
    if schema.GENERATE_SECONDS in names:
        seconds = table.column(schema.GENERATE_SECONDS).drop_null()
        total = pc.sum(seconds).as_py() or 0.0
        timing = {
            "count": len(seconds),
            "sum": total,
            "mean": total / len(seconds) if len(seconds) else None,
        }
    return {
        "count": table.num_rows,
        "successes": statuses.get(schema.STATUS_OK, 0),
        "failed_to_generate": statuses.get(schema.STATUS_ERROR, 0),
        "status_dict": dict(sorted(statuses.items())),
        "errors_by_field": dict(errors.most_common()) if errors else {},
        "generate_seconds": timing,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "duration": end - start,
        "config_hash": config_hash,
        "k3batch_version": __version__,
    }


def write_stats(filesystem, record_path: str, stats: dict, folder: str = "") -> None:
    """Write the stats of `record_path` through a pyarrow filesystem."""
    path = stats_path(record_path, folder)
    if folder:
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(stats, indent=2).encode())


def read_stats(fs, files: list[str], folder: str = "") -> dict[str, dict]:
    """The stats of those record `files` (fsspec filesystem paths) that have a stats file."""
    found = {}
    for path in files:
        try:
            found[path] = json.loads(fs.cat_file(stats_path(path, folder)))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return found
