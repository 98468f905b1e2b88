"""Time to first image: from `k3batch run` starting to the first image file written, for
the demo config (tiny model already built, so this measures the path, not the build).

    .venv/bin/python benchmarks/time_to_first_image.py [--steps N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="generation steps; default the demo's (CI: 2)"
    )
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="k3batch-ttfi-")) / "out"
    images = out / "images"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "k3batch.cli",
        "run",
        "configs/demo.yaml",
        "--set",
        f"output.uri={out}",
    ]
    if args.steps:
        cmd += ["--set", f"generation.num_inference_steps={args.steps}"]
    subprocess.run(
        [sys.executable, "-m", "k3batch.cli", "make-tiny", ".cache/k3batch/tiny-kandinsky3"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = None
    while proc.poll() is None:
        if first is None and images.is_dir() and any(images.iterdir()):
            first = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    assert proc.returncode == 0
    import_s = float(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import time; t = time.perf_counter(); import k3batch.job.run, pipelines.text_to_image;"
                " print(time.perf_counter() - t)",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    print(
        f"\nTime to first image (demo config, {os.cpu_count()} CPUs): {first:.1f} s; whole run {total:.1f} s; "
        f"driver imports {import_s:.1f} s"
    )


if __name__ == "__main__":
    main()
