"""The Serve deployments behind the `Ingress` (`k3batch.serve.ingress`): `Generator`s that
batch concurrent requests onto their model with `@serve.batch` (the app's `Generator` and
`InpaintGenerator`), the `Upscaler`, and the optional `Beautifier` (the client of an
OpenAI-compatible LLM server).
"""

import asyncio
import time
from typing import Literal

from ray import serve

from k3batch import schema
from k3batch.model import family
from k3batch.serve.config import ServeAppConfig


@serve.deployment
class Generator:
    """Holds one model; concurrent requests are batched into `GenerateStage` calls, which
    group rows by shape and kind and retry a failed group row by row (as the batch job)."""

    def __init__(self, cfg: dict, role: Literal["generate", "edit"] = "generate"):
        from k3batch.stages.generate import GenerateStage

        self.cfg = ServeAppConfig.model_validate(cfg)
        model = self.cfg.model if role == "generate" else self.cfg.inpaint_model
        deployment = self.cfg.generator if role == "generate" else self.cfg.inpaint_generator
        self.stage = GenerateStage(model, deployment.decode_batch_size)
        self.generate.set_max_batch_size(self.cfg.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # observed batch sizes, for tests and benchmarks

    def health(self) -> bool:
        return True

    def observed_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        self.batch_sizes.append(len(jobs))
        return await asyncio.to_thread(self._generate, jobs)

    def _generate(self, jobs: list[dict]) -> list[dict]:
        from k3batch.images import encode_rgb
        from k3batch.metrics import APP_SERVE, metrics

        start = time.perf_counter()
        # Optional columns when some job carries them (edits: source_rgb, keep_mask; a hint's
        # hint_rgb, a variation's mix_prepared): batched requests may differ in which.
        optional = (c for c in self.stage.optional if any(c in job for job in jobs))
        columns = [*self.stage.needs, *optional]
        out = self.stage({c: [job.get(c) for job in jobs] for c in columns})
        results = []
        for i, job in enumerate(jobs):
            if out[schema.STATUS][i] != schema.STATUS_OK:
                results.append({"error": out[schema.ERROR][i]})
            else:
                rgb = out[schema.IMAGE_RGB][i]
                png = encode_rgb(rgb, job[schema.WIDTH], job[schema.HEIGHT], "png")
                results.append({"png": png})
        recorder = metrics(APP_SERVE)
        failed = sum(1 for r in results if r.get("error"))
        recorder.rows("generate", len(jobs))
        recorder.images("generate", len(jobs) - failed)
        recorder.errors("generate", {"generate": failed})
        recorder.latency("generate", time.perf_counter() - start)
        return results


@serve.deployment
class Upscaler:
    """Holds one KandiSuperRes model; concurrent requests are batched into `UpscaleStage`
    calls (their windows share UNet calls), which retry a failed batch image by image."""

    def __init__(self, cfg: dict):
        from k3batch.stages.upscale import UpscaleStage

        app = ServeAppConfig.model_validate(cfg)
        self.stage = UpscaleStage(app.upscale, field="image")
        self.upscale.set_max_batch_size(app.upscale.batch_size)
        self.upscale.set_batch_wait_timeout_s(app.batching.batch_wait_timeout_s)

    def health(self) -> bool:
        return True

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def upscale(self, jobs: list[dict]) -> list[dict]:
        return await asyncio.to_thread(self._upscale, jobs)

    def _upscale(self, jobs: list[dict]) -> list[dict]:
        from k3batch.images import encode_rgb
        from k3batch.metrics import APP_SERVE, metrics

        start = time.perf_counter()
        out = self.stage({c: [job[c] for job in jobs] for c in self.stage.needs})
        results = []
        for i in range(len(jobs)):
            if out[schema.STATUS][i] != schema.STATUS_OK:
                results.append({"error": out[schema.ERROR][i]})
                continue
            w, h = out[schema.WIDTH][i], out[schema.HEIGHT][i]
            png = encode_rgb(out[schema.IMAGE_RGB][i], w, h, "png")
            results.append({"png": png, "width": w, "height": h})
        recorder = metrics(APP_SERVE)
        failed = sum(1 for r in results if r.get("error"))
        recorder.rows("upscale", len(jobs))
        recorder.images("upscale", len(jobs) - failed)
        recorder.errors("upscale", {"upscale": failed})
        recorder.latency("upscale", time.perf_counter() - start)
        return results


@serve.deployment
class Beautifier:
    """The LLM client of `beautify: true` requests, scaled apart from the generators."""

    def __init__(self, cfg: dict):
        from k3batch.beautify.choose import tokenizer_path
        from k3batch.serve.beautify import OnlineBeautifier

        app = ServeAppConfig.model_validate(cfg)
        self.beautifier = OnlineBeautifier(
            app.beautify,
            tokenizer_path(app.model),
            family.MEMBERS[app.model.name].max_prompt_tokens,
        )

    async def beautify(self, prompt: str, seed: int | None):
        return await self.beautifier.beautify(prompt, seed)
