"""The GPU actors of a batch job or a Serve app, each with its memory estimate (each
family estimates its own: `k3batch.model.<family>.memory`; the method: `memory`)."""

from __future__ import annotations

from k3batch.model import family
from k3batch.model.memory import ActorMemory, MemoryEstimate
from k3batch.model.superres.memory import upscale_estimate


def generation_estimate(model, **settings) -> MemoryEstimate:
    """GPU memory of a generation actor (or Serve replica) running `model` (a ModelConfig):
    `batch_size` rows per UNet call at `width` x `height` (the largest size a row may ask
    for), `decode_batch_size`, `text_encoder_pool` (T5 runs in its own pool, not here)."""
    return family.of(model.name).memory_estimate(model, **settings)


def job_estimates(cfg, kind) -> list[ActorMemory]:
    """The GPU actors of a batch job (a JobConfig, and its `job.kinds.JobKind`): generation,
    and the T5 pool if enabled.

    Rows may ask for any size up to `limits.max_side`, so the estimate takes the largest.
    """
    if not kind.uses_diffusion_model:
        return upscale_estimates(cfg)
    r, g = cfg.resources, cfg.generation
    pool = r.text_encoder_pool
    side = max(g.width, g.height, cfg.limits.max_side)
    out = []
    if r.num_gpus_per_actor > 0:
        est = generation_estimate(
            cfg.model,
            batch_size=r.batch_size,
            width=side,
            height=side,
            decode_batch_size=r.decode_batch_size,
            text_encoder_pool=pool.enabled,
        )
        out.append(ActorMemory(est, r.num_gpus_per_actor))
    if pool.enabled and pool.num_gpus_per_actor > 0:
        est = family.of(cfg.model.name).text_encoder_estimate(cfg.model, batch_size=pool.batch_size)
        out.append(ActorMemory(est, pool.num_gpus_per_actor))
    return out + upscale_estimates(cfg)


def upscale_estimates(cfg) -> list[ActorMemory]:
    """The upscaling pool of a job (an `upscale:` step or `job: upscale`) when it has GPUs."""
    u = cfg.upscale
    if not u.enabled or u.num_gpus_per_actor <= 0:
        return []
    return [ActorMemory(upscale_estimate(u), u.num_gpus_per_actor)]


def serve_estimates(app) -> list[ActorMemory]:
    """The GPU replicas of a Serve application (a ServeAppConfig)."""
    side = app.limits.max_side
    deployments = [("generator", app.model, app.generator, app.generation)]
    if app.inpaint_model is not None:
        deployments.append(
            ("inpaint generator", app.inpaint_model, app.inpaint_generator, app.inpaint_generation)
        )
    out = []
    for actor, model, deployment, gen in deployments:
        if deployment.num_gpus <= 0:
            continue
        s = max(side, gen.width, gen.height)
        est = generation_estimate(
            model,
            batch_size=app.batching.max_batch_size,
            width=s,
            height=s,
            decode_batch_size=deployment.decode_batch_size,
            actor=f"{actor} replica",
        )
        out.append(ActorMemory(est, deployment.num_gpus))
    if app.upscale is not None and app.upscaler.num_gpus > 0:
        est = upscale_estimate(app.upscale, actor="upscaler replica")
        out.append(ActorMemory(est, app.upscaler.num_gpus))
    return out
