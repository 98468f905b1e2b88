"""The Serve deployments: the FastAPI `Ingress` speaking the OpenAI Images API, `Generator`s
that batch concurrent requests onto their model with `@serve.batch`, and the optional
`Beautifier` (the client of an OpenAI-compatible LLM server).

    POST /v1/images/generations   text-to-image (OpenAI Images API + k3batch extensions,
                                  among them a Kandinsky 3 ControlNet `hint` when the
                                  model has `model.controlnet`, and `ip_images` image
                                  prompts when it has `model.ip_adapter`)
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
import base64
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from k3batch import rows, schema, storage
from k3batch.model import family
from k3batch.serve.auth import authorize, load_api_keys
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
    row_error,
    validated,
)
from k3batch.serve.uploads import (
    b64_image,
    edit_inputs,
    prepare_hint,
    prepare_images,
    prepare_ip_images,
    prepare_mix,
    read_form,
    upscale_input,
    variation_input,
)


def not_configured(what: str) -> ApiError:
    """The 404 of an endpoint whose model the app config leaves out."""
    return ApiError(
        404,
        f"no {what} model is configured on this server",
        type_="not_found",
        code="model_not_found",
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
        # The model name resolves null steps/guidance to the member's own defaults; with
        # model.controlnet, rows take a `hint` and the control settings, with
        # model.ip_adapter `ip_images` and `ip_adapter_scale`.
        self.controlnet = self.cfg.model.controlnet is not None
        self.ip_adapter = self.cfg.model.ip_adapter is not None
        self.rules = rows.RowRules.from_config(
            self.cfg.generation,
            self.cfg.limits,
            self.cfg.model.name,
            controlnet=self.controlnet,
            ip_adapter=self.ip_adapter,
        )
        self.member = family.MEMBERS[self.cfg.model.name]
        if self.cfg.inpaint_model is not None:
            self.inpaint_rules = rows.RowRules.from_config(
                self.cfg.inpaint_generation, self.cfg.limits, self.cfg.inpaint_model.name
            )
            self.inpaint_member = family.MEMBERS[self.cfg.inpaint_model.name]

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
        self._check_common(req, self.cfg.served_model_name, self.member)
        self._check_conditioning(req)
        extra = await asyncio.to_thread(self._generation_images, req)
        jobs, beautified = await self._jobs(req, self.rules, extra)
        # Decoded once per request and shared by its n rows (they differ by seed only).
        if schema.HINT in extra:
            hint_rgb = await asyncio.to_thread(prepare_hint, jobs[0], extra[schema.HINT])
            for job in jobs:
                job[schema.HINT_RGB] = hint_rgb
        if schema.IP_IMAGES in extra:
            prepared = await asyncio.to_thread(prepare_ip_images, jobs[0], extra[schema.IP_IMAGES])
            for job in jobs:
                job[schema.IP_IMAGES_PREPARED] = prepared
        results = await self._dispatch(self.generator, jobs)
        return self._answer(req, jobs, results, beautified)

    async def _edits(self, request: Request) -> dict:
        authorize(request, self.keys)
        if self.inpaint_generator is None:
            raise not_configured("inpainting")
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageEditRequest, fields)
        self._check_common(req, self.cfg.inpaint_served_model_name, self.inpaint_member)
        # Image decoding and resizing stay off the event loop.
        image, mask = await asyncio.to_thread(edit_inputs, files)
        extra = {schema.IMAGE: image, schema.MASK: mask}
        jobs, beautified = await self._jobs(req, self.inpaint_rules, extra)
        prepared = await asyncio.to_thread(prepare_images, jobs[0], image, mask)
        for job in jobs:
            job.update(prepared)
        results = await self._dispatch(self.inpaint_generator, jobs)
        return self._answer(req, jobs, results, beautified)

    async def _variations(self, request: Request) -> dict:
        authorize(request, self.keys)
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageVariationRequest, fields)
        if self.member.name != family.K22:
            # The served model may be named as the request names it: this is its refusal.
            raise ApiError(
                400,
                f"model: variations come from {family.K22}'s prior image embedding; "
                f"{self.cfg.served_model_name!r} ({self.member.name}) cannot make them",
                param="model",
            )
        self._check_common(req, self.cfg.served_model_name, self.member)
        image = await asyncio.to_thread(variation_input, files)
        # A variation is a mix of one image at weight 1: the row's prompt is not used
        # (Kandinsky22 encodes the mix only), so a placeholder passes the row rules.
        extra = {schema.MIX: [{schema.MIX_IMAGE: image, schema.MIX_WEIGHT: 1.0}]}
        jobs, _ = await self._jobs(req, self.rules, extra, prompt="(image variation)")
        prepared = await asyncio.to_thread(prepare_mix, {**jobs[0], **extra})
        for job in jobs:
            job[schema.PROMPT] = ""
            job[schema.MIX_PREPARED] = prepared
        results = await self._dispatch(self.generator, jobs)
        return self._answer(req, jobs, results, None)

    async def _upscale(self, request: Request) -> dict:
        from k3batch.stages.upscale import too_large

        authorize(request, self.keys)
        if self.upscaler is None:
            raise not_configured("upscaling")
        fields, files = await read_form(request, self.cfg.limits.max_upload_bytes)
        req = validated(ImageUpscaleRequest, fields)
        self._check_model(req, self.cfg.upscale_served_model_name)
        self._check_response_format(req)
        image = await asyncio.to_thread(upscale_input, files)
        u = self.cfg.upscale
        h, w = image.shape[:2]
        reason = too_large(w, h, u.scale, u.max_output_side)
        if reason:
            raise ApiError(400, f"image: {reason}", param="image")
        seed = rows.pick_seed() if req.seed is None or req.seed == -1 else req.seed
        if not 0 <= seed <= rows.MAX_SEED:
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
        answer = self._answer(req, [job], results, None)
        item = answer["data"][0]
        item.pop("revised_prompt")
        item["width"], item["height"] = results[0]["width"], results[0]["height"]
        return answer

    def _check_model(self, req, served_name: str) -> None:
        if req.model not in (None, served_name):
            raise ApiError(
                404,
                f"model {req.model!r} is not served here (try {served_name!r})",
                type_="not_found",
                param="model",
                code="model_not_found",
            )

    def _check_response_format(self, req) -> None:
        if req.response_format == "url" and not self.cfg.output_uri:
            raise ApiError(
                400,
                "response_format 'url' needs an output bucket; use b64_json",
                param="response_format",
            )

    def _check_common(self, req, served_name: str, member) -> None:
        self._check_model(req, served_name)
        if member.family != family.KANDINSKY22:
            for name in (schema.PRIOR_NUM_INFERENCE_STEPS, schema.PRIOR_GUIDANCE_SCALE):
                if getattr(req, name) is not None:
                    raise ApiError(
                        400,
                        f"{name}: only Kandinsky 2.2 members have a prior, not "
                        f"{served_name!r} ({member.name})",
                        param=name,
                    )
        if not 1 <= req.n <= self.cfg.limits.max_n:
            raise ApiError(
                400, f"n must be in [1, {self.cfg.limits.max_n}], got {req.n}", param="n"
            )
        self._check_response_format(req)
        if getattr(req, "beautify", False) and self.beautifier is None:
            raise ApiError(400, "beautify is not configured on this server", param="beautify")

    def _generation_images(self, req) -> dict:
        """The request's base64 images (`hint`, `ip_images[j].image`) as bytes, in the row's
        columns; the row rules and the prepare stage then check them as a batch row's (off
        the event loop: decoding)."""
        max_side = self.cfg.limits.max_side
        extra = {}
        if req.hint is not None:
            extra[schema.HINT] = b64_image(schema.HINT, req.hint, max_side)
        if req.ip_images is not None:
            extra[schema.IP_IMAGES] = [
                {
                    schema.IP_IMAGE: b64_image(f"{schema.IP_IMAGES}[{j}].image", p.image, max_side),
                    schema.IP_WEIGHT: p.weight,
                }
                for j, p in enumerate(req.ip_images)
            ]
        return extra

    def _check_conditioning(self, req) -> None:
        """The ControlNet and IP-Adapter fields need a model served with model.controlnet /
        model.ip_adapter: a 400 naming the first one given otherwise, saying why."""
        for on, config, what, names in (
            (
                self.controlnet,
                "controlnet",
                "ControlNet",
                (schema.HINT, *schema.CONTROLNET_COLUMNS),
            ),
            (self.ip_adapter, "ip_adapter", "IP-Adapter", schema.IP_ADAPTER_COLUMNS),
        ):
            given = [n for n in names if getattr(req, n) is not None]
            if on or not given:
                continue
            name, served = given[0], self.cfg.served_model_name
            if self.member.name == family.BASE:
                why = f"{served!r} is served without model.{config}"
            else:
                why = f"it works with {family.BASE} only, not {served!r} ({self.member.name})"
            raise ApiError(400, f"{name}: needs the Kandinsky 3 {what}, but {why}", param=name)

    async def _jobs(self, req, rules, extra=None, prompt=None) -> tuple[list[dict], Any]:
        """The request's n rows (after beautifying its prompt if asked), and the beautify
        result (None without beautify). `prompt`: the rows' prompt when the request has none
        (variations)."""
        width, height = parse_size(req.size) if req.size else (None, None)
        beautified = await self._beautify(req)
        if prompt is None:
            prompt = beautified.prompt_used if beautified else req.prompt
        jobs = [self._row(req, prompt, width, height, i, rules, extra) for i in range(req.n)]
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

    def _answer(self, req, jobs: list[dict], results: list[dict], beautified) -> dict:
        data = []
        revised = beautified.revised_prompt if beautified else None
        for job, result in zip(jobs, results, strict=True):
            item: dict[str, Any] = {"revised_prompt": revised, "seed": job[schema.SEED]}
            if req.response_format == "url":
                item["url"] = self._store(result["png"])
            else:
                item["b64_json"] = base64.b64encode(result["png"]).decode()
            data.append(item)
        return {"created": int(time.time()), "data": data}

    def _row(self, req, prompt: str, width, height, i: int, rules, extra=None) -> dict:
        raw = {
            schema.ID: uuid.uuid4().hex,
            schema.PROMPT: prompt,
            schema.NEGATIVE_PROMPT: req.negative_prompt,
            # n images of one request: seed, seed+1, ... so each is reproducible on its own.
            schema.SEED: None if req.seed is None else req.seed + i,
            schema.WIDTH: width,
            schema.HEIGHT: height,
            schema.NUM_INFERENCE_STEPS: req.num_inference_steps,
            schema.GUIDANCE_SCALE: req.guidance_scale,
            schema.SCHEDULER: getattr(req, "scheduler", None),
            schema.PRIOR_NUM_INFERENCE_STEPS: req.prior_num_inference_steps,
            schema.PRIOR_GUIDANCE_SCALE: req.prior_guidance_scale,
            # Generations only (the ControlNet's and IP-Adapter's settings; null elsewhere).
            **{
                c: getattr(req, c, None)
                for c in (*schema.CONTROLNET_COLUMNS, schema.IP_ADAPTER_SCALE)
            },
            **(extra or {}),
        }
        row = rows.normalise_row(raw, schema.PROMPT, rules)
        if row[schema.STATUS] != schema.STATUS_OK:
            raise row_error(row[schema.ERROR])
        return row

    def _store(self, png: bytes) -> str:
        name = f"{time.strftime('%Y%m%d')}/{uuid.uuid4().hex}.png"
        uri = storage.join(self.cfg.output_uri, name)
        fs, path = storage.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, png)
        try:
            return fs.url(path, expires=3600)  # presigned HTTPS URL on object stores
        except (AttributeError, NotImplementedError, TypeError):
            return uri


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
