"""The registry of job kinds: `job: <name>` in a config runs the kind object that
`pipelines/<name>.py` defines as `KIND`.

A kind says how to run its dataset, which actor pools it holds, whether a rerun resumes it,
whether it makes images, and how its output is finished and summarised. Adding a kind is
adding one module under `pipelines/` (and its name to `JobConfig.job`). `k3batch` looks
kinds up by name here, the one place it reaches into `pipelines/`, so imports between the
two stay one-way.

`run_job` looks the job's kind up once and carries it: as an argument to pre-flight, the
input inspection, Ray start-up and accounting, and in the `JobContext` a kind's `run` gets.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from k3batch.config import JobConfig
    from k3batch.job.pools import Pool
    from k3batch.outputs import Output


@dataclass
class JobContext:
    """What the runner hands a kind's `run`: the job's kind, the input it inspected and the
    job's services."""

    kind: JobKind
    output: Output
    num_rows: int
    num_records: int | None = None  # records to write (images); None: num_rows
    schema: Any = None  # pyarrow.Schema: every input file's columns, unified
    duplicate_ids: dict = field(default_factory=dict)  # id -> rows that give it
    journal: Any = None  # the job's crash journal actor (job_actor.JobActor), or None
    tracker: Any = None  # the job's progress.Tracker, which every stage joins; None: none
    # The pipeline's one override point: {stage class: (replacement, extra kwargs)}. Only
    # `k3batch.testing.faults` fills it, to inject faults into the generation actors.
    stage_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_records is None:
            self.num_records = self.num_rows

    def stage(self, cls: type, kwargs: dict) -> tuple[type, dict]:
        """The stage class and arguments to map: `cls`'s own unless overridden."""
        if cls not in self.stage_overrides:
            return cls, kwargs
        replacement, extra = self.stage_overrides[cls]
        return replacement, {**kwargs, **extra}


class JobKind:
    """One kind of job. Subclasses live in `pipelines/<name>.py` as `KIND`."""

    name: str = ""
    resumes: bool = True  # a rerun into the same output picks up where the last stopped
    makes_images: bool = True  # counts toward images/s; False: a table in, a table out
    uses_diffusion_model: bool = True  # `model.*` is checked at pre-flight

    def input_columns(self, cfg: JobConfig) -> dict[str, str]:
        """The columns every input table must have, by the config field naming each."""
        return {"input.prompt_column": cfg.input.prompt_column}

    def record_rules(self, cfg: JobConfig):
        """The `rows.RowRules` that say how many records (images) each input row yields, as
        the resume filter, the input count and the accounting read them."""
        from k3batch.model import family
        from k3batch.rows.rules import RowRules

        capabilities = family.row_capabilities(cfg.model)
        return RowRules.from_config(cfg.generation, cfg.limits, capabilities)

    def output_format(self, cfg: JobConfig) -> str:
        """The output format (`k3batch.outputs`) this kind writes."""
        return cfg.output.format

    def pools(self, cfg: JobConfig) -> list[Pool]:
        """Every actor pool of the job: the one list the CPU budget (`ray_start.budget`) and the
        GPU checks (`k3batch.gpus`) read."""
        raise NotImplementedError

    def prepare(self, cfg: JobConfig) -> None:
        """Driver-side set-up after Ray starts (e.g. build a tiny model once)."""

    def run(self, cfg: JobConfig, ctx: JobContext) -> None:
        raise NotImplementedError

    def finalise(self, cfg: JobConfig, ctx: JobContext) -> None:
        """After every row is written (e.g. the output format's finishing step)."""

    def output_lines(self, run: dict) -> list[str]:
        """The summary's lines naming where this kind's output is."""
        raise NotImplementedError

    @property
    def summary(self) -> str:
        """What the kind does, in one paragraph: its class docstring's first (for help)."""
        return " ".join((type(self).__doc__ or "").strip().split("\n\n")[0].split())


def all_kinds() -> dict[str, JobKind]:
    """Every kind there is, by name: each module of `pipelines/` that defines a `KIND`
    (found by name, as `get` finds one)."""
    import pkgutil
    from importlib.util import find_spec

    spec = find_spec("pipelines")
    found = {}
    for info in pkgutil.iter_modules(spec.submodule_search_locations if spec else []):
        kind = getattr(importlib.import_module(f"pipelines.{info.name}"), "KIND", None)
        if isinstance(kind, JobKind):
            found[kind.name] = kind
    return dict(sorted(found.items()))


def get(name: str) -> JobKind:
    """The kind `pipelines/<name>.py` defines; a clear error for an unknown name."""
    try:
        module = importlib.import_module(f"pipelines.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"pipelines.{name}", "pipelines"):
            raise
        raise ValueError(f"job: no job kind {name!r} (no module pipelines/{name}.py)") from None
    kind = getattr(module, "KIND", None)
    if not isinstance(kind, JobKind):
        raise ValueError(f"job: pipelines/{name}.py defines no KIND (a JobKind)")
    return kind
