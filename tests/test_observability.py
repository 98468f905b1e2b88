"""What a user sees of a real run from the command line: metrics scraped over HTTP while the
job runs, progress lines in a log (stderr not a terminal), the summary, and the report.

One `k3batch run` of the demo config (demo prompts plus three bad rows) in a subprocess,
shared by the tests of this module.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from k3batch.report.contact_sheet import CAPTION_HEIGHT, PAD, beautify
from k3batch.report.page import DEFAULT_COLUMNS, DEFAULT_SAMPLES, DEFAULT_THUMB

from .chromium import open_page, require_chromium
from .report_html import figures

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BAD_ROWS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def k3batch_samples(body: str) -> dict[tuple, float]:
    """{(sample name, sorted labels minus Ray's per-process ones): value summed} for k3batch."""
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if "k3batch" not in s.name:
                continue
            labels = tuple(
                sorted((k, v) for k, v in s.labels.items() if k in ("app", "stage", "kind", "le"))
            )
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def scrape(port: int, proc, seen: list) -> None:
    """Poll the metrics endpoint while the job runs; keep what each scrape found."""
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            body = None  # Ray not up yet
        if body is not None and proc.poll() is None:
            seen.append(k3batch_samples(body))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observed")
    demo = pq.read_table(REPO / "data" / "demo_prompts.parquet")
    bad = pa.Table.from_pylist(
        [
            {"id": "bad-empty", "prompt": "", "source": "test"},
            {"id": "bad-width", "prompt": "a cat", "width": 100, "source": "test"},
            {"id": "bad-both", "prompt": None, "width": 63, "source": "test"},
        ],
        schema=demo.schema,
    )
    pq.write_table(pa.concat_tables([demo, bad]), tmp / "prompts.parquet")
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["input"]["uri"] = str(tmp / "prompts.parquet")
    config["output"]["uri"] = str(tmp / "out")
    config["model"]["path"] = str(tmp / "tiny")
    # Fewer steps than the demo's 10: nine batches still span several metric scrapes.
    config["generation"]["num_inference_steps"] = 4
    (tmp / "job.yaml").write_text(yaml.safe_dump(config))

    port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_metrics_report_interval_ms": "500",  # export every second (Ray's floor)
        "K3BATCH_PROGRESS_INTERVAL": "1",
    }
    env.pop("TQDM_DISABLE", None)  # the CLI must silence bars in a log by itself
    cmd = [sys.executable, "-m", "k3batch.cli", "run", str(tmp / "job.yaml")]
    cmd += ["--set", f"ray.metrics_export_port={port}"]
    seen: list = []
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        scraper = threading.Thread(target=scrape, args=(port, proc, seen), daemon=True)
        scraper.start()
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        scraper.join()
    return {
        "returncode": proc.returncode,
        "stdout": (tmp / "stdout").read_text(),
        "stderr": (tmp / "stderr").read_text(),
        "out": tmp / "out",
        "scrapes": seen,
        "port": port,
    }


def total(scrape: dict, name: str, **labels) -> float:
    return sum(
        v
        for (n, lbl), v in scrape.items()
        if n == name and all((k, val) in lbl for k, val in labels.items())
    )


def test_job_succeeds_with_bad_rows_accounted(run):
    assert run["returncode"] == 0, run["stderr"][-3000:]
    n = 36 + BAD_ROWS
    assert f"rows in/out   {n} / {n}" in run["stdout"]
    assert "ok / errors   36 / 3" in run["stdout"]


def test_metrics_endpoint_shows_counters_moving_during_the_job(run):
    rows = "ray_k3batch_rows_processed_total"
    generated = [total(s, rows, stage="generate", app="batch") for s in run["scrapes"]]
    moving = sorted({g for g in generated if g > 0})
    # Seen while the job still ran: at least two different non-zero counts, never going back.
    assert len(moving) >= 2, f"generate rows seen per scrape: {generated}"
    assert generated == sorted(generated)
    last = run["scrapes"][-1]
    assert total(last, rows, stage="validate") == 36 + BAD_ROWS
    assert total(last, "ray_k3batch_images_generated_total", stage="generate") > 0
    errors = "ray_k3batch_errors_total"
    assert total(last, errors, stage="validate", kind="prompt") == 2
    assert total(last, errors, stage="validate", kind="width") == 2
    assert total(last, "ray_k3batch_stage_seconds_count", stage="generate") >= 1
    assert total(last, "ray_k3batch_stage_seconds_bucket", stage="generate", le="+Inf") >= 1


def test_progress_lines_in_a_log_have_no_redraws(run):
    err = run["stderr"]
    assert "\r" not in err  # neither k3batch's progress nor tqdm bars redraw in a log
    lines = [line for line in err.splitlines() if line.startswith("k3batch progress: ")]
    assert len(lines) >= 3, err[-3000:]
    done = [int(re.search(r"progress: (\d+)/39 rows", line).group(1)) for line in lines]
    assert done == sorted(done) and done[-1] == 39 and len(set(done)) >= 2
    assert "39/39 rows (100%)" in lines[-1] and f"{BAD_ROWS} errors" in lines[-1]
    assert "k3batch: metrics at http://" in err and f":{run['port']}/metrics" in err


def test_summary_shows_cost_and_ends_pointing_at_the_report(run):
    out = run["stdout"].strip().splitlines()
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out if "  " in line)
    assert table["errors by"] == "prompt: 2, width: 2"
    assert table["this run"] == "39 rows; 0 finished earlier, skipped"
    assert table["GPU time"].startswith("0 GPU-s/image (no GPUs;")
    assert "generate" in table["stage time"] and "validate" in table["stage time"]
    index = run["out"] / "report" / "index.html"
    assert out[-1] == f"report        {index}"
    run_json = json.loads((run["out"] / "run.json").read_text())
    assert run_json["stages"]["generate"]["actors"] == 1
    assert run_json["actor_seconds"] > run_json["stages"]["generate"]["busy_seconds"] > 0
    assert run_json["gpu_seconds"] == 0


def test_report_shows_demo_images_with_captions(run):
    out = run["out"]
    with Image.open(out / "report" / "contact_sheet.png") as sheet:
        rows = -(-DEFAULT_SAMPLES // DEFAULT_COLUMNS)
        assert sheet.size == (
            DEFAULT_COLUMNS * (DEFAULT_THUMB + 2 * PAD),
            rows * (DEFAULT_THUMB + CAPTION_HEIGHT + 2 * PAD),
        )
    meta = {
        r["id"]: r
        for r in pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()
    }
    figs = figures((out / "report" / "index.html").read_text())
    assert len(figs) == DEFAULT_SAMPLES and len({f["id"] for f in figs}) == DEFAULT_SAMPLES
    for fig in figs:
        row = meta[fig["id"]]
        assert row["status"] == "ok" and row["id"].startswith("demo-")
        assert fig["href"] == "../images/" + row["image_uri"].rsplit("/", 1)[-1]
        assert (out / "report" / fig["href"]).is_file()
        assert fig["caption"].strip() == beautify(row["prompt"])


def test_report_opens_in_chromium_without_console_errors(run):
    require_chromium()
    result = open_page((run["out"] / "report" / "index.html").as_uri())
    assert result.errors == [] and result.broken_images == []
    assert result.images == DEFAULT_SAMPLES + 1
