"""Ray Serve application: a FastAPI ingress speaking the OpenAI Images API, and a generator
deployment that batches concurrent requests onto the model with `@serve.batch`.

    POST /v1/images/generations   text-to-image (OpenAI Images API + k3batch extensions)
    POST /v1/images/edits         inpainting; 404 unless an inpainting model is configured
    GET  /v1/models               the served model
    GET  /healthz                 200 once the generator has loaded its model, else 503
"""

import asyncio
import base64
import hmac
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

from k3batch import rows, storage
from k3batch.config import format_validation_error
from k3batch.serve.config import ServeAppConfig

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


class ImageGenerationRequest(BaseModel):
    """OpenAI `POST /v1/images/generations` body plus k3batch's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None
    quality: str | None = None  # accepted for client compatibility; not used
    style: str | None = None  # accepted for client compatibility; not used
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    beautify: bool = False


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
    def __init__(self, generator, cfg: dict):  # noqa: D107
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.generator = generator
        self.keys = load_api_keys(self.cfg)
        # The model name resolves null steps/guidance to the member's own defaults.
        self.rules = rows.RowRules.from_config(
            self.cfg.generation, self.cfg.limits, self.cfg.model.name
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
        try:
            await asyncio.wait_for(self.generator.health.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": self.cfg.served_model_name}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "k3batch",
                }
            ],
        }

    @fastapi_app.post("/v1/images/edits")
    async def edits(self, request: Request):
        self._authorize(request)
        raise ApiError(
            404,
            "no inpainting model is configured on this server",
            type_="not_found",
            code="model_not_found",
        )

    @fastapi_app.post("/v1/images/generations")
    async def generations(self, request: Request):
        from k3batch.metrics import APP_SERVE, metrics

        recorder = metrics(APP_SERVE)
        start = time.perf_counter()
        try:
            answer = await self._generations(request)
        except ApiError as e:
            recorder.errors("request", {e.param or e.code or e.type: 1})
            raise
        finally:
            recorder.latency("request", time.perf_counter() - start)
        recorder.rows("request", len(answer["data"]))
        return answer

    async def _generations(self, request: Request) -> dict:
        self._authorize(request)
        try:
            req = ImageGenerationRequest.model_validate(await self._json(request))
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(
                400, format_validation_error(e), param=".".join(map(str, first["loc"]))
            ) from None
        if req.model not in (None, self.cfg.served_model_name):
            raise ApiError(
                404,
                f"model {req.model!r} is not served here (try {self.cfg.served_model_name!r})",
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
        if req.beautify:
            raise ApiError(400, "beautify is not configured on this server", param="beautify")
        width, height = parse_size(req.size) if req.size else (None, None)
        jobs = [self._row(req, width, height, i) for i in range(req.n)]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self.generator.generate.remote(job) for job in jobs)),
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
        data = []
        for job, result in zip(jobs, results, strict=True):
            item: dict[str, Any] = {"revised_prompt": None, "seed": job["seed"]}
            if req.response_format == "url":
                item["url"] = self._store(result["png"])
            else:
                item["b64_json"] = base64.b64encode(result["png"]).decode()
            data.append(item)
        return {"created": int(time.time()), "data": data}

    def _row(self, req: ImageGenerationRequest, width, height, i: int) -> dict:
        raw = {
            "id": uuid.uuid4().hex,
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            # n images of one request: seed, seed+1, ... so each is reproducible on its own.
            "seed": None if req.seed is None else req.seed + i,
            "width": width,
            "height": height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
        }
        row = rows.normalise_row(raw, "prompt", self.rules)
        if row["status"] != rows.STATUS_OK:
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
    """Holds the model; concurrent requests are batched into one `generate` call per shape."""

    def __init__(self, cfg: dict):
        from k3batch.stages.generate import load_model

        self.cfg = ServeAppConfig.model_validate(cfg)
        self.pipe = load_model(self.cfg.model.model_dump(), self.cfg.generator.decode_batch_size)
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
        from k3batch.metrics import APP_SERVE, metrics

        start = time.perf_counter()
        results = self._generate_groups(jobs)
        recorder = metrics(APP_SERVE)
        failed = sum(1 for r in results if r.get("error"))
        recorder.rows("generate", len(jobs))
        recorder.images("generate", len(jobs) - failed)
        recorder.errors("generate", {"generate": failed})
        recorder.latency("generate", time.perf_counter() - start)
        return results

    def _generate_groups(self, jobs: list[dict]) -> list[dict]:
        from k3batch.images import encode_rgb
        from k3batch.model.kandinsky3 import Request

        results: list[dict] = [{} for _ in jobs]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job["width"], job["height"], job["num_inference_steps"])].append(i)
        for indices in groups.values():
            requests = [
                Request(
                    jobs[i]["prompt"],
                    jobs[i]["negative_prompt"],
                    jobs[i]["seed"],
                    jobs[i]["width"],
                    jobs[i]["height"],
                    jobs[i]["num_inference_steps"],
                    jobs[i]["guidance_scale"],
                )
                for i in indices
            ]
            try:
                images = self.pipe.generate(requests)
            except Exception as e:  # noqa: BLE001 - reported per request, the replica lives on
                log.exception("generation failed")
                for i in indices:
                    results[i] = {"error": f"{type(e).__name__}: {e}"}
                continue
            for i, image in zip(indices, images, strict=True):
                job = jobs[i]
                results[i] = {
                    "png": encode_rgb(image.tobytes(), job["width"], job["height"], "png")
                }
        return results


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve configs: `import_path: k3batch.serve.app:build_app`."""
    cfg = ServeAppConfig.model_validate(args)
    if cfg.model.make_tiny or os.path.exists(cfg.model.path):
        # Replicas need not share the driver's working directory.
        cfg.model.path = os.path.abspath(cfg.model.path)
    g = cfg.generator
    generator = Generator.options(
        num_replicas=g.num_replicas,
        autoscaling_config=g.autoscaling_config,
        max_ongoing_requests=g.max_ongoing_requests,
        max_queued_requests=g.max_queued_requests,
        ray_actor_options={"num_gpus": g.num_gpus, "num_cpus": g.num_cpus},
    ).bind(cfg.model_dump(mode="json"))
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(
        generator, cfg.model_dump(mode="json")
    )
