"""GPUs: what a job's pools ask for against what Ray has, and what each actor really got.

- `gpus_needed` / `check_local_gpus` / `check_cluster_gpus`: before any work, the GPUs the
  job's actor pools (as its kind, `job.kinds.JobKind`, declares them) take at their starting
  sizes against the machine's or the cluster's. Ray Data waits without a word for GPUs that
  never come.
- `ZERO_GPU_ENV`: the environment of stage actors that ask for no GPU (see its note).
- `check_cuda` / `device_record` / `report_devices`: an actor Ray gave a GPU must see CUDA,
  and every model actor says which device and dtype each component runs on (run.json).

Light at import: torch and ray are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from typing import TYPE_CHECKING

from k3batch.config import ConfigError, JobConfig
from k3batch.job.pools import Pool

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind

log = logging.getLogger(__name__)

# Ray 2.60 leaves the node's CUDA_VISIBLE_DEVICES on a worker that asks for 0 GPUs
# (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO defaults to 0), so a model actor with `device: auto`
# would find every GPU and load onto cuda:0, which Ray has given to another actor. Each
# zero-GPU model actor gets this in its own runtime_env instead of setting Ray's switch: a
# per-actor env var works on any cluster we join (the switch would have to be set on every
# node's `ray start`, or in a job-level runtime_env that replaces the one `ray job submit`
# brought), and it touches only k3batch's actors.
ZERO_GPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def gpu_pools(cfg: JobConfig, kind: JobKind) -> list[Pool]:
    """The job's actor pools that ask for GPUs."""
    return [p for p in kind.pools(cfg) if p.gpus_each > 0]


def gpus_needed(cfg: JobConfig, kind: JobKind) -> float:
    """GPUs the job's pools hold at their starting sizes; fractions count as fractions (Ray
    packs fractional actors onto one GPU)."""
    return sum(p.total for p in gpu_pools(cfg, kind))


def _needs(pools: list[Pool]) -> str:
    return " + ".join(p.describe() for p in pools)


def check_fractions(pools: list[Pool]) -> None:
    for p in pools:
        if p.gpus_each > 1 and p.gpus_each != int(p.gpus_each):
            # Ray refuses such a request when the actor is created, deep in the run.
            raise ConfigError(
                f"{p.name}: {p.gpus_each:g} GPUs per actor; Ray takes a fraction of a GPU only "
                "below 1: ask for a whole number of GPUs"
            )


def detected_gpus() -> int | None:
    """GPUs a new local Ray would detect here (as Ray counts them: capped by
    CUDA_VISIBLE_DEVICES); None when Ray cannot tell."""
    try:
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return min(count, len(visible)) if visible is not None else count
    except Exception as e:  # noqa: BLE001 - a private Ray API: without it, no check
        log.debug("could not count this machine's GPUs: %s", e)
        return None


def check_local_gpus(cfg: JobConfig, kind: JobKind, local: bool) -> None:
    """A local Ray that k3batch starts has the machine's GPUs (or ray.num_gpus): a job whose
    pools need more can never start. `local`: k3batch will start that Ray
    (`ray_start.budget.starts_local_ray`)."""
    pools = gpu_pools(cfg, kind)
    check_fractions(pools)
    if not local or not pools:
        return  # a cluster, or a Ray already up, is checked once joined (check_cluster_gpus)
    have = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else detected_gpus()
    if have is None:
        return
    need = gpus_needed(cfg, kind)
    widest = max(pools, key=lambda p: p.per_node)
    source = "ray.num_gpus" if cfg.ray.num_gpus is not None else "this machine"
    if need > have + 1e-9 or widest.per_node > have:
        raise ConfigError(
            f"GPUs: the job's pools need {need:g} GPUs ({_needs(pools)}) but the local Ray "
            f"has {have} ({source}); lower the pools' GPU requests or sizes, or join a "
            "cluster with ray.address"
        )


