"""The T5 text encoder as its own stage (`resources.text_encoder_pool`).

Each ok row gets its T5 output at its n real tokens (and its negative prompt's, when the
model uses guidance) as raw bytes in the encoder's dtype, n in `prompt_embeds_length`.
`GenerateStage` rebuilds the batch's encoder output from them and runs the rest as it would
with the encoder in its own actor, so images are the same (tests/test_performance.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from k3batch import schema
from k3batch.schema import NEGATIVE_PROMPT_EMBEDS, PROMPT_EMBEDS, PROMPT_EMBEDS_LENGTH
from k3batch.stages.base import Stage, fail_row, ok_rows, start_output

if TYPE_CHECKING:
    from k3batch.config import ModelConfig

log = logging.getLogger(__name__)


class TextEncodeStage(Stage):
    needs = (schema.ID, schema.PROMPT, schema.NEGATIVE_PROMPT, *schema.STATUS_COLUMNS)
    adds = schema.types(*schema.EMBEDDING_COLUMNS, *schema.STATUS_COLUMNS)

    def __init__(
        self,
        model: ModelConfig,
        prompt_column: str = schema.PROMPT,
        torch_threads: int | None = None,
        journal=None,
    ):
        """`journal`: the job's actor (job_actor.JobActor), told which device T5 runs on."""
        from k3batch import gpus
        from k3batch.model import family

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == schema.PROMPT else c for c in type(self).needs)
        gpus.check_cuda("text encoder", model.device_map()["text_encoder"])
        self.encoder = family.of(model.name).load_text_encoder(model)
        gpus.report_devices(
            journal,
            gpus.device_record("text encoder", {"text_encoder": self.encoder.text_encoder}),
        )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = start_output(batch, self.adds)
        rows = ok_rows(batch)
        if rows:
            self._encode(rows, batch, out)
        return out

    def _encode(self, rows: list[int], batch, out) -> None:
        from k3batch.model.kandinsky3 import text

        try:
            embeddings = self.encoder.embed(
                [batch[self.prompt_column][i] for i in rows],
                [batch[schema.NEGATIVE_PROMPT][i] for i in rows],
            )
        except Exception as e:  # noqa: BLE001 - failures become row errors, never a job crash
            if len(rows) > 1:
                log.warning("text encode of %d rows failed (%s); retrying row by row", len(rows), e)
                for i in rows:
                    self._encode([i], batch, out)
                return
            fail_row(out, rows[0], "text_encode", e)
            return
        for i, emb in zip(rows, embeddings, strict=True):
            out[PROMPT_EMBEDS][i] = text.to_bytes(emb.states)
            if emb.negative is not None:
                out[NEGATIVE_PROMPT_EMBEDS][i] = text.to_bytes(emb.negative)
            out[PROMPT_EMBEDS_LENGTH][i] = emb.length
