"""The thin layer that maps stages onto Ray Data operators."""

from __future__ import annotations

from typing import Any

from k3batch.stages.base import Stage, apply_stage


class StageActor:
    """Ray Data actor UDF: builds the stage (and its model) once, then maps batches."""

    def __init__(self, stage_cls: type[Stage], stage_kwargs: dict[str, Any]):
        self.stage = stage_cls(**stage_kwargs)

    def __call__(self, table):
        return apply_stage(self.stage, table)


def run_stage_task(table, stage_cls: type[Stage], stage_kwargs: dict[str, Any]):
    """Ray Data task UDF for cheap stages that hold no model."""
    return apply_stage(stage_cls(**stage_kwargs), table)


def map_stage(
    ds,
    stage_cls: type[Stage],
    stage_kwargs: dict[str, Any],
    *,
    batch_size: int,
    num_cpus: float,
    num_gpus: float = 0,
    actors: tuple[int, int] | None = None,
):
    """Add `stage_cls` to the dataset: on an actor pool of (min, max) actors, or as tasks."""
    import ray.data

    common = dict(
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus, zero_copy_batch=True
    )
    if actors is None:
        return ds.map_batches(
            run_stage_task,
            fn_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs},
            **common,
        )
    return ds.map_batches(
        StageActor,
        fn_constructor_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs},
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_gpus=num_gpus or None,
        **common,
    )
