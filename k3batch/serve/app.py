"""Ray Serve application: a FastAPI ingress speaking the OpenAI Images API, generator
deployments that batch concurrent requests onto their model with `@serve.batch`, and an
optional beautifier deployment (the client of an OpenAI-compatible LLM server).

    POST /v1/images/generations   text-to-image (OpenAI Images API + k3batch extensions)
    POST /v1/images/edits         inpainting (multipart image + mask); 404 unless an
                                  inpainting model is configured
    GET  /v1/models               the served models
    GET  /healthz                 200 once every generator has loaded its model, else 503
"""

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from k3batch import rows, schema, storage
from k3batch.config import format_validation_error
from k3batch.serve.config import GeneratorDeploymentConfig, ServeAppConfig

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ImageEditRequest(BaseModel):
    """OpenAI `POST /v1/images/edits` form fields (image and mask are files) plus k3batch's
    extensions. Form values arrive as text; pydantic parses the numbers."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None
    quality: str | None = None  # accepted for client compatibility; not used
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    beautify: bool = False


class ImageGenerationRequest(ImageEditRequest):
    """OpenAI `POST /v1/images/generations` body: the edits fields, as JSON, plus `style`."""

    style: str | None = None  # accepted for client compatibility; not used


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(400, f"size must look like '1024x1024', got {size!r}", param="size")
    return int(width), int(height)


def load_api_keys(cfg: ServeAppConfig) -> list[str]:
    keys: list[str] = []
    if cfg.auth.api_keys_env:
        keys += [
            k.strip() for k in os.environ.get(cfg.auth.api_keys_env, "").split(",") if k.strip()
        ]
    if cfg.auth.api_keys_file:
        with open(cfg.auth.api_keys_file) as f:
            keys += [line.strip() for line in f if line.strip()]
    if (cfg.auth.api_keys_env or cfg.auth.api_keys_file) and not keys:
        raise ValueError("auth is configured but no API key was found")
    return keys


# Helpers the ingress's routes call live above the class: `serve.ingress` rebuilds the
# routes with the module's globals as they are when the class is defined.
def _validated(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(
            400, format_validation_error(e), param=".".join(map(str, first["loc"]))
        ) from None


def _one_file(files: dict, name: str, required: bool) -> bytes | None:
    found = files.get(name, [])
    if len(found) > 1:
        raise ApiError(400, f"{name}: one file expected, got {len(found)}", param=name)
    if not found:
        if required:
            raise ApiError(400, f"{name}: missing (upload it as a file)", param=name)
        return None
    if not found[0]:
        raise ApiError(400, f"{name}: empty file", param=name)
    return found[0]


def _open_upload(name: str, data: bytes):
    from k3batch.images import open_image

    try:
        return open_image(data)
    except Exception as e:  # noqa: BLE001 - undecodable uploads are the client's error
        raise ApiError(
            400, f"{name}: not a readable image ({len(data)} bytes): {type(e).__name__}", param=name
        ) from None


def repaint_mask(mask) -> Any:
    """The repaint area of an edits mask as a k3batch mask image (white = repaint).

    OpenAI's rule: the fully transparent pixels (alpha 0) of the mask (or, without a mask,
    of the image) are edited. A mask without an alpha channel is read as k3batch's batch
    masks are: white (grey >= 128) = repaint.
    """
    import numpy as np
    from PIL import Image

    from k3batch.images import MASK_THRESHOLD

    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        repaint = alpha == 0
    else:
        repaint = np.asarray(mask.convert("L")) >= MASK_THRESHOLD
    return Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), mode="L")


def _edit_inputs(files: dict) -> tuple[bytes, bytes]:
    """(image PNG, mask PNG) as k3batch's rows take them, from the uploaded files."""
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unexpected file field", param=unknown[0])
    image_bytes = _one_file(files, "image", required=True)
    mask_bytes = _one_file(files, "mask", required=False)
    image = _open_upload("image", image_bytes)
    if mask_bytes is None:
        if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
            raise ApiError(
                400,
                "mask: missing, and the image has no transparent pixels to edit; upload a "
                "mask (transparent or white = repaint) or an image with an alpha channel",
                param="mask",
            )
        mask = image
    else:
        mask = _open_upload("mask", mask_bytes)
    buf = io.BytesIO()
    repaint_mask(mask).save(buf, format="PNG")
    return image_bytes, buf.getvalue()


def _prepare_images(job: dict, image: bytes, mask: bytes) -> dict:
    """The image and mask read and sized exactly as the batch job's prepare stage does."""
    from k3batch.stages.prepare import PrepareImagesStage

    batch = {k: [job[k]] for k in ("id", "width", "height", "status", "error")}
    batch.update(image=[image], mask=[mask])
    out = PrepareImagesStage()(batch)
    if out["status"][0] != schema.STATUS_OK:
        error = out["error"][0]
        field = error.split(":", 1)[0]
        raise ApiError(400, error, param="size" if field in ("width", "height") else field)
    return {
        "width": out["width"][0],
        "height": out["height"][0],
        "source_rgb": out["source_rgb"][0],
        "keep_mask": out["keep_mask"][0],
    }


