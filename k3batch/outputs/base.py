"""What every output format and the job share: the `OutputFormat` interface each format
implements, and the job's `Output` (URI, storage settings, format) that pre-flight builds
once. One module, as each names the other."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k3batch import storage
from k3batch.resume import STATE_DIR

if TYPE_CHECKING:
    from k3batch.config import JobConfig
    from k3batch.stages.base import Stage


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

    def record_sizes(self) -> dict[str, int]:
        """The record files (`record_files`, sorted) with their sizes in bytes: one listing,
        no file opened."""
        fs, root = self.filesystem(self.format.records_dir)
        if not fs.exists(root):
            return {}
        found = fs.find(root, detail=True)
        return {
            path: int(found[path]["size"])
            for path in sorted(found)
            if path.endswith(".parquet") and self.format.is_record(path)
        }

    def clear(self) -> None:
        """Remove what an earlier run left (`output.overwrite`)."""
        fs, root = self.filesystem()
        for entry in ENTRIES:
            if fs.exists(f"{root}/{entry}"):
                fs.rm(f"{root}/{entry}", recursive=True)


class OutputFormat:
    """How a format encodes and writes a job's rows, finds its records, and finishes."""

    name: str = ""
    records_dir: str = ""  # the output folder holding the record files

    def is_record(self, path: str) -> bool:
        """Whether a Parquet file under `records_dir` is a record file."""
        return True

    def encode_stage(self, cfg: JobConfig, output: Output) -> tuple[type[Stage], dict]:
        """The stage (class, constructor kwargs) that turns decoded images into what `write`
        takes."""
        raise NotImplementedError

    def write(self, ds, cfg: JobConfig, output: Output, num_rows: int) -> None:
        """Execute the dataset into the output (the plan's final write)."""
        raise NotImplementedError

    def finalise(self, output: Output, num_rows: int) -> None:
        """After every row is written."""

    def output_lines(self, uri: str) -> list[str]:
        """The run summary's lines saying where the output is."""
        raise NotImplementedError
