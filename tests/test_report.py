"""`k3batch report` on outputs laid out as a run leaves them, local and on a non-local fsspec
filesystem, and the page opened in headless Chromium."""

import base64
import io
import json
import re
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from k3batch.report.contact_sheet import CAPTION_HEIGHT, PAD, beautify
from k3batch.report.page import write_report

from .chromium import open_page, require_chromium
from .report_html import figures

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("image_uri", pa.string()),
        ("seed", pa.uint64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("generate_seconds", pa.float64()),
    ]
)
NASTY = '<script>alert("x")</script> & "quotes"'


def make_output(fs, root: str, n_ok: int = 10, run: dict | None = None) -> list[dict]:
    """An output as a run writes it: images/, metadata/*.parquet, run.json."""
    rows = []
    for sub in ("images", "metadata"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    for i in range(n_ok):
        name = f"row-{i:02d}.png"
        buf = io.BytesIO()
        # Distinct colours, one portrait image: the sheet must fit any aspect.
        size = (64, 128) if i == 3 else (128, 128)
        Image.new("RGB", size, (20 * i % 256, 100, 200)).save(buf, format="PNG")
        fs.pipe_file(f"{root}/images/{name}", buf.getvalue())
        prompt = NASTY if i == 0 else f"  a   photo   of thing {i}  "
        rows.append(
            {
                "id": f"row-{i:02d}",
                "prompt": prompt,
                "status": "ok",
                "error": None,
                "image_uri": f"{root}/images/{name}",
                "seed": i,
                "width": size[0],
                "height": size[1],
                "generate_seconds": 0.5 + i / 10,
            }
        )
    for i, error in enumerate(["prompt: empty", "width: must be ..., got 63; prompt: empty"]):
        rows.append(
            {
                "id": f"bad-{i}",
                "prompt": "" if i == 0 else "<b>bold</b>",
                "status": "error",
                "error": error,
                "image_uri": None,
                "seed": None,
                "width": None,
                "height": None,
                "generate_seconds": None,
            }
        )
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), buf)
        fs.pipe_file(f"{root}/metadata/part-{part}.parquet", buf.getvalue())
    if run is not None:
        fs.pipe_file(f"{root}/run.json", json.dumps(run).encode())
    return rows


RUN = {
    "rows_in": 12,
    "wall_seconds": 12.5,
    "images_per_second": 0.8,
    "skipped_by_resume": 7,
    "gpu_seconds_per_image": 1.25,
    "stages": {
        "generate": {
            "rows": 12,
            "batches": 3,
            "busy_seconds": 9.0,
            "actor_pool": True,
            "actors": 1,
            "actor_seconds": 15.0,
            "gpus_per_actor": 1.0,
        }
    },
    "config": {"output": {"uri": "</pre><i>config</i>"}},
}


def test_report_grid_links_captions_and_escaping(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    rows = make_output(fs, root, run=RUN)
    report = write_report(root, samples=7, columns=3, thumb=64)

    # 7 samples in 3 columns: a 3 x 3 grid of (thumb + padding) x (thumb + caption + padding).
    with Image.open(tmp_path / "out" / "report" / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * (64 + 2 * PAD), 3 * (64 + CAPTION_HEIGHT + 2 * PAD))
        assert report.contact_sheet_size == sheet.size
        cell_w, cell_h = 64 + 2 * PAD, 64 + CAPTION_HEIGHT + 2 * PAD
        for i in range(7):
            x, y = (i % 3) * cell_w, (i // 3) * cell_h
            picture = sheet.crop((x + PAD, y + PAD, x + PAD + 64, y + PAD + 64))
            caption = sheet.crop((x + PAD, y + PAD + 64, x + cell_w - PAD, y + cell_h)).convert("L")
            assert picture.getextrema() != ((255, 255), (255, 255), (255, 255)), f"cell {i} empty"
            assert caption.getextrema()[0] < 128, f"cell {i} has no caption text"
        # The 8th and 9th cells stay blank.
        assert sheet.crop((cell_w, 2 * cell_h, 3 * cell_w, 3 * cell_h)).getextrema() == (
            (255, 255),
            (255, 255),
            (255, 255),
        )

    page = (tmp_path / "out" / "report" / "index.html").read_text()
    figs = figures(page)
    by_id = {r["id"]: r for r in rows}
    assert [f["id"] for f in figs] == [s.id for s in report.samples] and len(figs) == 7
    assert "row-00" in [f["id"] for f in figs]  # the seeded sample includes the nasty prompt
    assert len({f["id"] for f in figs}) == 7
    for fig in figs:
        row = by_id[fig["id"]]
        assert row["status"] == "ok"
        name = row["image_uri"].rsplit("/", 1)[-1]
        assert fig["href"] == f"../images/{name}"
        assert (tmp_path / "out" / "report" / fig["href"]).exists()
        assert fig["src"].startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(fig["src"].split(",", 1)[1]))) as thumb:
            assert max(thumb.size) == 64
        assert fig["caption"].strip() == beautify(row["prompt"])

    # User text is escaped everywhere: prompts, errors, config values.
    assert "<script>" not in page and "<b>bold</b>" not in page and "<i>config</i>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&lt;/pre&gt;&lt;i&gt;config" in page
    assert "&lt;script&gt;alert(" in page  # row-00's caption, alt and title
    assert "&lt;/script&gt; &amp; " in page
    # Error breakdown by kind, skipped-by-resume and per-stage timing from run.json.
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "prompt 2" in text and "width 1" in text
    assert "skipped (done by an earlier run) 7" in text
    assert "generate 12 3 9.00 750.0 1 15.0 1.0" in text
    assert 'src="contact_sheet.png"' in page


