"""Pre-flight: everything that can fail before Ray starts and before any model loads (paths,
CPU and GPU budgets, the input, the model, the output), each failure one line naming the
field."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from k3batch import gpus, resume, storage
from k3batch.config import ConfigError, JobConfig
from k3batch.job.inputs import InputInfo, inspect_input
from k3batch.model import hub
from k3batch.outputs import ENTRIES, Output
from k3batch.ray_start.budget import check_local_cpus, starts_local_ray

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind

log = logging.getLogger(__name__)


def resolve_paths(cfg: JobConfig) -> JobConfig:
    """Local paths absolute: Ray workers need not share the driver's working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.input.uri = storage.absolute(cfg.input.uri)
    cfg.output.uri = storage.absolute(cfg.output.uri)
    cfg.model.absolute_paths()
    cfg.upscale.absolute_paths()
    if cfg.beautify.backend == "vllm" and (
        os.path.exists(cfg.beautify.model) or cfg.beautify.make_tiny
    ):
        cfg.beautify.model = os.path.abspath(cfg.beautify.model)
    tiny_scorers = cfg.scores.make_tiny
    if cfg.scores.clip_model and (os.path.exists(cfg.scores.clip_model) or tiny_scorers):
        cfg.scores.clip_model = os.path.abspath(cfg.scores.clip_model)
    for c in cfg.scores.classifiers:
        if os.path.exists(c.path) or tiny_scorers:
            c.path = os.path.abspath(c.path)
    return cfg


def check_upscaler(cfg: JobConfig) -> None:
    """`upscale.path` holds the checkpoint `upscale.model` needs (Hub ids: fetched later)."""
    u = cfg.upscale
    if not u.enabled or u.make_tiny:
        return
    if os.path.isdir(u.path):
        name = u.file_name
        if not os.path.isfile(os.path.join(u.path, name)):
            raise ConfigError(
                f"upscale.path: {u.path} has no {name} (the upscale.model={u.model} checkpoint)"
            )
    elif not os.path.isfile(u.path) and not hub.looks_like_repo_id(u.path):
        raise ConfigError(
            f"upscale.path: {u.path!r} is neither a checkpoint file, a directory nor a Hugging "
            "Face repo id"
        )


def check_model(cfg: JobConfig, kind: JobKind) -> None:
    b = cfg.beautify
    local_llm = b.make_tiny or os.path.isdir(b.model)
    if b.enabled and b.backend == "vllm" and not local_llm:  # noqa: SIM102 - reads as two rules
        if os.path.exists(b.model) or not hub.looks_like_repo_id(b.model):
            raise ConfigError(
                f"beautify.model: {b.model!r} is neither a model directory nor a Hugging Face "
                "repo id"
            )
    check_upscaler(cfg)
    if not kind.uses_diffusion_model:
        return
    from k3batch.model import family
    from k3batch.stages.scores import check_scores

    if cfg.scores.enabled and cfg.scores.make_tiny:
        # Built here, before the check that reads them (as model.make_tiny's model is).
        from k3batch.testing.tiny_scorers import make_tiny_scorers

        make_tiny_scorers(cfg.scores)
    check_scores(cfg.scores)

    m = cfg.model
    check_conditioning(cfg)
    if not m.make_tiny:  # the tiny set is built at start, complete
        check_weights(family.of(m.name).weight_checks(m), m.name)
    check_lora(cfg)


def check_weights(checks, member: str) -> None:
    """Each place the job's weights load from (`member.WeightCheck`): a local folder with
    everything the job needs (the missing parts named), or a Hugging Face repo id."""
    for c in checks:
        if os.path.isdir(c.path):
            if c.missing:
                raise ConfigError(
                    f"{c.field}: {c.path} has no {', '.join(c.missing)} for "
                    f"model.name={member}{c.note}"
                )
            continue
        if os.path.exists(c.path) or not hub.looks_like_repo_id(c.path):
            raise ConfigError(
                f"{c.field}: {c.path!r} is neither a {c.what} nor a Hugging Face repo id"
            )
        check_hub_model(c.path, c.field)


def check_conditioning(cfg: JobConfig) -> None:
    """`model.controlnet` and `model.ip_adapter` name what is there (the tiny set's own are
    built with the model)."""
    from k3batch.model.kandinsky3 import layout

    m = cfg.model
    built_later = m.make_tiny and m.controlnet and not os.path.exists(m.controlnet)
    if (
        m.controlnet
        and not built_later
        and not os.path.isfile(os.path.join(m.controlnet, "config.json"))
    ):
        raise ConfigError(
            f"model.controlnet: {m.controlnet!r} is not a ControlNet folder (no config.json)"
        )
    if m.ip_adapter is None:
        return
    weights, encoder = layout.ip_adapter_paths(m)
    if m.ip_adapter.path is not None and not os.path.isfile(layout.ip_adapter_file(weights)):
        where = f"has no {layout.IP_ADAPTER_FILE}" if os.path.isdir(weights) else "is no file"
        raise ConfigError(f"model.ip_adapter.path: {weights!r} {where}")
    if m.ip_adapter.image_encoder is None and m.make_tiny:
        return
    field = "model.ip_adapter.image_encoder"
    if os.path.isdir(encoder):
        if not os.path.isfile(os.path.join(encoder, "config.json")):
            raise ConfigError(f"{field}: {encoder} has no config.json (a CLIP vision model)")
    elif os.path.exists(encoder) or not hub.looks_like_repo_id(encoder):
        raise ConfigError(
            f"{field}: {encoder!r} is neither a local folder nor a Hugging Face repo id"
        )
    else:
        check_hub_model(encoder, field)


