"""`k3batch serve CONFIG`: run a Ray Serve config file (the same one `serve run` accepts)."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from k3batch.config import ConfigError, format_validation_error, parse_overrides, set_path


def import_attr(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_serve_config(path: str, overrides: list[str] | None = None) -> dict:
    """Read a Serve config file and validate k3batch's application args up front."""
    from k3batch.serve.config import ServeAppConfig

    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read serve config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"serve config {path} is not valid YAML: {e}".replace("\n", " ")
        ) from None
    apps = spec.get("applications") if isinstance(spec, dict) else None
    if not apps:
        raise ConfigError(f"serve config {path}: needs an `applications` list")
    for key, value in parse_overrides(overrides or []):
        set_path(apps[0].setdefault("args", {}), key, value)
    for i, app in enumerate(apps):
        if app.get("import_path") == "k3batch.serve.app:build_app":
            try:
                ServeAppConfig.model_validate(app.get("args") or {})
            except ValidationError as e:
                raise ConfigError(f"applications[{i}].args: {format_validation_error(e)}") from None
    return spec


def serve_forever(
    spec: dict, host: str | None = None, port: int | None = None, address: str | None = None
) -> None:
    import ray
    from ray import serve

    http = dict(spec.get("http_options") or {})
    http["host"] = host or http.get("host", "127.0.0.1")
    http["port"] = port or http.get("port", 8000)
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address) if address else ray.init(include_dashboard=False)
    serve.start(http_options=http)
    for app in spec["applications"]:
        builder = import_attr(app["import_path"])
        serve.run(
            builder(app.get("args") or {}),
            name=app.get("name", "default"),
            route_prefix=app.get("route_prefix", "/"),
        )
    print(f"k3batch: serving on http://{http['host']}:{http['port']} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