def test_report_same_sample_each_time_and_on_a_non_local_filesystem():
    # fsspec's in-memory filesystem: the report must not assume local paths.
    fs = fsspec.filesystem("memory")
    make_output(fs, "/k3b-report-test/out")
    first = write_report("memory://k3b-report-test/out", samples=4, columns=4, thumb=32)
    again = write_report("memory://k3b-report-test/out", samples=4, columns=4, thumb=32)
    assert [s.id for s in first.samples] == [s.id for s in again.samples]
    assert first.index_uri == "memory://k3b-report-test/out/report/index.html"
    page = fs.cat_file("/k3b-report-test/out/report/index.html").decode()
    assert all(f'data-id="{s.id}"' in page for s in first.samples)
    with Image.open(io.BytesIO(fs.cat_file("/k3b-report-test/out/report/contact_sheet.png"))) as im:
        assert im.size == (4 * (32 + 2 * PAD), 32 + CAPTION_HEIGHT + 2 * PAD)
    fs.rm("/k3b-report-test", recursive=True)


def test_beautify_captions():
    assert beautify('  "a  red\n cat"  ') == "A red cat"
    assert beautify("кот в сапогах") == "Кот в сапогах"
    assert beautify("y" * 50, max_chars=10) == "Y" + "y" * 8 + "\u2026"
    assert beautify(None) == ""


def test_chromium_sees_a_broken_page(tmp_path):
    """The browser check itself: a missing image and a console error are caught."""
    require_chromium()
    (tmp_path / "index.html").write_text(
        '<!doctype html><title>b</title><link rel="icon" href="data:,">'
        '<img src="missing.png"><script>console.error("boom")</script>'
    )
    result = open_page((tmp_path / "index.html").as_uri())
    assert result.broken_images and any("boom" in e for e in result.errors)
    assert any("missing.png" in e for e in result.errors)


def test_report_page_opens_in_chromium_without_errors(tmp_path):
    require_chromium()
    make_output(fsspec.filesystem("file"), str(tmp_path / "out"), run=RUN)
    report = write_report(str(tmp_path / "out"), samples=5, columns=5, thumb=64)
    result = open_page((tmp_path / "out" / "report" / "index.html").as_uri())
    assert result.errors == [] and result.broken_images == []
    assert result.images == len(report.samples) + 1  # the samples and the contact sheet
    assert result.title.startswith("k3batch report")


def test_report_command(tmp_path):
    make_output(fsspec.filesystem("file"), str(tmp_path / "out"), run=RUN)
    cli = [sys.executable, "-m", "k3batch.cli", "report"]
    args = ["--samples", "3", "--columns", "3", "--thumb-size", "32"]
    proc = subprocess.run([*cli, str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = tmp_path / "out" / "report" / "index.html"
    assert proc.stdout.splitlines()[-1] == f"report        {index}"
    with Image.open(tmp_path / "out" / "report" / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * (32 + 2 * PAD), 32 + CAPTION_HEIGHT + 2 * PAD)
    missing = subprocess.run([*cli, str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no metadata Parquet files" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
