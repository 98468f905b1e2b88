"""Output formats and the job's output: where each format keeps its per-row records, how its
images are encoded and written, and its finishing step.

files:       OUTPUT/images/<key>.<ext>, OUTPUT/metadata/*.parquet (one row per input row),
             OUTPUT/images/metadata.parquet (rows with an image, `file_name` relative to
             images/, without the resume key `row_hash`: the metadata file of a Hugging
             Face image folder)                                        (outputs/files.py)
webdataset:  OUTPUT/shards/NNNNN.tar + NNNNN.parquet              (outputs/webdataset.py)
both:        OUTPUT/run.json, OUTPUT/_k3batch/ (job fingerprint, Ray's checkpoint)

A format is one module here defining `FORMAT` (an `outputs.base.OutputFormat`), named in
`FORMATS`. The job builds one `Output` at pre-flight and passes it on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k3batch import storage
from k3batch.resume import STATE_DIR

if TYPE_CHECKING:
    from k3batch.config import JobConfig
    from k3batch.outputs.base import OutputFormat

FORMATS = ("files", "webdataset")  # each is k3batch/outputs/<name>.py
# Everything a run may leave in its output, removed by `output.overwrite`.
ENTRIES = ("metadata", "images", "shards", "run.json", STATE_DIR)


def output_format(name: str) -> OutputFormat:
    if name not in FORMATS:
        raise ValueError(f"output.format: no output format {name!r} (one of {FORMATS})")
    return importlib.import_module(f"k3batch.outputs.{name}").FORMAT


@dataclass(frozen=True)
class Output:
    """A job's output: its URI, how it is reached (storage settings) and its format."""

    uri: str
    settings: dict = field(default_factory=dict)  # StorageConfig dump: endpoint, retries, ...
    format_name: str = "files"

    @classmethod
    def from_config(cls, cfg: JobConfig, format_name: str | None = None) -> Output:
        return cls(cfg.output.uri, cfg.storage.model_dump(), format_name or cfg.output.format)

    @property
    def format(self) -> OutputFormat:
        return output_format(self.format_name)

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def filesystem(self, *parts: str):
        """(fsspec filesystem, root path) of the output or a folder in it."""
        return storage.filesystem(self.join(*parts), self.settings)

    def arrow_filesystem(self, *parts: str):
        """(pyarrow filesystem, path) of a folder in the output, for Ray Data's writers."""
        return storage.arrow_filesystem(self.join(*parts), self.settings)

    def record_files(self) -> list[str]:
        """The Parquet files holding one row per finished input row (every format)."""
        fs, root = self.filesystem(self.format.records_dir)
        return [f for f in storage.list_files(fs, root, ".parquet") if self.format.is_record(f)]

    def clear(self) -> None:
        """Remove what an earlier run left (`output.overwrite`)."""
        fs, root = self.filesystem()
        for entry in ENTRIES:
            if fs.exists(f"{root}/{entry}"):
                fs.rm(f"{root}/{entry}", recursive=True)
