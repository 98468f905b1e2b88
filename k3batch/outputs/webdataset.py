"""`webdataset` output: OUTPUT/shards/NNNNN.tar with a Parquet index NNNNN.parquet and its
counts NNNNN_stats.json each (img2dataset's layout; the tar sink and numbering are in
`outputs.shards`, the stats in `outputs.stats`)."""

from __future__ import annotations

import posixpath

from k3batch import resume, storage
from k3batch.outputs import shards
from k3batch.outputs.base import OutputFormat


class WebDataset(OutputFormat):
    name = "webdataset"
    records_dir = "shards"

    def is_record(self, path):
        # Only the shards' indexes: a killed run's renumbering manifest is not one.
        return bool(shards.SHARD_NAME.match(posixpath.basename(path)))

    def encode_stage(self, cfg, output):
        from k3batch.stages.write import EncodeImagesStage

        return EncodeImagesStage, {
            "image_format": cfg.output.image_format,
            "quality": cfg.output.quality,
            "keep_source": cfg.upscale.enabled and cfg.upscale.keep_source,
        }

    def write(self, ds, cfg, output, num_rows):
        from k3batch.images import EXTENSIONS

        fsspec_fs, root = output.filesystem(self.records_dir)
        fs, path = output.arrow_filesystem(self.records_dir)
        ds.write_datasink(
            shards.shard_sink(
                path,
                filesystem=fs,
                first=shards.next_number(fsspec_fs, root),
                width=shards.digits(num_rows),
                image_ext=EXTENSIONS[cfg.output.image_format],
                shard_size=cfg.output.shard_size,
                config_hash=resume.fingerprint(resume.job_identity(cfg)),
            ),
            # The same CPU request as the encode stage lets Ray fuse the two into one task
            # per block (Ray fuses only operators whose remote args match).
            ray_remote_args={"num_cpus": cfg.resources.write_num_cpus},
        )

    def finalise(self, output, num_rows):
        """Shard numbers without gaps (a killed run leaves some)."""
        fs, root = output.filesystem(self.records_dir)
        shards.renumber(fs, root, shards.digits(num_rows))

    def output_lines(self, uri):
        return [f"shards        {storage.join(uri, 'shards')}/ (webdataset + Parquet index)"]


FORMAT = WebDataset()
