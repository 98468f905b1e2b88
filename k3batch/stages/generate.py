"""Generate images with the Kandinsky 3 family: the model loads once per stage instance."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import pyarrow as pa

from k3batch.rows import STATUS_ERROR, STATUS_OK
from k3batch.stages.base import Stage
from k3batch.stages.text_encode import EMBEDDING_COLUMNS, PROMPT_EMBEDS

log = logging.getLogger(__name__)

POISONED_EXIT_CODE = 3  # a CUDA error poisoned the process (see _run_group)


def ensure_tiny(model: dict) -> None:
    """Build the tiny checkpoint at `path` when the config asks for it (demo, tests)."""
    if model.get("make_tiny"):
        from k3batch.model.tiny import make_tiny

        layout = model.get("layout", "auto")
        make_tiny(model["path"], layout="reference" if layout == "reference" else "diffusers")


def load_model(model: dict, decode_batch_size: int = 1, text_encoder: bool = True):
    """The model described by a `ModelConfig` dump (builds the tiny one if asked).

    `text_encoder=False`: no T5; rows bring prompt embeddings from the text encoder pool.
    """
    from k3batch.model.kandinsky3 import Kandinsky3

    ensure_tiny(model)
    return Kandinsky3.from_pretrained(
        model["path"],
        member=model.get("name", "kandinsky3"),
        refine=model.get("refine", False),
        layout=model.get("layout", "auto"),
        dtype=model["dtype"],
        device=model.get("device", "auto"),
        variant=model.get("variant"),
        decode_batch_size=decode_batch_size,
        performance=model.get("performance"),
        text_encoder=text_encoder,
    )


def model_components(pipe) -> dict:
    """The loaded modules by component name (for the device record)."""
    return {
        "unet": pipe.denoiser.unet,
        "refiner_unet": pipe.refiner.unet if pipe.refiner is not None else None,
        "text_encoder": pipe.text_encoder,
        "movq": pipe.movq,
    }


def model_label(model: dict) -> str:
    refine = "+flash-refiner" if model.get("refine") else ""
    return f"{model.get('name', 'kandinsky3')}{refine}:{model['path']}"


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
    optional = ("strength", "source_rgb", "keep_mask", "row_hash", *EMBEDDING_COLUMNS)
    adds = {
        "image_rgb": pa.binary(),
        "status": pa.string(),
        "error": pa.string(),
        "generate_seconds": pa.float64(),
        "model": pa.string(),
        "uncond_embedding": pa.string(),
    }
    # The embeddings are ~1 MB a row with the real T5: used here, never written out.
    drops = ("source_rgb", "keep_mask", *EMBEDDING_COLUMNS)

    def __init__(
        self,
        model: dict,
        decode_batch_size: int = 1,
        torch_threads: int | None = None,
        prompt_column: str = "prompt",
        text_encoder_pool: bool = False,
        journal=None,
        max_crashes_per_row: int = 2,
        test_hooks: dict | None = None,
        warmup: dict | None = None,
    ):
        """`warmup`: {width, height, batch_size} of a throwaway first batch, run at start when
        the model is compiled (`model.performance.compile.warmup`)."""
        from k3batch import crashes, gpus, testhooks

        self.journal = crashes.JournalClient(journal)
        self.max_crashes_per_row = max_crashes_per_row
        self.hooks = testhooks.Hooks(test_hooks)
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model_name = model_label(model)
        # `prompt_used` when beautification chose the text; `prompt` stays the original.
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == "prompt" else c for c in type(self).needs)
        # With the text encoder pool, rows carry their prompt embeddings and T5 stays out
        # of this actor's memory.
        self.text_encoder_pool = text_encoder_pool
        if text_encoder_pool:
            from k3batch.model.loading import DTYPES

            self.embeds_dtype = DTYPES[model["dtype"]["text_encoder"]]
        gpus.check_cuda("generation", model.get("device", "auto"))
        self.pipe = load_model(model, decode_batch_size, text_encoder=not text_encoder_pool)
        gpus.report_devices(journal, gpus.device_record("generation", model_components(self.pipe)))
        compile = (model.get("performance") or {}).get("compile") or {}
        self.warmup_seconds = None
        if warmup and compile.get("warmup", True) and (compile.get("unet") or compile.get("movq")):
            # Compiling on the first real batch would hold that batch (and the progress
            # line) for minutes; the actor is not ready until its model is.
            self.warmup_seconds = self.pipe.warm_up(**warmup)
            log.info("generate: compiled and warmed up in %.1f s", self.warmup_seconds)

    def _request(self, batch, i):
        import numpy as np

        from k3batch.model.kandinsky3 import Request

        def optional(name):
            values = batch.get(name)
            return None if values is None else values[i]

        w, h = batch["width"][i], batch["height"][i]
        rgb, keep = optional("source_rgb"), optional("keep_mask")
        return Request(
            prompt=batch[self.prompt_column][i],
            negative_prompt=batch["negative_prompt"][i],
            seed=batch["seed"][i],
            width=w,
            height=h,
            num_inference_steps=batch["num_inference_steps"][i],
            guidance_scale=batch["guidance_scale"][i],
            image=None if rgb is None else np.frombuffer(rgb, np.uint8).reshape(h, w, 3),
            mask=None if keep is None else np.frombuffer(keep, np.float32).reshape(h, w),
            strength=optional("strength"),
            text=self._embedding(batch, i) if self.text_encoder_pool else None,
        )

    def _embedding(self, batch, i):
        from k3batch.model import text

        embeds, negative, length = (batch.get(c) for c in EMBEDDING_COLUMNS)
        if embeds is None or embeds[i] is None or length[i] is None:
            raise ValueError(f"row has no {PROMPT_EMBEDS} from the text encoder pool")
        neg = None if negative is None else negative[i]
        return text.PromptEmbedding(
            text.from_bytes(embeds[i], length[i], self.embeds_dtype),
            None if neg is None else text.from_bytes(neg, length[i], self.embeds_dtype),
        )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        from k3batch import crashes

        n = len(batch["id"])
        # row_hash is unique per input row (ids may repeat in a bad table).
        row_keys = batch.get("row_hash") or batch["id"]
        batch_key = crashes.key(row_keys)
        crashed = self.journal.start(batch_key)
        self.hooks.before_batch()
        out = self._generate(batch, n, [crashes.key([k]) for k in row_keys] if crashed else None)
        self.journal.end(batch_key)
        return out

    def _generate(self, batch, n, isolate: list[str] | None) -> dict[str, list]:
        """The batch's results; `isolate` (row keys) after a worker died running it: then each
        row runs alone and is journaled, and a row that crashed workers too often fails."""
        out = {
            "image_rgb": [None] * n,
            "status": list(batch["status"]),
            "error": list(batch["error"]),
            "generate_seconds": [None] * n,
            "model": [self.model_name] * n,
            "uncond_embedding": [None] * n,
        }
        # Rows of different size, step count or kind never share a forward pass.
        groups: dict[tuple, list] = defaultdict(list)
        for i in range(n):
            if batch["status"][i] != STATUS_OK:
                continue
            try:
                request = self._request(batch, i)
            except Exception as e:  # noqa: BLE001 - a malformed prepared row is its own error
                out["status"][i] = STATUS_ERROR
                out["error"][i] = f"generate: {type(e).__name__}: {e}"
                continue
            groups[self.pipe.group_key(request)].append((i, request))
        if isolate is not None:
            rows = [m for members in groups.values() for m in members]
            log.warning(
                "a worker died while generating this batch; retrying its %d rows one at a time",
                len(rows),
            )
            for i, request in rows:
                deaths = self.journal.start(isolate[i])
                if deaths >= self.max_crashes_per_row:
                    out["status"][i] = STATUS_ERROR
                    out["error"][i] = (
                        "generate: the worker process died while generating this row alone, "
                        f"{deaths} time(s) (faults.max_crashes_per_row={self.max_crashes_per_row})"
                    )
                else:
                    self._run_group([i], [request], out, batch)
                self.journal.end(isolate[i])
            return out
        for members in groups.values():
            indices = [i for i, _ in members]
            self._run_group(indices, [r for _, r in members], out, batch)
        return out

    def _run_group(self, indices, requests, out, batch) -> None:
        from k3batch.model import performance

        failure = None
        try:
            start = time.perf_counter()
            self.hooks.before_generate([r.prompt for r in requests])
            images = self.pipe.generate(requests)
            per_row = (time.perf_counter() - start) / len(indices)
        except Exception as e:  # noqa: BLE001 - any failure becomes row errors, never a job crash
            if performance.poisons_process(e):
                # Every later batch of this process would fail too. Ending the process lets
                # Ray start a fresh actor and retry the batch; the crash journal then runs its
                # rows one by one and fails only a row that keeps killing workers.
                log.error("generate: %s; ending this worker so Ray replaces it", e)
                os._exit(POISONED_EXIT_CODE)
            failure = f"{type(e).__name__}: {e}"
        if failure is not None:
            # Retried out of the except block, once the failed call's tensors are released.
            performance.release_cached_memory(self.pipe.device)
            if len(indices) > 1:
                # One bad row must not cost its batch-mates: retry each row on its own.
                log.warning("batch of %d failed (%s); retrying row by row", len(indices), failure)
                for i, request in zip(indices, requests, strict=True):
                    self._run_group([i], [request], out, batch)
                return
            i = indices[0]
            out["status"][i] = STATUS_ERROR
            out["error"][i] = f"generate: {failure}"
            return
        for i, image in zip(indices, images, strict=True):
            out["image_rgb"][i] = image.tobytes()
            out["generate_seconds"][i] = per_row
            out["uncond_embedding"][i] = (
                "negative_prompt" if batch["negative_prompt"][i] else self.pipe.uncond
            )
