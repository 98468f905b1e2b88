"""The CPUs and GPUs a job's actor pools or a Serve config's deployments ask for, against what
Ray has: refused at start with one line when they can never be placed (Ray waits without a
word, or with a warning that repeats for ever), a warning when a cluster is short now but
may grow.

Jobs: the pools their kind declares (`JobKind.pools`), checked before Ray starts
(`check_local_cpus`; GPUs in `k3batch.gpus`) and sized into a local Ray (`local_num_cpus`).
Serve: each deployment's starting replicas (`deployment_pools`), checked once Ray is up
(`check_deployments`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from k3batch import gpus
from k3batch.config import ConfigError, JobConfig
from k3batch.job.pools import Pool
from k3batch.ray_start.connect import Target, target

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind

log = logging.getLogger(__name__)

# On resume Ray adds a CheckpointFilter actor pool that reserves one whole CPU (Ray 2.60
# has no setting for it); the filter mostly waits, so a resumed run counts one more.
CHECKPOINT_FILTER_CPUS = 1


def job_target(cfg: JobConfig) -> Target:
    """The Ray a job runs on: ray.address, else RAY_ADDRESS, else a fresh local Ray."""
    return target(cfg.ray.address, "ray.address")


def starts_local_ray(cfg: JobConfig) -> bool:
    """Whether the job will start a Ray of its own (no address, none running here)."""
    ray = sys.modules.get("ray")
    return job_target(cfg).local and not (ray is not None and ray.is_initialized())


def reserved_cpus(cfg: JobConfig, kind: JobKind) -> float:
    """CPUs the job's actor pools (as its `kind` declares them) hold for the whole run, at
    their starting sizes."""
    return sum(p.actors * p.cpus_each for p in kind.pools(cfg))


def cpus_needed(cfg: JobConfig, kind: JobKind) -> int:
    """Logical CPUs the job cannot run with fewer of: its actor pools' plus one whole CPU,
    as Ray Data's list-files, read and repartition tasks ask one each. With none left those
    tasks are never scheduled and the job hangs without a word from Ray."""
    return math.ceil(reserved_cpus(cfg, kind) + 1)


def check_local_cpus(cfg: JobConfig, kind: JobKind) -> None:
    need = cpus_needed(cfg, kind)
    if job_target(cfg).local and cfg.ray.num_cpus is not None and cfg.ray.num_cpus < need:
        raise ConfigError(
            f"ray.num_cpus: {cfg.ray.num_cpus} CPUs cannot run this job: its actor pools "
            f"reserve {reserved_cpus(cfg, kind):g} (resources.num_actors x "
            "resources.num_cpus_per_actor, plus the text encoder and beautify pools) and Ray "
            f"Data's own tasks need one more; set ray.num_cpus to {need} or more, "
            "or leave it unset"
        )


def local_num_cpus(cfg: JobConfig, kind: JobKind, resumed: bool) -> int:
    """Logical CPUs of a new local Ray instance: ray.num_cpus, else the machine's, but at
    least `cpus_needed`. A small machine then counts more CPUs than it has: the tasks that
    need the extra one are short, and the actors' threads are what keep the cores busy. A
    resumed run counts CHECKPOINT_FILTER_CPUS more.
    """
    cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, cpus_needed(cfg, kind))
    return cpus + (CHECKPOINT_FILTER_CPUS if resumed else 0)


def cluster_cpus() -> tuple[float, float]:
    """(CPUs in the Ray cluster now, the most CPUs one alive node has)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    largest = max(
        (n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )
    return total, largest


def _widest_actor(cfg: JobConfig, kind: JobKind) -> Pool | None:
    """The pool whose one actor asks the most CPUs (an actor takes them all on one node)."""
    return max(kind.pools(cfg), key=lambda p: p.cpus_each, default=None)


def cpu_shortfall(cfg: JobConfig, kind: JobKind, resumed: bool) -> str | None:
    """What the Ray this process is connected to lacks for the job's pools, now, in words
    with the numbers; None when they fit. Ray Data waits for CPUs without a word."""
    have, largest = cluster_cpus()
    need = cpus_needed(cfg, kind) + (CHECKPOINT_FILTER_CPUS if resumed else 0)
    widest = _widest_actor(cfg, kind)
    if have >= need and (widest is None or widest.cpus_each <= largest):
        return None
    filter_cpu = ", plus one for resume's checkpoint filter" if resumed else ""
    text = (
        f"the Ray cluster has {have:g} CPUs and this job needs {need} (actor pools "
        f"{reserved_cpus(cfg, kind):g}, plus one for Ray Data's tasks{filter_cpu})"
    )
    if widest is not None and widest.cpus_each > largest:
        text += (
            f", and one actor of {widest.name} needs {widest.cpus_each:g} on one node, where "
            f"the most any node has is {largest:g}"
        )
    return text


def check_cluster_cpus(cfg: JobConfig, kind: JobKind, resumed: bool) -> None:
    """On a Ray k3batch did not start: refuse when the autoscaler's limits say the job's
    CPUs can never be there (as `gpus.check_cluster_gpus` does for GPUs); warn with the
    numbers, and how long the job will wait, when the cluster is short now."""
    from ray.data import DataContext

    short = cpu_shortfall(cfg, kind, resumed)
    if short is None:
        return
    have, largest = cluster_cpus()
    need = cpus_needed(cfg, kind) + (CHECKPOINT_FILTER_CPUS if resumed else 0)
    widest = _widest_actor(cfg, kind)
    limits = gpus.autoscaler_limits_of("CPU")
    if limits is not None:
        most, most_per_node = max(limits[0], have), max(limits[1], largest)
        if need > most + 1e-9 or (widest is not None and widest.cpus_each > most_per_node):
            raise ConfigError(
                f"CPUs: {short}, and the cluster can grow to {most:g} CPUs, at most "
                f"{most_per_node:g} on a node; lower resources.num_actors or "
                "resources.num_cpus_per_actor (and the other pools' sizes)"
            )
    timeout = (
        cfg.faults.stall_timeout_s or DataContext.get_current().execution_no_progress_timeout_s
    )
    log.warning(
        "k3batch: %s: it will wait until the cluster grows%s",
        short,
        f", and stop after {timeout:g} s without progress (faults.stall_timeout_s)"
        if timeout and timeout > 0
        else "",
    )


# ------------------------------------------------------------------ Serve deployments


def _applications(value, found: list) -> list:
    """The Serve Applications bound anywhere in a deployment's arguments."""
    from ray.serve import Application

    if isinstance(value, Application):
        found.append(value)
    elif isinstance(value, list | tuple | set):
        for v in value:
            _applications(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _applications(v, found)
    return found


def _starting_replicas(deployment) -> int:
    # Private attributes: Ray 2.60's Deployment has no public autoscaling settings, and its
    # num_replicas reads 1 under autoscaling. Serve starts initial_replicas, else min_replicas.
    auto = getattr(getattr(deployment, "_deployment_config", None), "autoscaling_config", None)
    if auto is not None:
        first = auto.initial_replicas if auto.initial_replicas is not None else auto.min_replicas
        return int(first or 0)
    replicas = deployment.num_replicas
    return replicas if isinstance(replicas, int) else 1


@dataclass
class Deployment(Pool):
    """A Serve deployment's starting replicas as a pool (`actors`: replicas)."""

    where: str = ""  # the config field that sizes it, for the error line


def deployment_pools(app, where: Callable[[str], str] = lambda name: "") -> list[Deployment]:
    """Each deployment of a built Serve application (the bound graph `serve.run` takes) as a
    pool of its starting replicas, the ingress first: `where(name)` names its config field."""
    pools: list[Deployment] = []
    seen: set[int] = set()

    def walk(application) -> None:
        if id(application) in seen:
            return
        seen.add(id(application))
        # Private: the bound graph has no public accessor (Ray's own build_app reads these).
        # Should a later Ray rename them, the check counts what it still finds.
        d = getattr(application, "_bound_deployment", None)
        if d is None:
            log.debug("cannot read the deployment of %r: not counted", application)
            return
        bundles = getattr(getattr(d, "_replica_config", None), "placement_group_bundles", None)
        if bundles:  # a replica in a placement group (vLLM engines) takes its bundles
            cpus = sum(b.get("CPU", 0) for b in bundles)
            gpus_each = sum(b.get("GPU", 0) for b in bundles)
            per_node = max(b.get("GPU", 0) for b in bundles)
        else:
            options = d.ray_actor_options or {}
            cpus = options.get("num_cpus", 1)  # Serve's default for a replica
            gpus_each = per_node = options.get("num_gpus") or 0
        replicas = _starting_replicas(d)
        pools.append(Deployment(d.name, replicas, cpus, gpus_each, per_node, where(d.name)))
        for child in _applications((d.init_args, d.init_kwargs), []):
            walk(child)

    walk(app)
    return pools


_FIELD = {"CPU": "num_cpus", "GPU": "num_gpus"}


def _asks(p: Pool, resource: str) -> float:
    return p.cpus_each if resource == "CPU" else p.gpus_each


def _each(p: Pool, resource: str) -> str:
    return f"{p.name} {p.actors} x {_asks(p, resource):g}"


def _count(n: float, resource: str) -> str:
    return f"{n:g} {resource}{'' if n == 1 else 's'}"


def local_resources() -> dict[str, float] | None:
    """CPUs and GPUs a new local Ray would have here, as Ray counts them (cgroup CPU limits,
    CUDA_VISIBLE_DEVICES); None when Ray cannot tell."""
    cpus = None
    with contextlib.suppress(Exception):  # a private Ray API: without it, no early check
        from ray._private.utils import get_num_cpus

        cpus = get_num_cpus()
    found = gpus.detected_gpus()
    if cpus is None or found is None:
        return None
    return {"CPU": cpus, "GPU": found}


def ray_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(free now, total) CPUs and GPUs of the Ray this process is connected to."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return {r: free.get(r, 0) for r in _FIELD}, {r: total.get(r, 0) for r in _FIELD}


def check_deployments(
    pools: list[Deployment],
    free: dict[str, float],
    total: dict[str, float],
    local: bool,
    address_hint: str,
) -> None:
    """Serve's deployments against a Ray's `free` and `total` CPUs and GPUs. A local Ray
    (`local`: one this process starts) cannot grow: the first replica set that cannot be
    placed is one ConfigError line naming it, what it asks and what is free. A cluster it
    joined: refused when the autoscaler's limits say it can never be placed, else a warning
    when it is short now. `address_hint`: how to name a larger cluster (e.g. `--address`)."""
    gpus.check_fractions(pools)
    free = dict(free)
    placed: list[Deployment] = []
    for p in pools:
        for r in _FIELD:
            need = p.actors * _asks(p, r)
            if need <= free[r] + 1e-9:
                continue
            before = [_each(q, r) for q in placed if _asks(q, r) > 0]
            short = (
                f"{p.name}{f' ({p.where})' if p.where else ''} asks {p.actors} "
                f"replica{'s' if p.actors != 1 else ''} x {_count(_asks(p, r), r)}, but the "
                f"{'local' if local else 'cluster'} Ray has {free[r]:g} of its "
                f"{_count(total[r], r)} free" + (f" after {', '.join(before)}" if before else "")
            )
            if local:
                raise ConfigError(
                    f"serve: {short}: it could never be placed; lower its {_FIELD[r]} or its "
                    f"replicas, or join a cluster that has the {r}s with {address_hint}"
                )
            _cluster_short(pools, r, short)
            return
        placed.append(p)
        for r in _FIELD:
            free[r] -= p.actors * _asks(p, r)


def _cluster_short(pools: list[Deployment], resource: str, short: str) -> None:
    """A joined cluster short of `resource` now: an error if its autoscaler can never give
    it, a warning if it may."""
    need = sum(p.actors * _asks(p, resource) for p in pools)
    # What one replica needs on a single node (a placement group's largest GPU bundle).
    widest = max(p.per_node if resource == "GPU" else p.cpus_each for p in pools)
    limits = gpus.autoscaler_limits_of(resource)
    if limits is not None and (need > limits[0] + 1e-9 or widest > limits[1] + 1e-9):
        raise ConfigError(
            f"serve: {short}, and the cluster can grow to {limits[0]:g} {resource}s, at most "
            f"{limits[1]:g} on a node: the deployments ask {need:g}; lower their "
            f"{_FIELD[resource]} or replicas"
        )
    log.warning("k3batch: serve: %s: its replicas will wait until the cluster grows", short)
