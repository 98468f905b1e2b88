"""`files` output: OUTPUT/images/<key>.<ext> and OUTPUT/metadata/*.parquet (their counts in
OUTPUT/metadata/_stats/*_stats.json, `outputs.stats`), plus
OUTPUT/images/metadata.parquet at the end (the metadata file of a Hugging Face image
folder: rows with an image, `file_name` relative to images/, without the resume keys)."""

from __future__ import annotations

import itertools
import posixpath
import time

from k3batch import resume, schema, storage
from k3batch.outputs import records, stats
from k3batch.outputs.base import OutputFormat

HF_METADATA = "metadata.parquet"
STATS_DIR = "_stats"  # metadata/_stats/: metadata/ stays Parquet files only (outputs.stats)


class Files(OutputFormat):
    name = "files"
    records_dir = "metadata"

    def encode_stage(self, cfg, output):
        from k3batch.stages.write import WriteImagesStage

        return WriteImagesStage, {
            "image_format": cfg.output.image_format,
            "quality": cfg.output.quality,
            "output_uri": output.uri,
            "storage_settings": output.settings,
            "keep_source": cfg.upscale.enabled and cfg.upscale.keep_source,
        }

    def write(self, ds, cfg, output, num_rows):
        fs, path = output.arrow_filesystem(self.records_dir)
        config_hash = resume.fingerprint(resume.job_identity(cfg))
        rows = cfg.output.rows_per_file
        if rows <= cfg.resources.batch_size:
            # The same CPU request as the encode/write stage lets Ray fuse the two into one
            # task per block (Ray fuses only operators whose remote args match).
            ds.write_datasink(
                metadata_sink(path, filesystem=fs, config_hash=config_hash),
                ray_remote_args={"num_cpus": cfg.resources.write_num_cpus},
            )
            return
        # Ray gathers a file's rows before the task that writes it: fused with the image
        # write, batches would wait there holding their decoded images. Half the request
        # (a metadata write is light) keeps the two apart, so only metadata rows wait.
        ds.write_datasink(
            metadata_sink(path, filesystem=fs, config_hash=config_hash, min_rows_per_file=rows),
            ray_remote_args={"num_cpus": cfg.resources.write_num_cpus / 2},
        )

    def finalise(self, output, num_rows):
        """The image folder's metadata file, written record file by record file: a job of
        millions of rows never has its whole table in the driver's memory."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        files = output.record_files()
        table_schema = (
            records.records_schema(output, files)
            if files
            else pa.schema([(schema.ROW_HASH, pa.uint64()), (schema.STATUS, pa.string())])
        )
        ok = pc.field(schema.STATUS) == schema.STATUS_OK
        # `datasets` fails on uint64 values above 2**63 - 1 (OverflowError while building its
        # Arrow table); such a column (a seed given in the input) is written as int64 when all
        # its values fit, as text otherwise: a first pass over those columns alone decides.
        wide = [
            f.name
            for f in table_schema
            if f.name not in schema.RESUME_COLUMNS and pa.types.is_uint64(f.type)
        ]
        top = dict.fromkeys(wide, 0)
        for table in (
            records.iter_records(output, files, [*wide, schema.STATUS], table_schema)
            if wide
            else []
        ):
            table = table.filter(ok)
            for name in wide:
                top[name] = max(top[name], pc.max(table.column(name)).as_py() or 0)
        casts = {name: pa.int64() if top[name] < 2**63 else pa.string() for name in wide}
        columns = [f for f in table_schema if f.name not in schema.RESUME_COLUMNS]
        out_schema = pa.schema(
            [pa.field(schema.FILE_NAME, pa.string())]
            + [pa.field(f.name, casts.get(f.name, f.type)) for f in columns]
        )
        fs, root = output.filesystem("images")
        fs.makedirs(root, exist_ok=True)
        with (
            fs.open(f"{root}/{HF_METADATA}", "wb") as sink,
            pq.ParquetWriter(sink, out_schema) as w,
        ):
            for table in records.iter_records(
                output, files, [f.name for f in columns], table_schema
            ):
                table = table.filter(ok)
                if table.num_rows == 0:
                    continue
                names = [posixpath.basename(u) for u in table.column(schema.IMAGE_URI).to_pylist()]
                arrays = [pa.array(names, pa.string())] + [
                    table.column(f.name).cast(casts[f.name])
                    if f.name in casts
                    else table.column(f.name)
                    for f in columns
                ]
                w.write_table(pa.table(arrays, schema=out_schema))

    def output_lines(self, uri):
        return [
            f"images        {storage.join(uri, 'images')}/",
            f"metadata      {storage.join(uri, 'metadata')}/ (Parquet)",
        ]


def metadata_sink(
    path: str, *, filesystem, config_hash: str | None, min_rows_per_file: int | None = None
):
    """Ray's Parquet datasink, writing each metadata file's `_stats.json` after it (in the
    same write task, so Ray's checkpoint commits both or neither; see `outputs.stats`)."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

    class MetadataDatasink(ParquetDatasink):
        def write(self, blocks, ctx):
            import pyarrow.parquet as pq
            from pyarrow.fs import FileType

            start = time.time()
            super().write(blocks, ctx)
            # A task's rows go to `<name>-0.parquet`, and `-1`, ... when a file would pass
            # Arrow's row limit: stats for each, from its rows as written.
            name = self.filename_provider.get_filename_for_task(
                ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
            ).removesuffix(".parquet")
            for i in itertools.count():
                written = posixpath.join(self.path, f"{name}-{i}.parquet")
                if self.filesystem.get_file_info(written).type != FileType.File:
                    break
                with self.filesystem.open_input_file(written) as f:
                    parquet = pq.ParquetFile(f)
                    have = parquet.schema_arrow.names
                    table = parquet.read(columns=[c for c in stats.COLUMNS if c in have])
                stats.write_stats(
                    self.filesystem, written, stats.file_stats(table, config_hash, start), STATS_DIR
                )

    return MetadataDatasink(path, filesystem=filesystem, min_rows_per_file=min_rows_per_file)


FORMAT = Files()
