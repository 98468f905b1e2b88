"""Output formats and the job's output: where each format keeps its per-row records, how its
images are encoded and written, and its finishing step.

files:       OUTPUT/images/<key>.<ext>, OUTPUT/metadata/*.parquet (one row per input row),
             OUTPUT/images/metadata.parquet (rows with an image, `file_name` relative to
             images/, without the resume key `row_hash`: the metadata file of a Hugging
             Face image folder)                                        (outputs/files.py)
webdataset:  OUTPUT/shards/NNNNN.tar + NNNNN.parquet              (outputs/webdataset.py)
both:        OUTPUT/run.json, OUTPUT/_k3batch/ (job fingerprint, Ray's checkpoint)

A format is one module here defining `FORMAT` (an `outputs.base.OutputFormat`), named in
`FORMATS`. The job builds one `Output` at pre-flight and passes it on. Both live in
`outputs.base` (each names the other); this package re-exports them.
"""

from k3batch.outputs.base import ENTRIES, FORMATS, Output, OutputFormat, output_format

__all__ = ["ENTRIES", "FORMATS", "Output", "OutputFormat", "output_format"]