def memory_warnings(cfg: JobConfig, kind: JobKind, gpu_gib: float, gpu_name: str) -> list[str]:
    """One line per GPU actor of the job whose estimated memory (`model.estimates`) is above
    `gpu_gib`: the estimate is calibrated, not exact, so it warns rather than refuses."""
    from k3batch.model import estimates

    lines = []
    for actor in estimates.job_estimates(cfg, kind):
        problem = actor.problem(gpu_gib, gpu_name)
        if problem:
            lines.append(
                f"k3batch: {problem}: it may run out of GPU memory (batches then run in halves); "
                "lower resources.batch_size or limits.max_side, or see docs/gpus.md (offload)"
            )
    return lines


def warn_local_gpu_memory(cfg: JobConfig, kind: JobKind) -> None:
    """On a machine with GPUs, compare each GPU actor's estimate with GPU 0's memory."""
    if not gpu_pools(cfg, kind) or not detected_gpus():
        return
    try:
        import torch

        props = torch.cuda.get_device_properties(0)
    except Exception as e:  # noqa: BLE001 - no CUDA here: check_cuda says so in the actor
        log.debug("could not read the GPU's memory: %s", e)
        return
    for line in memory_warnings(cfg, kind, props.total_memory / 2**30, props.name):
        log.warning(line)


