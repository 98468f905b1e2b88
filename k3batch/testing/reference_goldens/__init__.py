"""The reference checks' cases, k3batch's side of each, and their golden files: one module
per family (kandinsky3, superres, adapters) and `files` for the files and the weights' digest.

`scripts/check_reference*.py` run ai-forever's reference code (from a checkout: imported,
never copied) beside k3batch on tiny weights built from fixed seeds. With `--record DIR`
each script writes, per case, `DIR/<case>.npz`: the reference's inputs (pictures, masks,
latents), the noise and intermediate arrays it captures where they are small, and its
outputs; and `DIR/<case>.json`: the reference repository and commit, the script, the case's
settings, torch's version and a summary of the tiny weights the case used.
`tests/test_goldens.py` runs k3batch's side of every case against those files on every run,
with no reference checkout. Each case's settings and k3batch's side are defined here once,
for the scripts and the test alike.

The weights' summary (`weights_summary`) covers what the outputs depend on: every tensor
(name, dtype, shape, values) and the tiny tokenizer's vocabulary, not the files' bytes,
which also carry library versions (transformers writes its own into config.json) and would
change with an upgrade that leaves the weights as they are.
"""

from __future__ import annotations

from .adapters import (
    CONTROLNET_CASE,
    IP_ADAPTER_CASE,
    IP_SCALES,
    controlnet_config,
    controlnet_hint,
    controlnet_inputs,
    controlnet_model,
    controlnet_side,
    ip_adapter_file,
    ip_base_unet,
    ip_inputs,
    ip_side,
    ip_weights,
)
from .files import (
    RECORD_COMMAND,
    REPOSITORIES,
    WEIGHTS_RTOL,
    cases,
    file_tensors,
    file_weights,
    load,
    metadata,
    rng_picture,
    save,
    to_numpy,
    weights_differ,
    weights_summary,
)
from .kandinsky3 import (
    K3_CASES,
    K3_PROMPT,
    K3Case,
    k3_files,
    k3_inputs,
    k3_request,
    k3_side,
)
from .superres import (
    FLASH_CASES,
    FLASH_SEED,
    SR_CASES,
    SR_SEED,
    SR_STEPS,
    SR_TILES_PER_CALL,
    FlashCase,
    SRCase,
    canvas_recorded,
    flash_arrays,
    flash_files,
    flash_picture,
    flash_side,
    flash_weights,
    sr_picture,
    sr_side,
    subsampled,
)

__all__ = [
    "RECORD_COMMAND",
    "REPOSITORIES",
    "save",
    "load",
    "cases",
    "metadata",
    "to_numpy",
    "WEIGHTS_RTOL",
    "weights_summary",
    "weights_differ",
    "file_tensors",
    "file_weights",
    "rng_picture",
    "K3_PROMPT",
    "K3Case",
    "K3_CASES",
    "k3_inputs",
    "k3_files",
    "k3_request",
    "k3_side",
    "SRCase",
    "SR_SEED",
    "SR_STEPS",
    "SR_TILES_PER_CALL",
    "SR_CASES",
    "sr_picture",
    "sr_side",
    "canvas_recorded",
    "subsampled",
    "FlashCase",
    "FLASH_SEED",
    "FLASH_CASES",
    "flash_picture",
    "flash_files",
    "flash_weights",
    "flash_side",
    "flash_arrays",
    "CONTROLNET_CASE",
    "controlnet_config",
    "controlnet_model",
    "controlnet_inputs",
    "controlnet_hint",
    "controlnet_side",
    "IP_ADAPTER_CASE",
    "IP_SCALES",
    "ip_base_unet",
    "ip_adapter_file",
    "ip_weights",
    "ip_inputs",
    "ip_side",
]