fastapi_app = FastAPI(title="k3batch", description="Kandinsky 3 behind the OpenAI Images API")


@fastapi_app.exception_handler(ApiError)
async def _api_error(_request, exc: ApiError):
    return exc.response()


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), type_=kind).response()


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_request, exc: RequestValidationError):
    return ApiError(422, str(exc.errors()[:3])).response()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, generator, cfg: dict, inpaint_generator=None, beautifier=None):  # noqa: D107
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.generator = generator
        self.inpaint_generator = inpaint_generator
        self.beautifier = beautifier
        self.keys = load_api_keys(self.cfg)
        # The model name resolves null steps/guidance to the member's own defaults.
        self.rules = rows.RowRules.from_config(
            self.cfg.generation, self.cfg.limits, self.cfg.model.name
        )
        if self.cfg.inpaint_model is not None:
            self.inpaint_rules = rows.RowRules.from_config(
                self.cfg.inpaint_generation, self.cfg.limits, self.cfg.inpaint_model.name
            )

    # -- helpers ------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token, key) for key in self.keys):
            raise ApiError(
                401,
                "invalid or missing API key",
                type_="authentication_error",
                code="invalid_api_key",
            )

    async def _json(self, request: Request) -> dict:
        limit = self.cfg.limits.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def _busy(self, status: int, message: str) -> ApiError:
        return ApiError(
            status,
            message,
            type_="server_error",
            code="overloaded",
            headers={"Retry-After": str(self.cfg.retry_after_s)},
        )

    # -- routes -------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self):
        replicas = [g for g in (self.generator, self.inpaint_generator) if g is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(g.health.remote() for g in replicas)), 5)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": self.cfg.served_model_name}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        names = [self.cfg.served_model_name]
        if self.cfg.inpaint_model is not None:
            names.append(self.cfg.inpaint_served_model_name)
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
        self._authorize(request)
        req = _validated(ImageGenerationRequest, await self._json(request))
        self._check_common(req, self.cfg.served_model_name)
        width, height = parse_size(req.size) if req.size else (None, None)
        beautified = await self._beautify(req)
        prompt = beautified.prompt_used if beautified else req.prompt
        jobs = [self._row(req, prompt, width, height, i, self.rules) for i in range(req.n)]
        results = await self._dispatch(self.generator, jobs)
        return self._answer(req, jobs, results, beautified)

    async def _edits(self, request: Request) -> dict:
        self._authorize(request)
        if self.inpaint_generator is None:
            raise ApiError(
                404,
                "no inpainting model is configured on this server",
                type_="not_found",
                code="model_not_found",
            )
        fields, files = await self._form(request)
        req = _validated(ImageEditRequest, fields)
        self._check_common(req, self.cfg.inpaint_served_model_name)
        # Image decoding and resizing stay off the event loop.
        image, mask = await asyncio.to_thread(_edit_inputs, files)
        width, height = parse_size(req.size) if req.size else (None, None)
        beautified = await self._beautify(req)
        prompt = beautified.prompt_used if beautified else req.prompt
        extra = {"image": image, "mask": mask}
        jobs = [
            self._row(req, prompt, width, height, i, self.inpaint_rules, extra)
            for i in range(req.n)
        ]
        prepared = await asyncio.to_thread(_prepare_images, jobs[0], image, mask)
        for job in jobs:
            job.update(prepared)
        results = await self._dispatch(self.inpaint_generator, jobs)
        return self._answer(req, jobs, results, beautified)

    def _check_common(self, req, served_name: str) -> None:
        if req.model not in (None, served_name):
            raise ApiError(
                404,
                f"model {req.model!r} is not served here (try {served_name!r})",
                type_="not_found",
                param="model",
                code="model_not_found",
            )
        if not 1 <= req.n <= self.cfg.limits.max_n:
            raise ApiError(
                400, f"n must be in [1, {self.cfg.limits.max_n}], got {req.n}", param="n"
            )
        if req.response_format == "url" and not self.cfg.output_uri:
            raise ApiError(
                400,
                "response_format 'url' needs an output bucket; use b64_json",
                param="response_format",
            )
        if req.beautify and self.beautifier is None:
            raise ApiError(400, "beautify is not configured on this server", param="beautify")

    async def _form(self, request: Request) -> tuple[dict, dict]:
        """A multipart body as (text fields, uploaded files' bytes), size-bounded."""
        limit = self.cfg.limits.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                400, "/v1/images/edits takes multipart/form-data (image, mask, prompt, ...)"
            )
        try:
            form = await request.form(max_files=4, max_fields=32, max_part_size=limit)
        except Exception as e:  # noqa: BLE001 - any malformed multipart body is a client error
            raise ApiError(400, f"malformed multipart body: {e}") from None
        fields: dict[str, Any] = {}
        files: dict[str, list[bytes]] = defaultdict(list)
        size = 0
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an upload
                data = await value.read()
                size += len(data)
                files[key.removesuffix("[]")].append(data)
            else:
                fields[key] = value
        if size > limit:
            raise ApiError(413, f"uploaded files are larger than {limit} bytes")
        return fields, files

    async def _beautify(self, req):
        if not req.beautify:
            return None
        try:
            result = await asyncio.wait_for(
                self.beautifier.beautify.remote(req.prompt, req.seed),
                timeout=self.cfg.request_timeout_s,
            )
        except (serve.exceptions.BackPressureError, TimeoutError):
            raise self._busy(503, "the prompt beautifier is at capacity; retry later") from None
        if result.revised_prompt is None and self.cfg.beautify.on_error == "fail":
            raise self._busy(
                503, f"prompt beautification failed: {result.error or result.fallback}"
            )
        return result

    async def _dispatch(self, generator, jobs: list[dict]) -> list[dict]:
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(generator.generate.remote(job) for job in jobs)),
                timeout=self.cfg.request_timeout_s,
            )
        except serve.exceptions.BackPressureError:
            raise self._busy(429, "the server is at capacity; retry later") from None
        except TimeoutError:
            raise self._busy(
                503, f"request not served within {self.cfg.request_timeout_s:g} s"
            ) from None
        failed = [r["error"] for r in results if r.get("error")]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0]}", type_="server_error")
        return results

    def _answer(self, req, jobs: list[dict], results: list[dict], beautified) -> dict:
        data = []
        revised = beautified.revised_prompt if beautified else None
        for job, result in zip(jobs, results, strict=True):
            item: dict[str, Any] = {"revised_prompt": revised, "seed": job["seed"]}
            if req.response_format == "url":
                item["url"] = self._store(result["png"])
            else:
                item["b64_json"] = base64.b64encode(result["png"]).decode()
            data.append(item)
        return {"created": int(time.time()), "data": data}

    def _row(self, req, prompt: str, width, height, i: int, rules, extra=None) -> dict:
        raw = {
            "id": uuid.uuid4().hex,
            "prompt": prompt,
            "negative_prompt": req.negative_prompt,
            # n images of one request: seed, seed+1, ... so each is reproducible on its own.
            "seed": None if req.seed is None else req.seed + i,
            "width": width,
            "height": height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            **(extra or {}),
        }
        row = rows.normalise_row(raw, "prompt", rules)
        if row["status"] != schema.STATUS_OK:
            field = row["error"].split(":", 1)[0]
            raise ApiError(
                400, row["error"], param="size" if field in ("width", "height") else field
            )
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
        # Optional columns only when the jobs carry them (edits: source_rgb, keep_mask).
        columns = [*self.stage.needs, *(c for c in self.stage.optional if c in jobs[0])]
        out = self.stage({c: [job.get(c) for job in jobs] for c in columns})
        results = []
        for i, job in enumerate(jobs):
            if out["status"][i] != schema.STATUS_OK:
                results.append({"error": out["error"][i]})
            else:
                png = encode_rgb(out["image_rgb"][i], job["width"], job["height"], "png")
                results.append({"png": png})
        recorder = metrics(APP_SERVE)
        failed = sum(1 for r in results if r.get("error"))
        recorder.rows("generate", len(jobs))
        recorder.images("generate", len(jobs) - failed)
        recorder.errors("generate", {"generate": failed})
        recorder.latency("generate", time.perf_counter() - start)
        return results


