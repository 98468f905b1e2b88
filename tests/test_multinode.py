"""Issue #28: k3batch on a multi-node Ray cluster, on one machine: a head node of 0 CPUs (the
driver's node, as on a cluster whose head runs no work) and worker nodes that come and go,
each a real raylet with its own workers (Ray's `cluster_utils.Cluster`).

The jobs run as `k3batch run` does, in a process of their own that joins the cluster with
`ray.address`; this process only starts, kills and adds nodes and reads the cluster's actor
table. So the session's local Ray (`ray_local`, which other tests' jobs run on in this
process) is never touched: this process never connects to the cluster as a driver, and the
two Rays share nothing but the machine.

A job is held mid-run with the test hooks `K3BATCH_TEST_HOLD_AFTER_BATCHES` and
`K3BATCH_TEST_RELEASE_FILE` (k3batch/testing/faults.py): each generation actor, after its
first batch, waits in the next until the release file exists. The tests wait on conditions
(a metadata file written, an actor alive on a node), never on sleeps."""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import job_config

pytestmark = pytest.mark.slow

GENERATION_ACTOR = "MapWorker(MapBatches(StageActor))"
WAIT_S = 180  # for a condition: far above what it takes on a busy 2-core machine


@pytest.fixture(scope="module")
def cluster(short_tmp):
    """A head node with 0 CPUs; each test adds the worker nodes it needs and loses them."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        # The cluster's temp files, and the address file Ray writes for `auto`, stay in a
        # folder of this session, not in /tmp/ray where other Rays on the machine look.
        env.setenv("RAY_TMPDIR", str(short_tmp("mn")))
        # A killed node is declared dead after ~3 s of missed health checks, not ~15 s.
        env.setenv("RAY_health_check_period_ms", "1000")
        env.setenv("RAY_health_check_failure_threshold", "3")
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
        )
        try:
            yield cluster
        finally:
            cluster.shutdown()


@pytest.fixture
def workers(cluster):
    """Adds worker nodes (`workers(cpus)`); those still alive are removed after the test."""
    added = []

    def add(num_cpus: float):
        node = cluster.add_node(num_cpus=num_cpus)
        cluster.wait_for_nodes()
        added.append(node)
        return node

    yield add
    for node in added:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)


def kill_node(cluster, node) -> None:
    """SIGKILL a worker node whole: its raylet, its agents and every worker process."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for child in psutil.Process(raylet).children(recursive=True):
        child.kill()
    cluster.remove_node(node, allow_graceful=False)


def alive_actors(cluster, class_name: str) -> list[str]:
    """Node ids of the live actors of a class, one per actor."""
    return [
        a["Address"]["NodeID"]
        for a in cluster.global_state.actor_table(None).values()
        if a.get("ActorClassName") == class_name and a.get("State") == "ALIVE"
    ]


class Job:
    """`k3batch run` in a process of its own, joined to the cluster."""

    def __init__(self, tmp_path, cluster, data: dict, env: dict | None = None, name="job"):
        data = {**data, "ray": {"address": cluster.address}}
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.log = tmp_path / f"{name}.log"
        self.out = tmp_path / "out"
        self.proc = None
        self.env = {**os.environ, **(env or {})}

    def start(self) -> "Job":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "k3batch.cli", "run", str(self.config), "--no-report"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended ({self.proc.returncode}) before {what}:\n{self.text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} within {WAIT_S} s:\n{self.text()}")
            time.sleep(0.2)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the job did not finish within {WAIT_S} s:\n{self.text()}")

    def run(self) -> int:
        return self.start().finish()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metadata_files(self) -> int:
        folder = self.out / "metadata"
        return len(list(folder.glob("*.parquet"))) if folder.exists() else 0

    def records(self) -> list[dict]:
        return pads.dataset(str(self.out / "metadata"), format="parquet").to_table().to_pylist()

    def run_json(self) -> dict:
        return json.loads((self.out / "run.json").read_text())


def prompts(folder, n: int, start: int = 0, name: str = "part-0.parquet") -> str:
    folder.mkdir(exist_ok=True)
    ids = [f"r{i:02d}" for i in range(start, start + n)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"p {i}" for i in ids]}), folder / name)
    return str(folder)


def config(tmp_path, input_uri: str, tiny_dir: str, **resources) -> dict:
    return job_config(
        tmp_path,
        input_uri,
        tiny_dir,
        generation={"num_inference_steps": 2},
        resources={"batch_size": 2, **resources},
        output={"rows_per_file": 2},  # each batch committed as it is written
        # Far above any wait in these tests: a job that waited for CPUs would time out here.
        faults={"stall_timeout_s": 600},
    )


def hold(tmp_path) -> tuple[dict, object]:
    release = tmp_path / "release"
    env = {"K3BATCH_TEST_HOLD_AFTER_BATCHES": "1", "K3BATCH_TEST_RELEASE_FILE": str(release)}
    return env, release


