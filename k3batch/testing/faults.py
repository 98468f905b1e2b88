"""Fault injection for the reliability tests: K3BATCH_TEST_* environment variables.

Test hooks only, never set in production. The runner reads them when it starts a job
(`stage_overrides`) and hands the pipeline a generation stage with the hooks built in,
through the job context's one override point (`JobContext.stage_overrides`), so they reach
Ray workers whatever environment those started with; the production stage takes no hook.

K3BATCH_TEST_CRASH_ON_BATCH=N       the N-th batch a generation actor receives kills its process
                                    (`os._exit`), once per job: the actor Ray starts in its
                                    place does not crash again (a marker file says it happened).
K3BATCH_TEST_HANG_AFTER_BATCHES=N   a generation actor that has finished N batches sleeps
                                    forever in the next one (a stalled stage).
K3BATCH_TEST_FAIL_PROMPT=TEXT       generating any group of rows that holds a row with prompt
                                    TEXT raises (a batch that fails on one bad row).
K3BATCH_TEST_CRASH_PROMPT=TEXT      generating any group that holds a row with prompt TEXT kills
                                    the process, every time (a row that crashes its worker).
K3BATCH_TEST_CUDA_ERROR_PROMPT=TEXT generating any group that holds a row with prompt TEXT raises
                                    the error CUDA gives for an illegal memory access, every time
                                    (a row that poisons its worker's CUDA context).
K3BATCH_TEST_HOLD_AFTER_BATCHES=N   a generation actor that has finished N batches waits in the
                                    next until the file K3BATCH_TEST_RELEASE_FILE exists (the
                                    multi-node tests hold a job mid-run while they kill or add
                                    a node, then let it go on).
K3BATCH_TEST_INSTANT_MODEL=1        the generation stage's model is an instant stand-in
                                    (`k3batch.testing.standin`): the scale benchmark's zero-cost
                                    model stage.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid

PREFIX = "K3BATCH_TEST_"
_NAMES = (
    "CRASH_ON_BATCH",
    "HANG_AFTER_BATCHES",
    "FAIL_PROMPT",
    "CRASH_PROMPT",
    "CUDA_ERROR_PROMPT",
    "HOLD_AFTER_BATCHES",
    "RELEASE_FILE",
)
INSTANT_MODEL = PREFIX + "INSTANT_MODEL"
RELEASE_POLL_S = 0.1


def from_env() -> dict | None:
    """The hooks set on this (driver) process, or None when there are none."""
    hooks = {n.lower(): os.environ[PREFIX + n] for n in _NAMES if PREFIX + n in os.environ}
    if not hooks:
        return None
    # Once per job: the marker is unique to this job build.
    hooks["marker"] = os.path.join(tempfile.gettempdir(), f"k3batch-test-crash-{uuid.uuid4().hex}")
    return hooks


def clean_up(hooks: dict | None) -> None:
    """After the job: remove the crash marker (it exists only once a crash happened)."""
    if hooks and os.path.exists(hooks["marker"]):
        os.remove(hooks["marker"])


class Hooks:
    """A generation actor's view of the hooks (its own batch count)."""

    def __init__(self, hooks: dict | None):
        self.hooks = hooks or {}
        self.batches = 0

    def before_batch(self) -> None:
        self.batches += 1
        crash_on = self.hooks.get("crash_on_batch")
        if crash_on and self.batches == int(crash_on):
            marker = self.hooks["marker"]
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # this job crashed once already
            else:
                os.close(fd)
                os._exit(1)
        hold_after = self.hooks.get("hold_after_batches")
        if hold_after and self.batches > int(hold_after):
            release = self.hooks["release_file"]
            while not os.path.exists(release):
                time.sleep(RELEASE_POLL_S)
        hang_after = self.hooks.get("hang_after_batches")
        if hang_after and self.batches > int(hang_after):
            while True:
                time.sleep(3600)

    def before_generate(self, prompts: list) -> None:
        if "crash_prompt" in self.hooks and self.hooks["crash_prompt"] in prompts:
            os._exit(1)
        if "cuda_error_prompt" in self.hooks and self.hooks["cuda_error_prompt"] in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test hook)")
        if "fail_prompt" in self.hooks and self.hooks["fail_prompt"] in prompts:
            raise RuntimeError(f"test hook: failing on prompt {self.hooks['fail_prompt']!r}")


def faulty_generate_stage(base: type | None = None):
    """(GenerateStage, `base` with the hooks run at its two override points); `base`: the
    stage to inject into, GenerateStage unless given (imported lazily: the stage module is
    what a Ray worker loads anyway)."""
    from k3batch.stages.generate import GenerateStage

    class FaultInjectingGenerateStage(base or GenerateStage):
        def __init__(self, *args, test_hooks: dict, **kwargs):
            self.hooks = Hooks(test_hooks)
            super().__init__(*args, **kwargs)

        def before_batch(self) -> None:
            self.hooks.before_batch()

        def before_generate(self, prompts: list) -> None:
            self.hooks.before_generate(prompts)

    return GenerateStage, FaultInjectingGenerateStage


@contextlib.contextmanager
def stage_overrides():
    """{production stage: (replacement, extra kwargs)} for the hooks set on this (driver)
    process, empty when none are; the crash marker is removed after the job."""
    hooks = from_env()
    instant = os.environ.get(INSTANT_MODEL) == "1"
    if hooks is None and not instant:
        yield {}
        return
    from k3batch.stages.generate import GenerateStage

    stage = GenerateStage
    if instant:
        from k3batch.testing.standin import instant_generate_stage

        stage = instant_generate_stage()
    if hooks is None:
        yield {GenerateStage: (stage, {})}
        return
    if "hold_after_batches" in hooks and "release_file" not in hooks:
        raise ValueError(f"{PREFIX}HOLD_AFTER_BATCHES needs {PREFIX}RELEASE_FILE")
    _, faulty = faulty_generate_stage(stage)
    try:
        yield {GenerateStage: (faulty, {"test_hooks": hooks})}
    finally:
        clean_up(hooks)
