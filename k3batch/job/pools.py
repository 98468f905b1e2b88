"""The actor pools a job holds for its whole run, at their starting sizes. Each job kind
declares its own (`JobKind.pools`): the one enumeration that the CPU budget
(`ray_start.budget`) and the GPU checks (`k3batch.gpus`) both read."""

from __future__ import annotations

from dataclasses import dataclass

from k3batch.config import JobConfig


@dataclass
class Pool:
    """One actor pool's request at its starting size."""

    name: str  # as the config names it
    actors: int
    cpus_each: float
    gpus_each: float
    # GPUs one actor needs on a single node: a vLLM engine takes one bundle of 1 GPU per
    # tensor-parallel worker (Ray may place them on different nodes); a model actor all of
    # its request, a fraction on one GPU.
    per_node: float

    @property
    def total(self) -> float:
        return self.actors * self.gpus_each

    def describe(self) -> str:
        return f"{self.name} {self.actors} x {self.gpus_each:g}"


def beautify_pools(cfg: JobConfig) -> list[Pool]:
    """The LLM's pool, for every job kind that beautifies."""
    b = cfg.beautify
    if b.backend == "vllm":
        v = b.vllm
        # GPU engines take one CPU per GPU in Ray Data LLM's bundles.
        return [
            Pool(
                "beautify.vllm",
                v.num_engines,
                v.num_gpus_per_engine or v.num_cpus_per_engine,
                v.num_gpus_per_engine,
                min(v.num_gpus_per_engine, 1),
            )
        ]
    o = b.openai
    return [Pool("beautify.openai", o.num_actors, o.num_cpus_per_actor, 0, 0)]
