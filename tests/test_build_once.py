"""Cached artifacts appear whole: concurrent builders of one path, in real processes, make it
once, and every one of them loads the finished artifact (k3batch.testing.build_once)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def race(tmp_path: Path, body: str, n: int = 2, timeout: float = 300) -> list[dict]:
    """Run `body` in `n` processes that start it together (they wait for a go file); each
    prints one JSON line, returned in order."""
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import json, os, sys, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    time.sleep(1.0)  # both are past their imports and polling
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_on_one_path_build_it_once_and_both_load_it(tmp_path):
    log = tmp_path / "builds.log"
    target = tmp_path / "cache" / "artifact"
    results = race(
        tmp_path,
        f"""
        from k3batch.testing.build_once import build_dir

        def write(tmp):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            for i in range(20):  # slow enough that the other process arrives mid-build
                with open(os.path.join(tmp, f"part{{i}}"), "w") as f:
                    f.write("x" * 1000)
                time.sleep(0.05)
            open(os.path.join(tmp, "done"), "w").close()

        path = build_dir({str(target)!r}, write, lambda p: os.path.exists(os.path.join(p, "done")))
        parts = sorted(os.listdir(path))
        sizes = {{p: os.path.getsize(os.path.join(path, p)) for p in parts}}
        print(json.dumps({{"pid": os.getpid(), "parts": len(parts), "sizes": sorted(set(sizes.values()))}}))
        """,
    )
    builders = log.read_text().split()
    assert len(builders) == 1, builders  # exactly one built
    assert builders[0] in {str(r["pid"]) for r in results}
    for r in results:  # and each saw the whole artifact
        assert r["parts"] == 21 and r["sizes"] == [0, 1000], r
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "artifact"]
    assert leftovers == ["artifact.lock"], leftovers  # no temporary folder left behind


@pytest.mark.slow
def test_two_processes_building_the_tiny_k22_set_both_read_every_file(tmp_path):
    """The reported failure: two Serve replicas of configs/serve-kandinsky22.yaml built
    .cache/k3batch/tiny-kandinsky22 at once, and one read a half-written (or just replaced)
    prior/text_encoder/model.safetensors."""
    target = tmp_path / "cache" / "tiny-kandinsky22"
    results = race(
        tmp_path,
        f"""
        from safetensors import safe_open
        from k3batch.testing.tiny_k22 import make_tiny_k22

        path = make_tiny_k22({str(target)!r})
        inode = os.stat(path).st_ino
        tensors = 0
        for root, _, files in os.walk(path):
            for name in files:
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(root, name), "pt") as f:
                        tensors += sum(1 for k in f.keys() if f.get_tensor(k) is not None)
        print(json.dumps({{"inode": inode, "same": os.stat(path).st_ino == inode, "tensors": tensors}}))
        """,
    )
    first, second = results
    assert first["tensors"] > 0 and first["tensors"] == second["tensors"]
    # One build: both loaded the same folder, never replaced under them.
    assert first["inode"] == second["inode"] and first["same"] and second["same"]
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "tiny-kandinsky22",
        "tiny-kandinsky22.lock",
    ]
