"""`k3batch serve CONFIG`: run a Ray Serve config file (the same one `serve run` accepts) on
Ray as `k3batch.ray_start` starts it, until SIGTERM or SIGINT shuts it down."""

from __future__ import annotations

import importlib
import signal
import sys
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from k3batch.config import ConfigError, format_validation_error, parse_overrides, set_path

K3BATCH_APP = "k3batch.serve.app:build_app"


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
        if app.get("import_path") == K3BATCH_APP:
            try:
                ServeAppConfig.model_validate(app.get("args") or {})
            except ValidationError as e:
                raise ConfigError(f"applications[{i}].args: {format_validation_error(e)}") from None
    return spec


# The deployments of k3batch's own app, by the `args` field that sizes each (for error lines).
_K3BATCH_FIELDS = {
    "Generator": "generator",
    "InpaintGenerator": "inpaint_generator",
    "Upscaler": "upscaler",
    "Beautifier": "beautify",
}


def _fields(i: int, app: dict):
    """The config field that sizes each deployment of the i-th application."""

    def where(deployment: str) -> str:
        field = _K3BATCH_FIELDS.get(deployment)
        if app.get("import_path") == K3BATCH_APP and field:
            return f"applications[{i}].args.{field}"
        return f"applications[{i}]"

    return where


class _Stop(BaseException):
    """SIGTERM or SIGINT: leave the serving loop (or the start-up) and shut down."""


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT end the server through `_Stop`. Installed once Ray is up: Ray's
    driver sets a C++ handler for SIGTERM that prints a stack dump and kills the process
    without shutting Serve down. A second signal while shutting down ends it at once."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve_forever(
    spec: dict, host: str | None = None, port: int | None = None, address: str | None = None
) -> None:
    """Run the config's applications until SIGTERM or SIGINT, then shut Serve and Ray down.
    Ray as every k3batch command gets it (`k3batch.ray_start`): `address` (else
    RAY_ADDRESS) joined or refused in seconds, else a fresh local Ray; deployments whose
    replicas can never be placed are refused before anything deploys."""
    from k3batch.ray_start import budget, connect

    where = connect.target(address, "--address")
    connect.set_environment(where)  # before the builders import ray
    import ray
    from ray import serve

    http = dict(spec.get("http_options") or {})
    http["host"] = host or http.get("host", "127.0.0.1")
    http["port"] = port or http.get("port", 8000)
    built = [
        (app, import_attr(app["import_path"])(app.get("args") or {}))
        for app in spec["applications"]
    ]
    pools = [
        pool
        for i, (app, application) in enumerate(built)
        for pool in budget.deployment_pools(application, _fields(i, app))
    ]
    if where.local:  # what a local Ray will have: refused before it starts
        have = budget.local_resources()
        if have is not None:
            budget.check_deployments(pools, have, have, local=True, address_hint="--address")
    state = connect.start_ray(
        where,
        local={"include_dashboard": False},
        local_what="serve: cannot start a local Ray instance",
    )
    started_serve = False
    try:
        _stop_on_signals()
        free, total = budget.ray_resources()
        budget.check_deployments(
            pools, free, total, local=state == "started", address_hint="--address"
        )
        started_serve = True
        serve.start(http_options=http)
        for app, application in built:
            serve.run(
                application,
                name=app.get("name", "default"),
                route_prefix=app.get("route_prefix", "/"),
            )
        print(
            f"k3batch: serving on http://{http['host']}:{http['port']} (Ctrl-C to stop)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except _Stop:
        print("k3batch: stopping the server", file=sys.stderr, flush=True)
    finally:
        if started_serve:
            _stop_serve(state != "started", [app.get("name", "default") for app, _ in built])
        ray.shutdown()


def _stop_serve(joined: bool, names: list[str]) -> None:
    """On a Ray of our own, all of Serve. On a cluster we joined, the applications this
    config deployed, and Serve itself only when no other application is left: others may
    serve from the same cluster."""
    from ray import serve

    if joined:
        for name in names:
            serve.delete(name)
        if serve.status().applications:
            return
    serve.shutdown()
