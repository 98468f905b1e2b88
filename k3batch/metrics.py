"""k3batch's Prometheus metrics, recorded with `ray.util.metrics` and exported by Ray.

Every node's Ray metrics agent serves its processes' metrics at
http://NODE:METRICS_EXPORT_PORT/metrics. Ray prefixes names with `ray_` and a counter also
gets `_total`, so a scrape shows:

    ray_k3batch_rows_processed_total{app, stage}         rows out of a stage
    ray_k3batch_images_generated_total{app, stage}       images a stage produced
    ray_k3batch_errors_total{app, stage, kind}           rows that failed in a stage, by kind
    ray_k3batch_stage_seconds_bucket|_sum|_count{app, stage}   seconds per batch, per stage

`app` is "batch" for Ray Data jobs. The Serve app is meant to record the same metrics with
app="serve" (`metrics(APP_SERVE)`), so one dashboard covers both.
"""

from __future__ import annotations

from collections.abc import Mapping

APP_BATCH = "batch"
APP_SERVE = "serve"

ROWS_PROCESSED = "k3batch_rows_processed"
IMAGES_GENERATED = "k3batch_images_generated"
ERRORS = "k3batch_errors"
STAGE_SECONDS = "k3batch_stage_seconds"

# Seconds per batch: from a validation batch (milliseconds) to a large batch of 1024px
# images at 50 steps (minutes).
LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]


def error_kinds(error: str | None) -> list[str]:
    """The kinds in an `error` value: the field or step before each ': ' part.

    "prompt: empty; width: must be ..." -> ["prompt", "width"]; "generate: OOM" -> ["generate"].
    """
    if not error:
        return []
    return [part.split(":", 1)[0].strip() or "unknown" for part in error.split("; ")]


class Metrics:
    """The k3batch metrics of one process, tagged with the app that records them."""

    def __init__(self, app: str = APP_BATCH):
        from ray.util.metrics import Counter, Histogram

        self.app = app
        self._rows = Counter(
            ROWS_PROCESSED, description="Rows out of a k3batch stage.", tag_keys=("app", "stage")
        )
        self._images = Counter(
            IMAGES_GENERATED,
            description="Images produced by a k3batch stage.",
            tag_keys=("app", "stage"),
        )
        self._errors = Counter(
            ERRORS,
            description="Rows that failed in a k3batch stage, by kind (the field or step named "
            "in the row's error).",
            tag_keys=("app", "stage", "kind"),
        )
        self._seconds = Histogram(
            STAGE_SECONDS,
            description="Seconds a k3batch stage spent on one batch.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("app", "stage"),
        )

    def _tags(self, stage: str, **more: str) -> dict[str, str]:
        return {"app": self.app, "stage": stage, **more}

    def rows(self, stage: str, n: int) -> None:
        if n > 0:
            self._rows.inc(n, tags=self._tags(stage))

    def images(self, stage: str, n: int) -> None:
        if n > 0:
            self._images.inc(n, tags=self._tags(stage))

    def errors(self, stage: str, by_kind: Mapping[str, int]) -> None:
        for kind, n in by_kind.items():
            if n > 0:
                self._errors.inc(n, tags=self._tags(stage, kind=kind))

    def latency(self, stage: str, seconds: float) -> None:
        self._seconds.observe(seconds, tags=self._tags(stage))


_by_app: dict[str, Metrics] = {}


def metrics(app: str = APP_BATCH) -> Metrics:
    """This process's `Metrics` for `app`, created on first use (needs Ray)."""
    if app not in _by_app:
        _by_app[app] = Metrics(app)
    return _by_app[app]


def metrics_url() -> str | None:
    """Where this node's Ray serves the metrics (the driver's node; each node has its own)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
