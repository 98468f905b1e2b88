"""The scale benchmark's zero-cost model stage: the generation stage with its model call
replaced by an instant stand-in, so a run measures k3batch's own costs (reading, validation,
the actors, encoding, writers, checkpointing, accounting) and nothing of a model's.

A test hook, never set in production: `K3BATCH_TEST_INSTANT_MODEL=1` on the driver, read by
`k3batch.testing.faults.stage_overrides` (the pipeline's one override point,
`JobContext.stage_overrides`). Everything but the model is the production path: the same
`GenerateStage` (records per image, seeds, resume's `images_done`, the crash journal, the
progress tally), run by the same actor pool. No weights are loaded; each image is a flat
grey picture of the row's size, and the `model` column says it came from this stand-in.
"""

from __future__ import annotations

STANDIN_LABEL = "instant-stand-in (k3batch.testing.standin: no model ran)"
GREY = 128


class InstantPipeline:
    """What `GenerateStage` calls on a loaded model, answered at once."""

    uncond = "stand-in"
    device = "cpu"
    shares_text_encoding = False  # nothing to encode: each call is per record

    def group_key(self, request) -> tuple:
        return (request.width, request.height)

    def generate(self, requests) -> list:
        import numpy as np

        return [np.full((r.height, r.width, 3), GREY, np.uint8) for r in requests]


def instant_generate_stage(base: type | None = None) -> type:
    """`base` (GenerateStage, or a subclass of it) with the instant stand-in as its model."""
    if base is None:
        from k3batch.stages.generate import GenerateStage as base

    class InstantGenerateStage(base):
        def load_model(self, model, decode_batch_size, text_encoder):
            self.model_name = STANDIN_LABEL
            return InstantPipeline()

        def model_components(self) -> dict:
            return {}  # no modules: run.json's device record lists none

    return InstantGenerateStage
