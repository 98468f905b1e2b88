"""The OpenAI Images API as the Serve app speaks it: request models, the error shape and its
FastAPI handlers, JSON bodies and `size`."""

import json
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from k3batch import schema
from k3batch.config import format_validation_error


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


def overloaded(status: int, message: str, retry_after_s: float) -> ApiError:
    """A refusal for lack of capacity, telling the client when to retry."""
    return ApiError(
        status,
        message,
        type_="server_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def row_error(error: str) -> ApiError:
    """A 400 for a row that k3batch's row rules or image preparation refused.

    The row's error starts with its field; width and height come from the request's `size`.
    """
    field = error.split(":", 1)[0]
    return ApiError(400, error, param="size" if field in (schema.WIDTH, schema.HEIGHT) else field)


async def _api_error(_request, exc: ApiError):
    return exc.response()


async def _http_error(_request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), type_=kind).response()


async def _validation_error(_request, exc: RequestValidationError):
    return ApiError(422, str(exc.errors()[:3])).response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, FastAPI's own included, in the OpenAI error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


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
    scheduler: str | None = None  # `generation.scheduler`'s names, checked as a row's
    beautify: bool = False
    # Kandinsky 2.2 only (a 400 naming the field on other members): the prior's settings.
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None


class ImagePrompt(BaseModel):
    """One image prompt of a generations request (k3batch's IP-Adapter extension)."""

    model_config = ConfigDict(extra="forbid")

    image: str  # base64 or a `data:` URL (`uploads.b64_image`)
    weight: float | None = None  # null: 1.0, as a batch row's


class ImageGenerationRequest(ImageEditRequest):
    """OpenAI `POST /v1/images/generations` body: the edits fields, as JSON, plus `style` and
    k3batch's ControlNet and IP-Adapter extensions."""

    style: str | None = None  # accepted for client compatibility; not used
    # Kandinsky 3 ControlNet, with `model.controlnet` only (else a 400 naming the field): an
    # edge image as base64 or a `data:` URL (`uploads.b64_image`), and the rows' settings.
    # The same `hint` field carries Kandinsky 2.2 ControlNet depth's depth image (required
    # there; the control settings are Kandinsky 3's only).
    hint: str | None = None
    controlnet_conditioning_scale: float | None = None
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None
    # Kandinsky 3 IP-Adapter, with `model.ip_adapter` only: image prompts mixed by weight, and
    # the adapter's scale.
    ip_images: list[ImagePrompt] | None = None
    ip_adapter_scale: float | None = None


class ImageVariationRequest(BaseModel):
    """OpenAI `POST /v1/images/variations` form fields (the image is a file) plus k3batch's
    extensions. No prompt: the variation is decoded from the image's CLIP embedding alone
    (Kandinsky 2.2's prior), so the prompt settings and beautify do not apply."""

    model_config = ConfigDict(extra="forbid")

    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None


class ImageUpscaleRequest(BaseModel):
    """`POST /v1/images/upscale` form fields (the image is a file): a k3batch extension in
    the Images API's style. The answer is one image, `upscale.model`'s scale larger."""

    model_config = ConfigDict(extra="forbid")

    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None
    seed: int | None = None


def validated(model: type[BaseModel], data: dict):
    """`data` as a `model` request, or a 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(
            400, format_validation_error(e), param=".".join(map(str, first["loc"]))
        ) from None


async def read_json(request: Request, limit: int) -> dict:
    """A JSON object body of at most `limit` bytes."""
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


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(400, f"size must look like '1024x1024', got {size!r}", param="size")
    return int(width), int(height)
