"""`k3batch report OUTPUT`: a static HTML page and a contact sheet PNG for a finished run.

Reads OUTPUT/run.json and OUTPUT/metadata/*.parquet through fsspec (local paths and s3://
alike) and writes OUTPUT/report/index.html and OUTPUT/report/contact_sheet.png. The counts
come from the metadata files' stats files (`outputs.stats`) when every file has one, else
from the files' rows. The page needs no server and no network: sample thumbnails are
embedded as data URIs, the full images are relative links (../images/NAME), and there are no
scripts or web fonts.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from k3batch import __version__, schema, storage
from k3batch.metrics import error_kinds
from k3batch.outputs import records, stats
from k3batch.outputs.files import STATS_DIR

DEFAULT_SAMPLES = 16
DEFAULT_COLUMNS = 4
DEFAULT_THUMB = 256
MAX_ERROR_EXAMPLES = 20

# Contact sheet layout: each cell is the thumbnail (fitted in a THUMB x THUMB box) above a
# caption of up to CAPTION_LINES lines, with PAD pixels around both.
PAD = 8
FONT_SIZE = 13
LINE_HEIGHT = 16
CAPTION_LINES = 3
CAPTION_HEIGHT = CAPTION_LINES * LINE_HEIGHT + PAD
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (30, 30, 30)

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


def beautify(prompt: str | None, max_chars: int | None = None) -> str:
    """A prompt as a caption: whitespace collapsed, wrapping quotes dropped, first letter upper."""
    text = " ".join((prompt or "").split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "\u2026"
    return text


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


def _metadata_files(fs, root: str) -> list[str]:
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


def _scan(fs, files: list[str]) -> Scan:
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


def _pick_by_stats(fs, files: list[str], scan: StatsScan, n: int, seed: int) -> list[dict]:
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


def _pick(fs, files: list[str], scan: Scan, n: int, seed: int) -> list[dict]:
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


def _font(size: int):
    from PIL import ImageFont

    # DejaVu covers Cyrillic and more when the system has it; Pillow's own font otherwise.
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with an ellipsis if cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while draw.textlength(current, font=font) > width:  # a word longer than a line
            cut = len(current)
            while cut > 1 and draw.textlength(current[:cut], font=font) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "\u2026", font=font) > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "\u2026"]
    return lines


def contact_sheet_size(n: int, columns: int, thumb: int) -> tuple[int, int]:
    """(width, height) in pixels of the sheet for `n` samples."""
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    return cols * (thumb + 2 * PAD), rows * (thumb + CAPTION_HEIGHT + 2 * PAD)


def _thumbnail(data: bytes, thumb: int):
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        # Fitted to the box both ways: small images (the demo's 128 px) are scaled up too.
        return ImageOps.contain(image.convert("RGB"), (thumb, thumb))


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_contact_sheet(samples: list[Sample], thumbs: list, columns: int, thumb: int):
    """The grid: each thumbnail centred in its cell, its caption below it."""
    from PIL import Image, ImageDraw

    size = contact_sheet_size(len(samples), columns, thumb)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(FONT_SIZE)
    cols = max(1, min(columns, len(samples)))
    for i, (sample, image) in enumerate(zip(samples, thumbs, strict=True)):
        x0 = (i % cols) * (thumb + 2 * PAD) + PAD
        y0 = (i // cols) * (thumb + CAPTION_HEIGHT + 2 * PAD) + PAD
        sheet.paste(image, (x0 + (thumb - image.width) // 2, y0 + (thumb - image.height) // 2))
        for j, line in enumerate(_wrap(draw, sample.caption, font, thumb, CAPTION_LINES)):
            draw.text(
                (x0, y0 + thumb + PAD // 2 + j * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=font
            )
    return sheet


def _render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
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
    files = sorted(_metadata_files(fs, root))
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
        picked = _pick_by_stats(fs, files, scan, samples, seed)
    else:
        # A file without stats (an older run's, or a killed write not yet cleaned up by a
        # resume): its rows are the only count, and then every file's rows are read.
        scan = _scan(fs, files)
        picked = _pick(fs, files, scan, samples, seed)
    thumbs = []
    for row in picked:
        name = row[schema.IMAGE_URI].rsplit("/", 1)[-1]
        # By name under this output, not the recorded URI: the output may have been moved.
        try:
            image = _thumbnail(fs.cat_file(f"{root}/images/{name}"), thumb)
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
            thumb_data_uri=_data_uri(image),
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
