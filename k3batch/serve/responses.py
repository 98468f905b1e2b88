"""The Images API's answer to a request: each image as `b64_json`, or as a URL to it stored
under the app's `output_uri`."""

import base64
import time
import uuid
from typing import Any

from k3batch import schema, storage


def images_response(req, jobs: list[dict], results: list[dict], beautified, output_uri) -> dict:
    data = []
    revised = beautified.revised_prompt if beautified else None
    for job, result in zip(jobs, results, strict=True):
        item: dict[str, Any] = {"revised_prompt": revised, "seed": job[schema.SEED]}
        if req.response_format == "url":
            item["url"] = store(result["png"], output_uri)
        else:
            item["b64_json"] = base64.b64encode(result["png"]).decode()
        data.append(item)
    return {"created": int(time.time()), "data": data}


def store(png: bytes, output_uri: str) -> str:
    name = f"{time.strftime('%Y%m%d')}/{uuid.uuid4().hex}.png"
    uri = storage.join(output_uri, name)
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, png)
    try:
        return fs.url(path, expires=3600)  # presigned HTTPS URL on object stores
    except (AttributeError, NotImplementedError, TypeError):
        return uri
