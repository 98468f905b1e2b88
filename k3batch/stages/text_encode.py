"""The T5 text encoder as its own stage (`resources.text_encoder_pool`).

Each ok row gets its T5 output at its n real tokens (and its negative prompt's, when the
model uses guidance) as raw bytes in the encoder's dtype, n in `prompt_embeds_length`.
`GenerateStage` rebuilds the batch's encoder output from them and runs the rest as it would
with the encoder in its own actor, so images are the same (tests/test_performance.py).
"""

from __future__ import annotations

import logging

import pyarrow as pa

from k3batch.rows import STATUS_ERROR, STATUS_OK
from k3batch.stages.base import Stage

log = logging.getLogger(__name__)

PROMPT_EMBEDS = "prompt_embeds"
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"
EMBEDS_LENGTH = "prompt_embeds_length"
EMBEDDING_COLUMNS = (PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS, EMBEDS_LENGTH)


class TextEncodeStage(Stage):
    needs = ("id", "prompt", "negative_prompt", "status", "error")
    adds = {
        PROMPT_EMBEDS: pa.binary(),
        NEGATIVE_PROMPT_EMBEDS: pa.binary(),
        EMBEDS_LENGTH: pa.int32(),
        "status": pa.string(),
        "error": pa.string(),
    }

    def __init__(
        self,
        model: dict,
        prompt_column: str = "prompt",
        torch_threads: int | None = None,
        journal=None,
    ):
        """`journal`: the job's actor (progress.JobActor), told which device T5 runs on."""
        from k3batch import gpus
        from k3batch.model.kandinsky3 import PromptEncoder
        from k3batch.stages.generate import ensure_tiny

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == "prompt" else c for c in type(self).needs)
        device = model.get("device", "auto")
        gpus.check_cuda(
            "text encoder",
            device.get("text_encoder", "auto") if isinstance(device, dict) else device,
        )
        ensure_tiny(model)
        self.encoder = PromptEncoder.from_pretrained(
            model["path"],
            member=model.get("name", "kandinsky3"),
            layout=model.get("layout", "auto"),
            dtype=model["dtype"],
            device=model.get("device", "auto"),
            variant=model.get("variant"),
            attention=(model.get("performance") or {}).get("attention", "sdpa"),
            tf32=(model.get("performance") or {}).get("tf32", True),
        )
        gpus.report_devices(
            journal,
            gpus.device_record("text encoder", {"text_encoder": self.encoder.text_encoder}),
        )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["id"])
        out = {
            PROMPT_EMBEDS: [None] * n,
            NEGATIVE_PROMPT_EMBEDS: [None] * n,
            EMBEDS_LENGTH: [None] * n,
            "status": list(batch["status"]),
            "error": list(batch["error"]),
        }
        rows = [i for i in range(n) if batch["status"][i] == STATUS_OK]
        if rows:
            self._encode(rows, batch, out)
        return out

    def _encode(self, rows: list[int], batch, out) -> None:
        from k3batch.model import text

        try:
            embeddings = self.encoder.embed(
                [batch[self.prompt_column][i] for i in rows],
                [batch["negative_prompt"][i] for i in rows],
            )
        except Exception as e:  # noqa: BLE001 - failures become row errors, never a job crash
            if len(rows) > 1:
                log.warning("text encode of %d rows failed (%s); retrying row by row", len(rows), e)
                for i in rows:
                    self._encode([i], batch, out)
                return
            out["status"][rows[0]] = STATUS_ERROR
            out["error"][rows[0]] = f"text_encode: {type(e).__name__}: {e}"
            return
        for i, emb in zip(rows, embeddings, strict=True):
            out[PROMPT_EMBEDS][i] = text.to_bytes(emb.states)
            if emb.negative is not None:
                out[NEGATIVE_PROMPT_EMBEDS][i] = text.to_bytes(emb.negative)
            out[EMBEDS_LENGTH][i] = emb.length
