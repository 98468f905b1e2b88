"""webdataset output: tar shards with a Parquet index each, numbered 00000, 00001, ...

A shard is `shards/NNNNN.tar` (`<key>.<ext>`, `<key>.txt` with the prompt, `<key>.json` with
the row's metadata, for the rows with an image) plus `shards/NNNNN.parquet` (every row of the
shard, errors included) plus `shards/NNNNN_stats.json` (its counts, see `outputs.stats`): the
layout img2dataset writes. Ray's own webdataset writer writes
the tar (its datasink, extended here with the index); webdataset's TarWriter would do too,
but importing `webdataset` pulls torch into every write worker.

Numbers come from Ray's write task index plus the first free number, so a resumed run
appends after the shards already there; `renumber` closes the gaps a killed run leaves, so a
finished output is always 00000 .. N-1 (brace patterns such as `{00000..00041}.tar` work).
"""

from __future__ import annotations

import json
import posixpath
import re
import time

from k3batch import schema, storage
from k3batch.outputs import stats

MIN_DIGITS = 5
SHARD_NAME = re.compile(r"^(\d+)\.(tar|parquet)$")
_MANIFEST = "_renumber.json"
SHARD_FILES = (".tar", ".parquet", stats.SUFFIX)  # what one shard number names
SAMPLE_EXCLUDE = (schema.IMAGE_BYTES, schema.SOURCE_IMAGE_BYTES)


def digits(num_rows: int) -> int:
    """Shard number width: a run never writes more shards than rows, so names never outgrow
    it (Ray's checkpoint recovery matches a pending shard's files by name prefix, which a
    longer number could share)."""
    return max(MIN_DIGITS, len(str(num_rows)))


def existing(fs, root: str) -> dict[int, set[str]]:
    """Shard number -> the extensions present ({"tar", "parquet"})."""
    found: dict[int, set[str]] = {}
    for path in storage.list_files(fs, root):
        m = SHARD_NAME.match(posixpath.basename(path))
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def next_number(fs, root: str) -> int:
    numbers = existing(fs, root)
    return max(numbers) + 1 if numbers else 0


def shard_sink(
    path: str,
    *,
    filesystem,
    first: int,
    width: int,
    image_ext: str,
    shard_size: int,
    config_hash: str | None = None,
):
    """A Ray datasink writing one shard (tar + index + stats) per write task."""
    from ray.data._internal.datasource.webdataset_datasink import WebDatasetDatasink
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{first + task_index:0{width}d}.tar"

    class ShardDatasink(WebDatasetDatasink):
        def write_block(self, block, block_index, ctx):
            import pyarrow as pa
            import pyarrow.parquet as pq
            from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
            from ray.data.block import BlockAccessor

            start = time.time()
            table = block.to_arrow()
            super().write_block(
                BlockAccessor.for_block(samples(table, image_ext)), block_index, ctx
            )
            # The index goes last: a shard is recorded only once its tar is complete, and
            # Ray's checkpoint commits the rows only after both files are written.
            name = self.filename_provider.get_filename_for_task(
                ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
            )
            index = table.drop_columns([c for c in SAMPLE_EXCLUDE if c in table.column_names])
            index_path = posixpath.join(self.path, name.removesuffix(".tar") + ".parquet")
            with self.open_output_stream(index_path) as f:
                pq.write_table(pa.Table.from_batches(index.to_batches(), index.schema), f)
            # Its stats last, from the rows just written (see outputs.stats).
            stats.write_stats(
                self.filesystem, index_path, stats.file_stats(index, config_hash, start)
            )

    return ShardDatasink(
        path,
        encoder=None,  # samples() already made every field bytes or text
        filesystem=filesystem,
        filename_provider=ShardNames(),
        min_rows_per_file=shard_size,
    )


def samples(table, image_ext: str):
    """The tar's samples: `__key__`, the image, the prompt and the row as JSON (ok rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = table.filter(pc.equal(table.column(schema.STATUS), schema.STATUS_OK))
    rows = ok.drop_columns([c for c in SAMPLE_EXCLUDE if c in ok.column_names]).to_pylist()
    columns = {"__key__": ok.column(schema.KEY), image_ext: ok.column(schema.IMAGE_BYTES)}
    if schema.SOURCE_IMAGE_BYTES in ok.column_names:
        # upscale.keep_source: the image before upscaling, `<key>.source.<ext>`.
        columns[f"source.{image_ext}"] = ok.column(schema.SOURCE_IMAGE_BYTES)
    if schema.PROMPT in ok.column_names:  # an upscale job's table may have no prompt
        columns["txt"] = ok.column(schema.PROMPT)
    columns["json"] = pa.array([json.dumps(r, default=str) for r in rows], pa.string())
    return pa.table(columns)


def renumber(fs, root: str, width: int) -> int:
    """Rename the highest shards into the gaps so numbers run 0 .. N-1; returns N.

    The moves are written to a manifest first and replayed by the next call if this one is
    killed half-way, so a tar, its index and its stats are never split up.
    """
    manifest = f"{root}/{_MANIFEST}"
    if fs.exists(manifest):
        moves = json.loads(fs.cat_file(manifest))
    else:
        numbers = sorted(existing(fs, root))
        total = len(numbers)
        # One set, not one per candidate: that made finalising quadratic in the shards
        # (benchmarks/scale.py: 39,000 shards for 10M rows).
        taken = set(numbers)
        gaps = [n for n in range(total) if n not in taken]
        above = [n for n in numbers if n >= total]
        moves = list(zip(above, gaps, strict=True))
        if not moves:
            return total
        fs.pipe_file(manifest, json.dumps(moves).encode())
    for src, dst in moves:
        for ext in SHARD_FILES:
            source = f"{root}/{src:0{width}d}{ext}"
            if fs.exists(source):  # gone already: moved before a kill
                fs.mv(source, f"{root}/{dst:0{width}d}{ext}")
    fs.rm(manifest)
    return len(existing(fs, root))
