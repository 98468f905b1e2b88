"""The text `k3batch run` prints at the end of a run, from its run.json record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from k3batch import storage

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind


def accounting_problem(run: dict) -> str:
    """One line naming what broke the invariant, and which ids (the first ten of each)."""
    acc = run["accounting"]
    several = run.get("records_expected", run["rows_in"]) != run["rows_in"]
    out = "records out" if several else "rows out"
    parts = [f"rows in {run['rows_in']}{_images(run)}, {out} {run['rows_out']}"]
    if acc.get("other_status"):
        parts.append(f"{acc['other_status']} rows neither ok nor error")
    for label, count, ids in (
        ("missing", "num_missing", "missing_ids"),
        ("not in the input", "num_unexpected", "unexpected_ids"),
        ("ids twice", "num_duplicate_ids", "duplicate_ids"),
    ):
        if acc.get(count):
            parts.append(f"{label} ({acc[count]}): {', '.join(map(repr, acc[ids][:10]))}")
    if acc.get("rows_written_twice"):
        parts.append(f"{acc['rows_written_twice']} rows written twice")
    return "; ".join(parts)


def _images(run: dict) -> str:
    """` (N records)` when rows ask for several images each (records out count those)."""
    expected = run.get("records_expected", run["rows_in"])
    return f" ({expected} records: num_images_per_prompt)" if expected != run["rows_in"] else ""


def _cost_line(run: dict) -> str | None:
    """GPU-seconds per image; on CPU (no GPUs) the pool actors' seconds per image instead."""
    if run.get("gpu_seconds_per_image") is None and run.get("actor_seconds_per_image") is None:
        return None
    pools = {n: s for n, s in run.get("stages", {}).items() if s.get("actor_pool")}
    actors = sum(s["actors"] for s in pools.values())
    gpus = max((s["gpus_per_actor"] for s in pools.values()), default=0)
    if run.get("gpu_seconds"):
        return (
            f"{run['gpu_seconds_per_image']:.2f} GPU-s/image "
            f"({actors} actors x {gpus:g} GPU, {run['gpu_seconds']:.1f} GPU-s in all)"
        )
    per_image = run.get("actor_seconds_per_image")
    shown = f"{per_image:.2f}" if per_image is not None else "-"
    return f"0 GPU-s/image (no GPUs; {shown} actor-s/image over {actors} pool actors)"


def summary(run: dict, kind: JobKind, report: str | None = None) -> str:
    """The table the CLI prints at the end of a run; `kind` (the run's job kind) names where
    its output is."""
    # Rows are the input's; records the images written (rows x num_images_per_prompt). With
    # one image per row they are the same count, said once as rows.
    unit = "records" if run.get("records_expected", run["rows_in"]) != run["rows_in"] else "rows"
    lines = [f"output        {run['output']}"]
    if unit == "rows":
        lines.append(f"rows in/out   {run['rows_in']} / {run['rows_out']}")
        lines.append(f"ok / errors   {run['ok']} / {run['error']}")
    else:
        lines.append(f"rows in       {run['rows_in']}{_images(run)}")
        lines.append(f"records out   {run['rows_out']}")
        lines.append(f"ok / errors   {run['ok']} / {run['error']} records")
    lines.append(
        f"this run      {run.get('rows_this_run', run['rows_out'])} {unit}; "
        f"{run.get('skipped_by_resume', 0)} finished earlier, skipped"
    )
    if run["errors_by_field"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in run["errors_by_field"].items())
        lines.append(f"errors by     {kinds}")
    lines.append(
        f"wall time     {run['wall_seconds']:.1f} s ({run['images_per_second']:.2f} images/s)"
    )
    cost = _cost_line(run)
    if cost:
        lines.append(f"GPU time      {cost}")
    if run.get("stages"):
        busy = ", ".join(f"{n} {s['busy_seconds']:.1f} s" for n, s in run["stages"].items())
        lines.append(f"stage time    {busy} (busy, summed over workers)")
    if run.get("warnings_by_field"):
        kinds = ", ".join(f"{k}: {v}" for k, v in run["warnings_by_field"].items())
        lines.append(f"warnings by   {kinds} (see the metadata's `warning` column)")
    if not run["accounting"]["ok"]:
        lines.append(f"ACCOUNTING FAILED: {accounting_problem(run)}")
    if "beautify" in run:
        b = run["beautify"]
        fallbacks = ", ".join(f"{k}: {v}" for k, v in b.get("fallbacks", {}).items())
        lines.append(
            f"beautified    {b.get('beautified', 0)} (LLM errors {b.get('errors', 0)})"
            + (f"; prompt used: {fallbacks}" if fallbacks else "")
        )
    out = run["output"]
    lines += kind.output_lines(run)
    lines.append(f"run record    {storage.join(out, 'run.json')}")
    if report:
        lines.append(f"report        {report}")
    return "\n".join(lines)