@serve.deployment
class Beautifier:
    """The LLM client of `beautify: true` requests, scaled apart from the generators."""

    def __init__(self, cfg: dict):
        from k3batch.serve.beautify import OnlineBeautifier

        app = ServeAppConfig.model_validate(cfg)
        self.beautifier = OnlineBeautifier(app.beautify, app.model.path)

    async def beautify(self, prompt: str, seed: int | None):
        return await self.beautifier.beautify(prompt, seed)


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve configs: `import_path: k3batch.serve.app:build_app`."""
    cfg = ServeAppConfig.model_validate(args)
    if cfg.model.make_tiny or os.path.exists(cfg.model.path):
        # Replicas need not share the driver's working directory.
        cfg.model.path = os.path.abspath(cfg.model.path)
    dump = cfg.model_dump(mode="json")

    def generator(g: GeneratorDeploymentConfig, name: str, role: str):
        return Generator.options(
            name=name,
            num_replicas=g.num_replicas,
            autoscaling_config=g.autoscaling_config,
            max_ongoing_requests=g.max_ongoing_requests,
            max_queued_requests=g.max_queued_requests,
            ray_actor_options={"num_gpus": g.num_gpus, "num_cpus": g.num_cpus},
        ).bind(dump, role)

    inpaint = (
        generator(cfg.inpaint_generator, "InpaintGenerator", "edit")
        if cfg.inpaint_model is not None
        else None
    )
    beautifier = None
    if cfg.beautify is not None:
        b = cfg.beautify
        beautifier = Beautifier.options(
            num_replicas=b.num_replicas,
            max_ongoing_requests=b.max_ongoing_requests,
            ray_actor_options={"num_cpus": b.num_cpus},
        ).bind(dump)
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(
        generator(cfg.generator, "Generator", "generate"), dump, inpaint, beautifier
    )