def check_lora(cfg: JobConfig) -> None:
    """Each `model.lora` file is read and its keys mapped; against a local checkpoint's UNet
    (built on the meta device, no weights read) every key's module and shape are checked, so
    a LoRA that does not fit fails here and not in every actor. A Hub id or a tiny model not
    built yet: the same check runs when the model loads."""
    m = cfg.model
    if not m.lora:
        return
    from k3batch.model.adapters import lora as lora_weights
    from k3batch.model.kandinsky3 import layout, loading
    from k3batch.model.kandinsky3.members import MEMBERS

    unet = None
    if os.path.isdir(m.path) and not layout.missing_files(m.path, m.name, False, m.layout):
        unet = loading.unet_skeleton(m.path, MEMBERS[m.name], m.layout)
    for i, lora in enumerate(m.lora):
        try:
            if unet is None:
                lora_weights.read(lora.path)
            else:
                lora_weights.check(unet, lora.path)
        except lora_weights.LoraError as e:
            raise ConfigError(f"model.lora[{i}].path: {e}") from None


# A file each layout's repo has at its top: what the local cache must hold in offline mode.
_HUB_MARKERS = ("model_index.json", "unet/config.json", "weights/movq.pt", "config.json")


def check_hub_model(repo_id: str, field: str = "model.path") -> None:
    """A Hub repo id must name a repo (online) or one in the local cache (HF_HUB_OFFLINE),
    rather than fail in every actor after Ray has started."""
    from huggingface_hub import constants, repo_exists, try_to_load_from_cache

    if constants.is_offline_mode():
        if not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in _HUB_MARKERS):
            raise ConfigError(
                f"{field}: {repo_id!r} is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it first or give a local directory"
            )
        return
    try:
        exists = repo_exists(repo_id)
    except Exception as e:  # noqa: BLE001 - the Hub unreachable from here: the workers retry
        log.warning("k3batch: could not ask the Hugging Face Hub about %s: %s", repo_id, e)
        return
    if not exists:
        raise ConfigError(
            f"{field}: no Hugging Face repo {repo_id!r} (a private or gated repo needs HF_TOKEN)"
        )


def prepare_output(cfg: JobConfig, output: Output) -> bool:
    """Start, resume or refuse: returns True when the output holds this job to resume.

    A new (or overwritten) output records the job's fingerprint first, so even a run killed
    in its first minute can be resumed.
    """
    fs, root = output.filesystem()
    identity = resume.job_identity(cfg)
    try:
        previous = [p for p in ENTRIES if fs.exists(f"{root}/{p}")]
        if previous and cfg.output.overwrite:
            output.clear()
        elif previous:
            job = resume.read_job(fs, root)
            if job is None:
                raise ConfigError(
                    f"output.uri: {cfg.output.uri} already holds files ({', '.join(previous)}) "
                    "but no k3batch job to resume; choose a new output or pass --overwrite"
                )
            if job["fingerprint"] != resume.fingerprint(identity):
                changed = resume.differences(job["job"], identity)
                raise ConfigError(
                    f"output.uri: {cfg.output.uri} holds a run of a different job "
                    f"(changed: {', '.join(changed) or 'fingerprint'}); rerun with the same "
                    "config to resume, choose a new output, or pass --overwrite"
                )
            return True
        fs.makedirs(root, exist_ok=True)
        resume.write_job(fs, root, identity)
        return False
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"output.uri: cannot write to {cfg.output.uri}: {type(e).__name__}: {e}"
        ) from None


def preflight(cfg: JobConfig, kind: JobKind) -> tuple[JobConfig, InputInfo, Output, bool]:
    """Everything that can fail before Ray starts and before any model loads. `kind`: the
    job's kind (`job.kinds.get(cfg.job)`)."""
    cfg = resolve_paths(cfg)
    check_local_cpus(cfg, kind)
    local = starts_local_ray(cfg)
    gpus.check_local_gpus(cfg, kind, local=local)
    if local:
        gpus.warn_local_gpu_memory(cfg, kind)
    info = inspect_input(cfg, kind)
    check_model(cfg, kind)
    output = Output.from_config(cfg, kind.output_format(cfg))
    resumed = prepare_output(cfg, output)
    return cfg, info, output, resumed
