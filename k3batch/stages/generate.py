"""Generate images with a family member (Kandinsky 3 or 2.2): the model loads once per stage
instance."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from k3batch import schema
from k3batch.model import samplers
from k3batch.rows.records import record_hashes
from k3batch.schema import EMBEDDING_COLUMNS, PROMPT_EMBEDS
from k3batch.stages.base import SOURCE_ROWS, Stage, fail_row, ok_rows, start_output

if TYPE_CHECKING:
    from k3batch.config import ModelConfig

log = logging.getLogger(__name__)

POISONED_EXIT_CODE = 3  # a CUDA error poisoned the process (see _run_group)


class GenerateStage(Stage):
    needs = (
        schema.ID,
        schema.PROMPT,
        schema.NEGATIVE_PROMPT,
        schema.SEED,
        schema.WIDTH,
        schema.HEIGHT,
        schema.NUM_INFERENCE_STEPS,
        schema.GUIDANCE_SCALE,
        *schema.STATUS_COLUMNS,
    )
    optional = (
        schema.STRENGTH,
        schema.SCHEDULER,
        schema.SOURCE_RGB,
        schema.KEEP_MASK,
        schema.ROW_HASH,
        schema.NUM_IMAGES_PER_PROMPT,
        schema.IMAGE_SEEDS,
        schema.IMAGES_DONE,
        *EMBEDDING_COLUMNS,
        *schema.K22_OVERRIDE_COLUMNS,
        *schema.CONTROLNET_COLUMNS,
        schema.HINT_RGB,
        schema.MIX_PREPARED,
        schema.IP_IMAGES_PREPARED,
        schema.IP_ADAPTER_SCALE,
    )
    # One output row (record) per image: a row with num_images_per_prompt = N gives N,
    # less those an earlier run committed (`images_done`, on resume).
    adds = schema.types(
        schema.IMAGE_RGB,
        *schema.STATUS_COLUMNS,
        *schema.RECORD_COLUMNS,
        schema.GENERATE_SECONDS,
        schema.MODEL,
        schema.UNCOND_EMBEDDING,
    )
    # The embeddings are ~1 MB a row with the real T5: used here, never written out.
    drops = (
        schema.SOURCE_RGB,
        schema.KEEP_MASK,
        schema.IMAGE_SEEDS,
        schema.IMAGES_DONE,
        *EMBEDDING_COLUMNS,
        schema.HINT_RGB,
        schema.MIX_PREPARED,
        schema.IP_IMAGES_PREPARED,
    )

    def __init__(
        self,
        model: ModelConfig,
        decode_batch_size: int = 1,
        torch_threads: int | None = None,
        prompt_column: str = schema.PROMPT,
        text_encoder_pool: bool = False,
        journal=None,
        max_crashes_per_row: int = 2,
        warmup: dict | None = None,
        max_images_per_call: int | None = None,
    ):
        """`warmup`: {width, height, batch_size} of a throwaway first batch, run at start when
        the model is compiled (`model.performance.compile.warmup`). `max_images_per_call`:
        images per model call (`resources.batch_size`; rows with several images would
        otherwise multiply it); None: a batch's rows of one kind at once."""
        from k3batch import crashes, gpus

        self.journal = crashes.JournalClient(journal)
        self.max_crashes_per_row = max_crashes_per_row
        self.max_images_per_call = max_images_per_call
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        from k3batch.model import family

        self.family = family.of(model.name)
        self.model_name = self.family.label(model)
        # `prompt_used` when beautification chose the text; `prompt` stays the original.
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == schema.PROMPT else c for c in type(self).needs)
        # With the text encoder pool, rows carry their prompt embeddings and T5 stays out
        # of this actor's memory.
        self.text_encoder_pool = text_encoder_pool
        if text_encoder_pool:
            from k3batch.model.loading import DTYPES

            self.embeds_dtype = DTYPES[model.dtype.text_encoder]
        gpus.check_cuda("generation", model.device_map())
        self.pipe = self.load_model(model, decode_batch_size, text_encoder=not text_encoder_pool)
        gpus.report_devices(journal, gpus.device_record("generation", self.model_components()))
        compile = model.performance.compile
        self.warmup_seconds = None
        if warmup and compile.warmup and (compile.unet or compile.movq):
            from k3batch.model import compiling

            artifacts = None
            if compile.cache_dir and compile.artifacts:
                # Another actor's (or node's) generated kernels, loaded before compiling.
                what = {"model": model.model_dump(mode="json"), "warmup": warmup}
                artifacts = compiling.artifacts_file(compile.cache_dir, what)
                if compiling.load_artifacts(artifacts):
                    artifacts = None
            # Compiling on the first real batch would hold that batch (and the progress
            # line) for minutes; the actor is not ready until its model is.
            with compiling.recording_artifacts():
                self.warmup_seconds = self.pipe.warm_up(**warmup)
                if artifacts:
                    compiling.save_artifacts(artifacts)
            log.info("generate: compiled and warmed up in %.1f s", self.warmup_seconds)

    def load_model(self, model: ModelConfig, decode_batch_size: int, text_encoder: bool):
        """The pipeline this stage calls (`generate(requests)`). An override point:
        `k3batch.testing.standin` puts an instant stand-in here for the scale benchmark."""
        return self.family.load(model, decode_batch_size, text_encoder=text_encoder)

    def model_components(self) -> dict:
        """The loaded modules by component name (run.json's device record)."""
        return self.family.loaded_components(self.pipe)

    # Override points (no-ops here): `k3batch.testing.faults` injects faults through them.
    def before_batch(self) -> None:
        """Called as each batch arrives."""

    def before_generate(self, prompts: list) -> None:
        """Called before each model call, with its rows' prompts."""

    def _request(self, batch, i):
        import numpy as np

        from k3batch.model.request import Request

        def optional(name):
            values = batch.get(name)
            return None if values is None else values[i]

        def rgb_array(raw, height, width):
            return None if raw is None else np.frombuffer(raw, np.uint8).reshape(height, width, 3)

        w, h = batch[schema.WIDTH][i], batch[schema.HEIGHT][i]
        rgb, keep = optional(schema.SOURCE_RGB), optional(schema.KEEP_MASK)
        mix = optional(schema.MIX_PREPARED)
        if mix is not None:
            mix = [
                (
                    item["prompt"]
                    if item["rgb"] is None
                    else rgb_array(item["rgb"], item["height"], item["width"]),
                    item["weight"],
                )
                for item in mix
            ]
        ip_images = optional(schema.IP_IMAGES_PREPARED)
        if ip_images is not None:
            ip_images = [
                (rgb_array(item["rgb"], item["height"], item["width"]), item["weight"])
                for item in ip_images
            ]
        ip_scale = optional(schema.IP_ADAPTER_SCALE)
        return Request(
            prompt=batch[self.prompt_column][i],
            negative_prompt=batch[schema.NEGATIVE_PROMPT][i],
            seed=batch[schema.SEED][i],
            width=w,
            height=h,
            num_inference_steps=batch[schema.NUM_INFERENCE_STEPS][i],
            guidance_scale=batch[schema.GUIDANCE_SCALE][i],
            image=rgb_array(rgb, h, w),
            mask=None if keep is None else np.frombuffer(keep, np.float32).reshape(h, w),
            strength=optional(schema.STRENGTH),
            scheduler=optional(schema.SCHEDULER) or samplers.REFERENCE,
            text=self._embedding(batch, i) if self.text_encoder_pool else None,
            prior_num_inference_steps=optional(schema.PRIOR_NUM_INFERENCE_STEPS),
            prior_guidance_scale=optional(schema.PRIOR_GUIDANCE_SCALE),
            hint=rgb_array(optional(schema.HINT_RGB), h, w),
            **{
                c: optional(c)
                for c in schema.CONTROLNET_COLUMNS
                if optional(c) is not None  # Request's defaults are the fork's
            },
            mix=mix,
            ip_images=ip_images,
            ip_adapter_scale=1.0 if ip_scale is None else ip_scale,
        )

    def _embedding(self, batch, i):
        from k3batch.model.kandinsky3 import text

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

        records = self._records(batch)
        source = [i for i, _ in records]
        # One entry per record (image): the row's columns, the image's own seed and index.
        batch = {name: [values[i] for i in source] for name, values in batch.items()}
        batch[schema.K] = [k for _, k in records]
        row_seeds = batch.get(schema.IMAGE_SEEDS)
        batch[schema.SEED] = [
            seeds[k] if seeds else (None if seed is None else seed + k)
            for seed, seeds, k in zip(
                batch[schema.SEED], row_seeds or [None] * len(records), batch[schema.K], strict=True
            )
        ]
        n = len(records)
        # row_hash is unique per input row (ids may repeat in a bad table).
        row_keys = batch.get(schema.ROW_HASH) or batch[schema.ID]
        record_keys = [
            key if k == 0 else f"{key}/{k}"
            for key, k in zip(row_keys, batch[schema.K], strict=True)
        ]
        batch_key = crashes.key(record_keys)
        crashed = self.journal.start(batch_key)
        self.before_batch()
        out = self._generate(
            batch, source, [crashes.key([k]) for k in record_keys] if crashed else None
        )
        self.journal.end(batch_key)
        out[schema.K] = batch[schema.K]
        out[schema.SEED] = batch[schema.SEED]
        hashes = batch.get(schema.ROW_HASH)
        out[schema.RECORD_HASH] = (
            record_hashes(hashes, batch[schema.K]).tolist() if hashes else [None] * n
        )
        out[SOURCE_ROWS] = source
        return out

    @staticmethod
    def _records(batch) -> list[tuple[int, int]]:
        """(row, k) of each image the batch's rows still need: N per row (1 for a row whose
        N is bad: its error record), less those an earlier run committed."""
        n = len(batch[schema.ID])
        counts = batch.get(schema.NUM_IMAGES_PER_PROMPT) or [None] * n
        done = batch.get(schema.IMAGES_DONE) or [None] * n
        return [
            (i, k)
            for i in range(n)
            for k in range(counts[i] or 1)
            if not done[i] or k not in done[i]
        ]

    def _generate(self, batch, source: list[int], isolate: list[str] | None) -> dict[str, list]:
        """The batch's results, one per record; `source`: each record's input row.
        `isolate` (record keys) after a worker died running it: then each record runs alone
        and is journaled, and one that crashed workers too often fails."""
        out = start_output(batch, self.adds)
        out[schema.MODEL] = [self.model_name] * len(source)
        texts = self._shared_texts(batch, out, source)
        # Rows of different size, step count or kind never share a forward pass.
        groups: dict[tuple, list] = defaultdict(list)
        for i in ok_rows(out):
            try:
                request = self._request(batch, i)
            except Exception as e:  # noqa: BLE001 - a malformed prepared row is its own error
                fail_row(out, i, "generate", e)
                continue
            if texts is not None:
                request.text = texts[i]
            groups[self.pipe.group_key(request)].append((i, request))
        if isolate is not None:
            alone = [m for members in groups.values() for m in members]
            log.warning(
                "a worker died while generating this batch; retrying its %d images one at a time",
                len(alone),
            )
            for i, request in alone:
                deaths = self.journal.start(isolate[i])
                if deaths >= self.max_crashes_per_row:
                    fail_row(
                        out,
                        i,
                        "generate",
                        "the worker process died while generating this row alone, "
                        f"{deaths} time(s) (faults.max_crashes_per_row={self.max_crashes_per_row})",
                    )
                else:
                    self._run_group([i], [request], out, batch)
                self.journal.end(isolate[i])
            return out
        step = self.max_images_per_call or max((len(m) for m in groups.values()), default=1)
        for members in groups.values():
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                self._run_group([i for i, _ in chunk], [r for _, r in chunk], out, batch)
        return out

    def _shared_texts(self, batch, out, source: list[int]) -> dict | None:
        """Record -> prompt embedding when a row has several images here: each row's prompt
        is encoded once and its images share it (None: the model encodes per call)."""
        ok = ok_rows(out)
        # Kandinsky 2.2 encodes in its prior, per call: there is no shared encoding to reuse.
        if self.text_encoder_pool or not ok or not getattr(self.pipe, "shares_text_encoding", True):
            return None
        firsts: dict = {}  # input row -> its first record here
        for i in ok:
            firsts.setdefault(source[i], i)
        if len(firsts) == len(ok):
            return None
        rows_ = list(firsts.values())
        try:
            embeddings = self.pipe.embed(
                [batch[self.prompt_column][i] for i in rows_],
                [batch[schema.NEGATIVE_PROMPT][i] for i in rows_],
            )
        except Exception as e:  # noqa: BLE001 - the model call below retries per record
            log.warning("encoding %d prompts failed (%s); encoding per call", len(rows_), e)
            return None
        by_row = dict(zip(firsts, embeddings, strict=True))
        return {i: by_row[source[i]] for i in ok}

    def _run_group(self, indices, requests, out, batch) -> None:
        from k3batch.model import performance

        failure = None
        try:
            start = time.perf_counter()
            self.before_generate([r.prompt for r in requests])
            images = self.pipe.generate(requests)
            per_row = (time.perf_counter() - start) / len(indices)
        except Exception as e:  # noqa: BLE001 - any failure becomes row errors, never a job crash
            if performance.poisons_process(e):
                # Every later batch of this process would fail too. Ending the process lets
                # Ray start a fresh actor and retry the batch; the crash journal then runs its
                # rows one by one and fails only a row that keeps killing workers.
                log.error("generate: %s; ending this worker so Ray replaces it", e)
                os._exit(POISONED_EXIT_CODE)
            failure = f"{type(e).__name__}: {e}"  # text: the exception would keep tensors
        if failure is not None:
            # Retried out of the except block, once the failed call's tensors are released.
            performance.release_cached_memory(self.pipe.device)
            if len(indices) > 1:
                # One bad row must not cost its batch-mates: retry each row on its own.
                log.warning("batch of %d failed (%s); retrying row by row", len(indices), failure)
                for i, request in zip(indices, requests, strict=True):
                    self._run_group([i], [request], out, batch)
                return
            fail_row(out, indices[0], "generate", failure)
            return
        for i, image in zip(indices, images, strict=True):
            out[schema.IMAGE_RGB][i] = image.tobytes()
            out[schema.GENERATE_SECONDS][i] = per_row
            out[schema.UNCOND_EMBEDDING][i] = (
                "negative_prompt" if batch[schema.NEGATIVE_PROMPT][i] else self.pipe.uncond
            )
