"""Generate images with Kandinsky 3: the model loads once per stage instance (per actor)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import pyarrow as pa

from k3batch.rows import STATUS_ERROR, STATUS_OK
from k3batch.stages.base import Stage

log = logging.getLogger(__name__)


def load_model(model: dict, decode_batch_size: int = 1):
    """The Kandinsky 3 model described by a `ModelConfig` dump (builds the tiny one if asked)."""
    from k3batch.model.kandinsky3 import Kandinsky3

    if model.get("make_tiny"):
        from k3batch.model.tiny import make_tiny

        make_tiny(model["path"])
    return Kandinsky3.from_pretrained(
        model["path"],
        dtype=model["dtype"],
        device=model["device"],
        variant=model.get("variant"),
        decode_batch_size=decode_batch_size,
    )


class GenerateStage(Stage):
    needs = (
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "status",
        "error",
    )
    adds = {
        "image_rgb": pa.binary(),
        "status": pa.string(),
        "error": pa.string(),
        "generate_seconds": pa.float64(),
        "model": pa.string(),
        "uncond_embedding": pa.string(),
    }

    def __init__(
        self,
        model: dict,
        decode_batch_size: int = 1,
        torch_threads: int | None = None,
        prompt_column: str = "prompt",
    ):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model_name = f"{model['name']}:{model['path']}"
        # `prompt_used` when beautification chose the text; `prompt` stays the original.
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == "prompt" else c for c in type(self).needs)
        self.pipe = load_model(model, decode_batch_size)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        from k3batch.model.kandinsky3 import Request

        n = len(batch["id"])
        out = {
            "image_rgb": [None] * n,
            "status": list(batch["status"]),
            "error": list(batch["error"]),
            "generate_seconds": [None] * n,
            "model": [self.model_name] * n,
            "uncond_embedding": [None] * n,
        }
        # Rows of different size or step count never share a forward pass.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            if batch["status"][i] == STATUS_OK:
                key = (batch["width"][i], batch["height"][i], batch["num_inference_steps"][i])
                groups[key].append(i)
        for indices in groups.values():
            requests = [
                Request(
                    prompt=batch[self.prompt_column][i],
                    negative_prompt=batch["negative_prompt"][i],
                    seed=batch["seed"][i],
                    width=batch["width"][i],
                    height=batch["height"][i],
                    num_inference_steps=batch["num_inference_steps"][i],
                    guidance_scale=batch["guidance_scale"][i],
                )
                for i in indices
            ]
            self._run_group(indices, requests, out, batch)
        return out

    def _run_group(self, indices, requests, out, batch) -> None:
        try:
            start = time.perf_counter()
            images = self.pipe.generate(requests)
            per_row = (time.perf_counter() - start) / len(indices)
        except Exception as e:  # noqa: BLE001 - any failure becomes row errors, never a job crash
            if len(indices) > 1:
                # One bad row must not cost its batch-mates: retry each row on its own.
                log.warning("batch of %d failed (%s); retrying row by row", len(indices), e)
                for i, request in zip(indices, requests, strict=True):
                    self._run_group([i], [request], out, batch)
                return
            i = indices[0]
            out["status"][i] = STATUS_ERROR
            out["error"][i] = f"generate: {type(e).__name__}: {e}"
            return
        for i, image in zip(indices, images, strict=True):
            out["image_rgb"][i] = image.tobytes()
            out["generate_seconds"][i] = per_row
            out["uncond_embedding"][i] = (
                "negative_prompt" if batch["negative_prompt"][i] else self.pipe.uncond
            )