def cluster_gpus() -> tuple[float, float]:
    """(GPUs in the cluster now, the most GPUs one alive node has)."""
    import ray

    total = ray.cluster_resources().get("GPU", 0)
    largest = max(
        (n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )
    return total, largest


def autoscaler_limits() -> tuple[float, float] | None:
    """(most GPUs the cluster may grow to, most GPUs one node type has): see
    `autoscaler_limits_of`."""
    return autoscaler_limits_of("GPU")


def autoscaler_limits_of(resource: str) -> tuple[float, float] | None:
    """(most of `resource` the cluster may grow to, most one node type has) from the
    autoscaler's node groups, or None when Ray does not publish them.

    Ray 2.60 publishes the node groups (with their max counts) in the GCS only under the
    autoscaler v2 (KubeRay, `ray up` with it on); one GCS key read, through a private API
    (`ray._private.state`). Neither `ray.autoscaler.sdk` nor a static cluster says how far it
    may grow: then a short cluster gets a warning only, since it may yet grow.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is None or not config.node_group_configs:
            return None
        groups = [g for g in config.node_group_configs if g.max_count != 0]
        largest = max((g.resources.get(resource, 0) for g in groups), default=0)
        if any(g.max_count < 0 and g.resources.get(resource, 0) > 0 for g in groups):
            total = math.inf
        else:
            total = sum(g.max_count * g.resources.get(resource, 0) for g in groups)
        cap = config.max_resources.get(resource, math.inf) if config.max_resources else math.inf
        return min(total, cap), largest
    except Exception as e:  # noqa: BLE001 - a private Ray API: without it, only warn
        log.debug("could not read the autoscaler's node groups: %s", e)
        return None


def check_cluster_gpus(cfg: JobConfig, kind: JobKind) -> None:
    """On a Ray k3batch did not start: fail when the autoscaler's limits say the pools can
    never be placed; warn when the cluster is short now (it may grow)."""
    pools = gpu_pools(cfg, kind)
    if not pools:
        return
    need = gpus_needed(cfg, kind)
    widest = max(pools, key=lambda p: p.per_node)
    have, largest = cluster_gpus()
    limits = autoscaler_limits()
    if limits is not None:
        most, most_per_node = max(limits[0], have), max(limits[1], largest)
        if need > most + 1e-9 or widest.per_node > most_per_node:
            raise ConfigError(
                f"GPUs: the job's pools need {need:g} GPUs ({_needs(pools)}; one actor of "
                f"{widest.name} needs {widest.per_node:g} on one node) but the cluster can grow "
                f"to {most:g} GPUs, at most {most_per_node:g} on a node; lower the pools' GPU "
                "requests or sizes"
            )
    if need > have + 1e-9 or widest.per_node > largest:
        log.warning(
            "k3batch: the Ray cluster has %g GPUs (at most %g on a node) and this job's pools "
            "need %g (%s): it will wait for the autoscaler to add GPU nodes",
            have,
            largest,
            need,
            _needs(pools),
        )


class GpuUnusable(RuntimeError):
    """Ray gave an actor a GPU that torch cannot use: the job stops with this one line."""


_UNUSABLE = re.compile(r"GpuUnusable: ([^\n]+)")


def unusable_gpu(causes) -> str | None:
    """The GpuUnusable line among a failed job's exceptions, if any. An actor that fails in
    its constructor reaches the driver as Ray's ActorDiedError, which keeps only the text of
    the constructor's traceback, not the exception: found there by its name."""
    for c in causes:
        if isinstance(c, GpuUnusable):
            return str(c).splitlines()[0]
        found = _UNUSABLE.search(str(c))
        if found:
            return found.group(1).strip()
    return None


# The config section of each stage's actor pool (the generation pool's is `resources`).
_POOL_FIELDS = {"text encoder": "resources.text_encoder_pool", "scores": "scores"}


def check_cuda(stage: str, device) -> None:
    """Fail when Ray gave this actor a GPU but torch sees no CUDA (a CPU build of torch, or
    no driver), instead of silently running on CPU while the GPU is held. `device`: the
    model's `device` setting; components all set to `cpu` ask for the CPU explicitly."""
    devices = device.values() if isinstance(device, dict) else [device]
    if all(str(d).startswith("cpu") for d in devices):
        return
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside Ray: nothing was given
        gpu_ids = []
    if not gpu_ids:
        return
    import torch

    if not torch.cuda.is_available():
        raise GpuUnusable(
            f"{stage} actor was given GPU {list(gpu_ids)} by Ray but torch {torch.__version__} "
            "sees no CUDA device: install a CUDA build of torch or set "
            f"{_POOL_FIELDS.get(stage, 'resources')}.num_gpus_per_actor: 0"
        )


def describe_module(module) -> str:
    """`cpu/float32`, `cuda:0/bfloat16`: where the module's parameters are."""
    kinds = sorted(
        {f"{p.device}/{str(p.dtype).removeprefix('torch.')}" for p in module.parameters()}
    )
    return ",".join(kinds) or "no parameters"


def device_record(stage: str, components: dict) -> dict:
    """Which device and dtype each loaded component runs on, and where the actor is."""
    import torch

    record = {
        "stage": stage,
        "components": {n: describe_module(m) for n, m in components.items() if m is not None},
        "torch": torch.__version__,
        "cuda_device": None,
        "pid": os.getpid(),
        "actor_id": None,
        "node_id": None,
        "gpu_ids": [],
    }
    if torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            record["actor_id"] = context.get_actor_id()
            record["node_id"] = context.get_node_id()
            record["gpu_ids"] = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - the record does without where it ran
        pass
    return record


def report_devices(journal, record: dict) -> None:
    """Log the record once and send it to the job's actor (run.json's `devices`)."""
    parts = ", ".join(f"{n} {d}" for n, d in record["components"].items())
    cuda = f", {record['cuda_device']}" if record["cuda_device"] else ""
    # Printed, not logged at INFO: Ray forwards a worker's stderr to the driver, while its
    # INFO records go nowhere unless the worker configures logging.
    print(
        f"k3batch: {record['stage']} actor {record['actor_id'] or record['pid']} runs {parts} "
        f"(torch {record['torch']}{cuda})",
        file=sys.stderr,
        flush=True,
    )
    send = getattr(journal, "record_devices", None)  # a bare crash journal has no such call
    if send is None:
        return
    try:
        send.remote(record)
    except Exception as e:  # noqa: BLE001 - the record is not worth failing the actor
        log.warning("k3batch: could not report this actor's devices: %s", e)