def test_the_job_actor_runs_on_the_drivers_node_and_restarts_there(cluster, workers):
    """Left to Ray, a 0-CPU actor lands on a worker node (the head has no CPUs): the job's
    actor is placed on the driver's node, and its restart stays there."""
    workers(2)
    workers(2)
    script = """
import json, sys, time
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
from k3batch.progress import Tracker
with Tracker(total=1) as tracker:
    def node():
        return state.actors(tracker.tally._actor_id.hex())["Address"]["NodeID"]
    incarnation = tracker.read()["incarnation"]  # once it answers, it has a node
    first = node()
    ray.kill(tracker.tally, no_restart=False)
    deadline = time.monotonic() + 120
    while tracker.read()["incarnation"] == incarnation:
        assert time.monotonic() < deadline, "no restart"
    after = node()
print(json.dumps({"driver": ray.get_runtime_context().get_node_id(), "first": first,
                  "after": after, "restarts": tracker.restarts}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, cluster.address],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    head = cluster.head_node.node_id
    assert seen == {"driver": head, "first": head, "after": head, "restarts": 1}


def test_a_worker_node_lost_mid_job_costs_no_row_and_no_bookkeeping(
    cluster, workers, tmp_path, tiny_dir
):
    """Two worker nodes; once the first metadata file is written (each generation actor
    then holds its second batch), the node of a generation actor is SIGKILLed whole. The
    job finishes on the other node: every row exactly once, the job actor on the driver's
    node all along (progress counted to the end, no loss reported). A rerun on the shrunk
    cluster (too small for the job's pools) has nothing left: it exits 0 at once. Rows
    added to the input then, and a replacement node joined, a rerun makes only those."""
    workers(2)
    workers(2)
    env, release = hold(tmp_path)
    data = config(tmp_path, prompts(tmp_path / "in", 12), tiny_dir, num_actors=2)
    job = Job(tmp_path, cluster, data, env).start()
    job.wait_for(lambda: job.metadata_files() >= 1, "first metadata file")
    job.wait_for(lambda: alive_actors(cluster, "JobActor"), "job actor")
    assert alive_actors(cluster, "JobActor") == [cluster.head_node.node_id]
    victim_id = alive_actors(cluster, GENERATION_ACTOR)[0]
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    kill_node(cluster, victim)
    release.write_text("")
    assert job.finish() == 0, job.text()
    ids = [r["id"] for r in job.records()]
    assert sorted(ids) == [f"r{i:02d}" for i in range(12)]  # each exactly once
    run = job.run_json()
    assert run["accounting"]["ok"] and run["ok"] == 12
    # The tally saw every row to the last stage: it outlived the node.
    assert run["stages"]["write_images"]["rows"] >= 12
    text = job.text()
    assert "unreachable" not in text and "is lost" not in text, text

    # The cluster is now one node of 2 CPUs: a resumed job's pools need 3. Nothing is left
    # to do, so the rerun asks for none and ends at once (a wait would hit the 600 s stall).
    noop = Job(tmp_path, cluster, data, env, name="noop")
    assert noop.run() == 0, noop.text()
    assert "will wait until the cluster grows" not in noop.text(), noop.text()
    run = noop.run_json()
    assert (run["rows_this_run"], run["skipped_by_resume"], run["rows_out"]) == (0, 12, 12)
    assert run["accounting"]["ok"]

    # A replacement node joins and the input grows: the rerun resumes, making only the new.
    workers(2)
    prompts(tmp_path / "in", 4, start=12, name="part-1.parquet")
    resumed = Job(tmp_path, cluster, data, env, name="resume")
    assert resumed.run() == 0, resumed.text()
    run = resumed.run_json()
    assert (run["rows_this_run"], run["skipped_by_resume"]) == (4, 12), run["accounting"]
    assert sorted(r["id"] for r in resumed.records()) == [f"r{i:02d}" for i in range(16)]


def test_a_node_added_mid_job_picks_up_work(cluster, workers, tmp_path, tiny_dir):
    """The job asks two generation actors of 2 CPUs; the cluster has one node of 3 CPUs, so
    one actor starts and the job says the cluster is short. A node of 2 CPUs joins mid-job
    (the first actor holding its second batch): the second actor starts there and makes
    images, and the job ends with every row once."""
    first = workers(3)
    env, release = hold(tmp_path)
    data = config(
        tmp_path, prompts(tmp_path / "in", 10), tiny_dir, num_actors=2, num_cpus_per_actor=2
    )
    job = Job(tmp_path, cluster, data, env).start()
    job.wait_for(lambda: job.metadata_files() >= 1, "first metadata file")
    assert "the Ray cluster has 3 CPUs and this job needs 5" in job.text()
    assert alive_actors(cluster, GENERATION_ACTOR) == [first.node_id]
    second = workers(2)
    # The first actor holds its second batch: a second file is the new node's actor's work.
    job.wait_for(lambda: job.metadata_files() >= 2, "a batch from the added node")
    assert sorted(alive_actors(cluster, GENERATION_ACTOR)) == sorted(
        [first.node_id, second.node_id]
    )
    release.write_text("")
    assert job.finish() == 0, job.text()
    assert sorted(r["id"] for r in job.records()) == [f"r{i:02d}" for i in range(10)]
    run = job.run_json()
    assert run["accounting"]["ok"] and run["stages"]["generate"]["actors"] == 2
    assert {d["node_id"] for d in run["devices"]} == {first.node_id, second.node_id}
