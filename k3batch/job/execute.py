"""Running an image-making job kind's dataset (`text_to_image`, `upscale`): Ray Data's
checkpointing on (a rerun resumes from the records committed), the stall timeout, the crash
journal, and the output format's write. Each kind builds its own dataset; this is the one way
they run it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from k3batch import crashes, resume

if TYPE_CHECKING:
    from k3batch.config import JobConfig
    from k3batch.job.kinds import JobContext


def execute(cfg: JobConfig, ctx: JobContext, build: Callable[[JobConfig, JobContext], Any]) -> None:
    """Build the kind's dataset (`build(cfg, ctx)`, ending before the final write) and write
    it with the output format, with Ray Data's checkpointing on so a rerun resumes.

    `ctx.journal`: the job's crash journal actor (the runner passes its `job_actor.JobActor`);
    None starts one for this run. `ctx.kind`'s record rules say how many records each input
    row yields, for the resume filter.
    """
    import ray
    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    previous = (
        data_ctx.checkpoint_config,
        data_ctx.execution_no_progress_timeout_s,
        data_ctx.raise_original_map_exception,
    )
    data_ctx.checkpoint_config = resume.checkpoint_config(cfg, ctx.kind.record_rules(cfg))
    if cfg.faults.stall_timeout_s:
        data_ctx.execution_no_progress_timeout_s = cfg.faults.stall_timeout_s
    # Ray wraps a stage's exception in UserCodeException, and the original (a StorageError,
    # say) does not survive the trip to the driver, only its traceback text does: keep it,
    # so the runner can say what stopped the job.
    data_ctx.raise_original_map_exception = True
    own_journal = ctx.journal is None
    if own_journal:
        ctx = dataclasses.replace(ctx, journal=crashes.start_journal())
    journal = ctx.journal
    try:
        # The dataset takes a copy of the context: checkpoint config and stall timeout included.
        ds = build(cfg, ctx)
        with warnings.catch_warnings():
            # Ray turns checkpointing off with only a warning when the plan does not allow it
            # (it must run from a Read to a Write); a job that silently cannot resume is worse
            # than one that fails at start.
            warnings.filterwarnings("error", message="You've enabled checkpointing")
            ctx.output.format.write(ds, cfg, ctx.output, ctx.num_records)
    except BaseException:
        crashes.stop_workers(journal)
        raise
    finally:
        (
            data_ctx.checkpoint_config,
            data_ctx.execution_no_progress_timeout_s,
            data_ctx.raise_original_map_exception,
        ) = previous
        if own_journal:
            ray.kill(journal)
