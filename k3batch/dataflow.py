"""The thin layer that maps stages onto Ray Data operators."""

from __future__ import annotations

from typing import Any

from k3batch import gpus, progress
from k3batch.observe import StageObserver
from k3batch.stages.base import Stage, apply_stage


class StageActor:
    """Ray Data actor UDF: builds the stage (and its model) once, then maps batches."""

    def __init__(
        self,
        stage_cls: type[Stage],
        stage_kwargs: dict[str, Any],
        observer: StageObserver | None = None,
    ):
        # Started before the model loads: the load counts in the actor's (GPU) seconds.
        self.observer = observer.in_actor() if observer else None
        self.stage = stage_cls(**stage_kwargs)

    def __call__(self, table):
        if self.observer is None:
            return apply_stage(self.stage, table)
        return self.observer.apply(self.stage, table)


def read_input(cfg, schema=None):
    """The job's input table as a Ray dataset, with Ray's `row_hash` per row, reached through
    the config's `storage` section. `schema`: the input files' unified schema
    (`runner.inspect_input`), so every file is read alike, also those Ray's sample skips."""
    import ray.data

    from k3batch import storage

    fs, path = storage.arrow_filesystem(cfg.input.uri, cfg.storage.model_dump())
    read_args = {} if schema is None else {"schema": schema}
    return ray.data.read_parquet(path, filesystem=fs, include_row_hash=True, **read_args)


def run_stage_task(
    table,
    stage_cls: type[Stage],
    stage_kwargs: dict[str, Any],
    observer: StageObserver | None = None,
):
    """Ray Data task UDF for cheap stages that hold no model."""
    stage = stage_cls(**stage_kwargs)
    return observer.apply(stage, table) if observer else apply_stage(stage, table)


def map_stage(
    ds,
    stage_cls: type[Stage],
    stage_kwargs: dict[str, Any],
    *,
    batch_size: int,
    num_cpus: float,
    num_gpus: float = 0,
    actors: tuple[int, int] | None = None,
    tracker: progress.Tracker | None = None,
):
    """Add `stage_cls` to the dataset: on an actor pool of (min, max) actors, or as tasks.

    Every stage records k3batch's metrics; given the job's `tracker` (a job run), the stage
    also joins its progress tally, in the order the pipeline adds stages.
    """
    import ray.data

    observer = StageObserver.for_stage(stage_cls)
    if tracker is not None:
        observer.stage = tracker.register(observer.stage, num_gpus, actor_pool=actors is not None)
        observer.tally = tracker.tally
        observer.watched = True
    common = dict(
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus, zero_copy_batch=True
    )
    if actors is None:
        return ds.map_batches(
            run_stage_task,
            fn_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs, "observer": observer},
            **common,
        )
    if not num_gpus:
        # A model actor that asks for no GPU must not see the node's GPUs (k3batch.gpus).
        # Tasks hold no model, and a runtime_env on them would stop Ray fusing the last
        # one with the Parquet write (it fuses only equal remote args).
        common["runtime_env"] = {"env_vars": dict(gpus.ZERO_GPU_ENV)}
    return ds.map_batches(
        StageActor,
        fn_constructor_kwargs={
            "stage_cls": stage_cls,
            "stage_kwargs": stage_kwargs,
            "observer": observer,
        },
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_gpus=num_gpus or None,
        **common,
    )
