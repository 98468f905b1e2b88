"""The interface every output format implements."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.config import JobConfig
    from k3batch.outputs import Output
    from k3batch.stages.base import Stage


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
