"""`k3batch report OUTPUT` (`write_report`): a static HTML page and a contact sheet PNG for a
finished run.

Reads OUTPUT/run.json and OUTPUT/metadata/*.parquet through fsspec (local paths and s3://
alike) and writes OUTPUT/report/index.html and OUTPUT/report/contact_sheet.png. The counts
come from the metadata files' stats files (`outputs.stats`) when every file has one, else
from the files' rows. The page needs no server and no network: sample thumbnails are
embedded as data URIs, the full images are relative links (../images/NAME), and there are no
scripts or web fonts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from k3batch import __version__, schema, storage
from k3batch.outputs import stats
from k3batch.outputs.files import STATS_DIR
from k3batch.report.contact_sheet import beautify, data_uri, draw_contact_sheet, thumbnail
from k3batch.report.scan import StatsScan, metadata_files, pick_by_stats, pick_rows, scan_rows

DEFAULT_SAMPLES = 16
DEFAULT_COLUMNS = 4
DEFAULT_THUMB = 256


@dataclass
class Sample:
    id: str
    prompt: str
    caption: str
    image_name: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    generate_seconds: float | None = None
    thumb_data_uri: str = ""

    @property
    def href(self) -> str:
        return "../images/" + quote(self.image_name)


@dataclass
class Report:
    index_uri: str
    contact_sheet_uri: str
    samples: list[Sample] = field(default_factory=list)
    contact_sheet_size: tuple[int, int] = (0, 0)
    missing_images: list[str] = field(default_factory=list)
    # Where the counts came from: "stats" (every metadata file's _stats.json) or "rows".
    counted_from: str = "rows"
    files_without_stats: int = 0


def _render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent.parent / "templates"),
        autoescape=True,  # prompts, errors and config values are user text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html").render(**context)


def write_report(
    output_uri: str,
    samples: int = DEFAULT_SAMPLES,
    columns: int = DEFAULT_COLUMNS,
    thumb: int = DEFAULT_THUMB,
    seed: int = 0,
    storage_settings: dict | None = None,
) -> Report:
    """Write OUTPUT/report/index.html and contact_sheet.png; returns where and what it sampled.

    `storage_settings` is the job's `storage` section (endpoint, region, profile); without it
    the output is reached with fsspec's defaults and the environment (e.g. AWS_ENDPOINT_URL).
    """
    fs, root = storage.filesystem(output_uri, storage_settings)
    root = root.rstrip("/")
    run = json.loads(fs.cat_file(f"{root}/run.json")) if fs.exists(f"{root}/run.json") else {}
    files = sorted(metadata_files(fs, root))
    found = stats.read_stats(fs, files, STATS_DIR)
    report_dir = storage.join(output_uri, "report")
    report = Report(
        index_uri=storage.join(report_dir, "index.html"),
        contact_sheet_uri=storage.join(report_dir, "contact_sheet.png"),
        files_without_stats=len(files) - len(found),
    )
    if len(found) == len(files):
        report.counted_from = "stats"
        scan = StatsScan.read(fs, files, found)
        picked = pick_by_stats(fs, files, scan, samples, seed)
    else:
        # A file without stats (an older run's, or a killed write not yet cleaned up by a
        # resume): its rows are the only count, and then every file's rows are read.
        scan = scan_rows(fs, files)
        picked = pick_rows(fs, files, scan, samples, seed)
    thumbs = []
    for row in picked:
        name = row[schema.IMAGE_URI].rsplit("/", 1)[-1]
        # By name under this output, not the recorded URI: the output may have been moved.
        try:
            image = thumbnail(fs.cat_file(f"{root}/images/{name}"), thumb)
        except (OSError, ValueError):
            report.missing_images.append(name)
            continue
        sample = Sample(
            id=row[schema.ID],
            prompt=row.get(schema.PROMPT) or "",
            caption=beautify(row.get(schema.PROMPT)),
            image_name=name,
            **{k: row.get(k) for k in ("seed", "width", "height", "num_inference_steps")},
            guidance_scale=row.get(schema.GUIDANCE_SCALE),
            generate_seconds=row.get(schema.GENERATE_SECONDS),
            thumb_data_uri=data_uri(image),
        )
        report.samples.append(sample)
        thumbs.append(image)

    fs.makedirs(f"{root}/report", exist_ok=True)
    if report.samples:
        sheet = draw_contact_sheet(report.samples, thumbs, columns, thumb)
        report.contact_sheet_size = sheet.size
        buf = io.BytesIO()
        sheet.save(buf, format="PNG", optimize=True)
        fs.pipe_file(f"{root}/report/contact_sheet.png", buf.getvalue())
    elif fs.exists(f"{root}/report/contact_sheet.png"):
        fs.rm(f"{root}/report/contact_sheet.png")

    html = _render(
        {
            "output": output_uri,
            "run": run,
            "rows": scan.rows,
            "ok": scan.statuses.get(schema.STATUS_OK, 0),
            "errors": scan.statuses.get(schema.STATUS_ERROR, 0),
            "skipped": run.get("skipped_by_resume", 0),
            "samples": report.samples,
            "has_sheet": bool(report.samples),
            "missing_images": report.missing_images,
            "error_kinds": scan.error_kinds.most_common(),
            "error_examples": scan.error_examples,
            "stages": run.get("stages", {}),
            "generate_timing": scan.generate_timing(),
            "config_json": json.dumps(run.get("config", {}), indent=2),
            "versions": run.get("versions", {}),
            "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "version": __version__,
            "counted_from": report.counted_from,
            "metadata_files": len(files),
            "files_without_stats": report.files_without_stats,
        }
    )
    fs.pipe_file(f"{root}/report/index.html", html.encode("utf-8"))
    return report
