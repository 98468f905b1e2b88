"""The `Ingress`'s checks of a request before any row is built from it: the served model's
name, `n`, `response_format`, the fields a member or the app's config lacks (the prior's,
`beautify`, the ControlNet's and IP-Adapter's). Each failure is an `ApiError` naming the
field."""

from k3batch import schema
from k3batch.serve.config import ServeAppConfig
from k3batch.serve.protocol import ApiError


def not_configured(what: str) -> ApiError:
    """The 404 of an endpoint whose model the app config leaves out."""
    return ApiError(
        404,
        f"no {what} model is configured on this server",
        type_="not_found",
        code="model_not_found",
    )


def check_model(req, served_name: str) -> None:
    if req.model not in (None, served_name):
        raise ApiError(
            404,
            f"model {req.model!r} is not served here (try {served_name!r})",
            type_="not_found",
            param="model",
            code="model_not_found",
        )


def check_response_format(req, cfg: ServeAppConfig) -> None:
    if req.response_format == "url" and not cfg.output_uri:
        raise ApiError(
            400,
            "response_format 'url' needs an output bucket; use b64_json",
            param="response_format",
        )


def check_common(req, cfg: ServeAppConfig, served_name: str, beautifier_configured: bool) -> None:
    check_model(req, served_name)
    if not 1 <= req.n <= cfg.limits.max_n:
        raise ApiError(400, f"n must be in [1, {cfg.limits.max_n}], got {req.n}", param="n")
    check_response_format(req, cfg)
    if getattr(req, "beautify", False) and not beautifier_configured:
        raise ApiError(400, "beautify is not configured on this server", param="beautify")


def check_conditioning(req, served_name: str, capabilities) -> None:
    """The ControlNet and IP-Adapter fields need a model served with model.controlnet /
    model.ip_adapter (a depth member takes its `hint` without either, and needs it: a
    request has no `image` to estimate one from): a 400 naming the first one given
    otherwise, saying why. `capabilities`: the served model's rows'."""
    caps, member = capabilities, capabilities.member
    if caps.hint == "depth" and req.hint is None:
        raise ApiError(
            400,
            f"hint: missing (null), {served_name!r} ({member.name}) needs a depth image "
            "(base64 or a data: URL) on every request",
            param=schema.HINT,
        )
    for on, config, what, names in (
        (
            caps.control_settings,
            "controlnet",
            "ControlNet",
            (schema.HINT, *schema.CONTROLNET_COLUMNS),
        ),
        (caps.ip_images, "ip_adapter", "IP-Adapter", schema.IP_ADAPTER_COLUMNS),
    ):
        given = [
            n
            for n in names
            if getattr(req, n) is not None and not (n == schema.HINT and caps.hint is not None)
        ]
        if on or not given:
            continue
        name = given[0]
        if member.conditioning:
            why = f"{served_name!r} is served without model.{config}"
        else:
            takers = caps.takers["conditioning"]
            why = f"it works with {takers} only, not {served_name!r} ({member.name})"
            if name == schema.HINT and caps.takers.get("depth_hint"):
                why += f"; a depth hint is {caps.takers['depth_hint']}'s"
        raise ApiError(400, f"{name}: needs the Kandinsky 3 {what}, but {why}", param=name)
