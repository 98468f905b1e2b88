"""The FastAPI `Ingress` deployment speaking the OpenAI Images API; it checks a request,
builds its rows as the batch job does and hands them to the model deployments
(`k3batch.serve.deployments`).

    POST /v1/images/generations   text-to-image (OpenAI Images API + k3batch extensions,
                                  among them a Kandinsky 3 ControlNet `hint` when the
                                  model has `model.controlnet`, and `ip_images` image
                                  prompts when it has `model.ip_adapter`; the depth
                                  `hint` every request to Kandinsky 2.2 ControlNet depth
                                  brings)
    POST /v1/images/edits         inpainting (multipart image + mask); 404 unless an
                                  inpainting model is configured
    POST /v1/images/variations    new images of an uploaded image through Kandinsky 2.2's
                                  prior (image mixing with one image); 400 naming `model`
                                  on other members
    POST /v1/images/upscale       KandiSuperRes of an uploaded image (a k3batch extension;
                                  multipart image); 404 unless `upscale` is configured
    GET  /v1/models               the served models
    GET  /healthz                 200 once every generator has loaded its model, else 503
"""

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from k3batch import schema
from k3batch.model import family
from k3batch.rows.rules import RowRules
from k3batch.rows.seeds import MAX_SEED, pick_seed
from k3batch.serve.auth import authorize, load_api_keys
from k3batch.serve.checks import (
    check_common,
    check_conditioning,
    check_model,
    check_response_format,
    not_configured,
)
from k3batch.serve.config import ServeAppConfig
from k3batch.serve.protocol import (
    ApiError,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageUpscaleRequest,
    ImageVariationRequest,
    install_error_handlers,
    overloaded,
    parse_size,
    read_json,
    validated,
)
from k3batch.serve.request_rows import generation_images, request_row
from k3batch.serve.responses import images_response
from k3batch.serve.uploads import (
    edit_inputs,
    prepare_hint,
    prepare_images,
    prepare_ip_images,
    prepare_mix,
    read_form,
    upscale_input,
    variation_input,
)

# Everything the ingress's routes call is imported above the class: `serve.ingress` rebuilds
# the routes with the module's globals as they are when the class is defined.
fastapi_app = FastAPI(
    title="k3batch", description="Kandinsky 3 and 2.2 behind the OpenAI Images API"
)
install_error_handlers(fastapi_app)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(  # noqa: D107
        self, generator, cfg: dict, inpaint_generator=None, beautifier=None, upscaler=None
    ):
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.generator = generator
        self.inpaint_generator = inpaint_generator
        self.beautifier = beautifier
        self.upscaler = upscaler
        self.keys = load_api_keys(self.cfg)
        # The member resolves null steps/guidance to its own defaults; with model.controlnet,
        # rows take a `hint` and the control settings, with model.ip_adapter `ip_images` and
        # `ip_adapter_scale` (the model's row capabilities, as the batch job's).
        self.rules = RowRules.from_config(
            self.cfg.generation, self.cfg.limits, family.row_capabilities(self.cfg.model)
        )
        if self.cfg.inpaint_model is not None:
            self.inpaint_rules = RowRules.from_config(
                self.cfg.inpaint_generation,
                self.cfg.limits,
                family.row_capabilities(self.cfg.inpaint_model),
            )

    # -- routes -------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self):
        deployments = (self.generator, self.inpaint_generator, self.upscaler)
        replicas = [g for g in deployments if g is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(g.health.remote() for g in replicas)), 5)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": self.cfg.served_model_name}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        authorize(request, self.keys)
        names = [self.cfg.served_model_name]
        if self.cfg.inpaint_model is not None:
            names.append(self.cfg.inpaint_served_model_name)
        if self.cfg.upscale is not None:
            names.append(self.cfg.upscale_served_model_name)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "k3batch"}
                for name in names
            ],
        }

    @fastapi_app.post("/v1/images/edits")
    async def edits(self, request: Request):
        return await self._measured(self._edits(request))

    @fastapi_app.post("/v1/images/generations")
    async def generations(self, request: Request):
        return await self._measured(self._generations(request))

    @fastapi_app.post("/v1/images/variations")
    async def variations(self, request: Request):
        return await self._measured(self._variations(request))

    @fastapi_app.post("/v1/images/upscale")
    async def upscale(self, request: Request):
        return await self._measured(self._upscale(request))

    # -- request handling ---------------------------------------------------------------
    async def _measured(self, answer):
        from k3batch.metrics import APP_SERVE, metrics

        recorder = metrics(APP_SERVE)
        start = time.perf_counter()
        try:
            result = await answer
        except ApiError as e:
            recorder.errors("request", {e.param or e.code or e.type: 1})
            raise
        finally:
            recorder.latency("request", time.perf_counter() - start)
        recorder.rows("request", len(result["data"]))
        return result

    async def _generations(self, request: Request) -> dict:
        authorize(request, self.keys)
        data = await read_json(request, self.cfg.limits.max_request_bytes)
        req = validated(ImageGenerationRequest, data)
        check_common(req, self.cfg, self.cfg.served_model_name, self.beautifier is not None)
        check_conditioning(req, self.cfg.served_model_name, self.rules.capabilities)
        extra = await asyncio.to_thread(generation_images, req, self.cfg.limits.max_side)
        jobs, beautified = await self._jobs(req, self.rules, extra)
        # Decoded once per request and shared by its n rows (they differ by seed only).
        if schema.HINT in extra:
            hint_rgb = await asyncio.to_thread(
                prepare_hint, jobs[0], extra[schema.HINT], self.rules.capabilities
            )
            for job in jobs:
                job[schema.HINT_RGB] = hint_rgb
        if schema.IP_IMAGES in extra:
            prepared = await asyncio.to_thread(
                prepare_ip_images, jobs[0], extra[schema.IP_IMAGES], self.rules.capabilities
            )
            for job in jobs:
                job[schema.IP_IMAGES_PREPARED] = prepared
        results = await self._dispatch(self.generator, jobs)
        return images_response(req, jobs, results, beautified, self.cfg.output_uri)

    async def _edits(self, request: Request) -> dict:
        authorize(request, self.keys)
        if self.inpaint_generator is None:
            raise not_configured("inpainting")
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageEditRequest, fields)
        check_common(req, self.cfg, self.cfg.inpaint_served_model_name, self.beautifier is not None)
        # Image decoding and resizing stay off the event loop.
        image, mask = await asyncio.to_thread(edit_inputs, files)
        extra = {schema.IMAGE: image, schema.MASK: mask}
        jobs, beautified = await self._jobs(req, self.inpaint_rules, extra)
        prepared = await asyncio.to_thread(prepare_images, jobs[0], image, mask)
        for job in jobs:
            job.update(prepared)
        results = await self._dispatch(self.inpaint_generator, jobs)
        return images_response(req, jobs, results, beautified, self.cfg.output_uri)

    async def _variations(self, request: Request) -> dict:
        authorize(request, self.keys)
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageVariationRequest, fields)
        caps = self.rules.capabilities
        if not caps.mix:
            # The served model may be named as the request names it: this is its refusal.
            raise ApiError(
                400,
                f"model: variations come from {caps.takers['mix']}'s prior image embedding; "
                f"{self.cfg.served_model_name!r} ({caps.member.name}) cannot make them",
                param="model",
            )
        check_common(req, self.cfg, self.cfg.served_model_name, self.beautifier is not None)
        image = await asyncio.to_thread(variation_input, files)
        # A variation is a mix of one image at weight 1: the row's prompt is not used
        # (Kandinsky22 encodes the mix only), so a placeholder passes the row rules.
        extra = {schema.MIX: [{schema.MIX_IMAGE: image, schema.MIX_WEIGHT: 1.0}]}
        jobs, _ = await self._jobs(req, self.rules, extra, prompt="(image variation)")
        prepared = await asyncio.to_thread(
            prepare_mix, {**jobs[0], **extra}, self.rules.capabilities
        )
        for job in jobs:
            job[schema.PROMPT] = ""
            job[schema.MIX_PREPARED] = prepared
        results = await self._dispatch(self.generator, jobs)
        return images_response(req, jobs, results, None, self.cfg.output_uri)

    async def _upscale(self, request: Request) -> dict:
        from k3batch.model.superres.checkpoints import FLASH_SIDE_MULTIPLE
        from k3batch.stages.upscale import too_large

        authorize(request, self.keys)
        if self.upscaler is None:
            raise not_configured("upscaling")
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageUpscaleRequest, fields)
        check_model(req, self.cfg.upscale_served_model_name)
        check_response_format(req, self.cfg)
        image = await asyncio.to_thread(upscale_input, files)
        u = self.cfg.upscale
        h, w = image.shape[:2]
        reason = too_large(w, h, u.scale, u.max_output_side)
        if u.model == "flash-x2" and min(w, h) < FLASH_SIDE_MULTIPLE:
            # The model would refuse it in the replica: a 500 for the client's own input.
            reason = f"sides must be >= {FLASH_SIDE_MULTIPLE} px for flash-x2, got {w}x{h}"
        if reason:
            raise ApiError(400, f"image: {reason}", param="image")
        seed = pick_seed() if req.seed is None or req.seed == -1 else req.seed
        if not 0 <= seed <= MAX_SEED:
            raise ApiError(400, f"seed: must be -1 or in [0, 2**64), got {seed}", param="seed")
        job = {
            schema.ID: uuid.uuid4().hex,
            schema.IMAGE_RGB: image.tobytes(),
            schema.WIDTH: w,
            schema.HEIGHT: h,
            schema.SEED: seed,
            schema.STATUS: schema.STATUS_OK,
            schema.ERROR: None,
        }
        results = await self._dispatch(self.upscaler, [job], method="upscale")
        answer = images_response(req, [job], results, None, self.cfg.output_uri)
        item = answer["data"][0]
        item.pop("revised_prompt")
        item["width"], item["height"] = results[0]["width"], results[0]["height"]
        return answer

    async def _jobs(self, req, rules, extra=None, prompt=None) -> tuple[list[dict], Any]:
        """The request's n rows (after beautifying its prompt if asked), and the beautify
        result (None without beautify). `prompt`: the rows' prompt when the request has none
        (variations)."""
        width, height = parse_size(req.size) if req.size else (None, None)
        beautified = await self._beautify(req)
        if prompt is None:
            prompt = beautified.prompt_used if beautified else req.prompt
        jobs = [request_row(req, prompt, width, height, i, rules, extra) for i in range(req.n)]
        return jobs, beautified

    async def _beautify(self, req):
        if not getattr(req, "beautify", False):
            return None
        try:
            result = await asyncio.wait_for(
                self.beautifier.beautify.remote(req.prompt, req.seed),
                timeout=self.cfg.request_timeout_s,
            )
        except (serve.exceptions.BackPressureError, TimeoutError):
            raise overloaded(
                503, "the prompt beautifier is at capacity; retry later", self.cfg.retry_after_s
            ) from None
        if result.revised_prompt is None and self.cfg.beautify.on_error == "fail":
            raise overloaded(
                503,
                f"prompt beautification failed: {result.error or result.fallback}",
                self.cfg.retry_after_s,
            )
        return result

    async def _dispatch(self, generator, jobs: list[dict], method: str = "generate") -> list[dict]:
        call = getattr(generator, method)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(call.remote(job) for job in jobs)),
                timeout=self.cfg.request_timeout_s,
            )
        except serve.exceptions.BackPressureError:
            raise overloaded(
                429, "the server is at capacity; retry later", self.cfg.retry_after_s
            ) from None
        except TimeoutError:
            raise overloaded(
                503,
                f"request not served within {self.cfg.request_timeout_s:g} s",
                self.cfg.retry_after_s,
            ) from None
        failed = [r["error"] for r in results if r.get("error")]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0]}", type_="server_error")
        return results
