"""GPU memory: every shipped GPU config fits its GPU by the estimate (k3batch.model.memory),
the offload mode (T5 on the CPU) for 16-24 GB GPUs, and weights loaded straight to their device.
"""

import os
from pathlib import Path

import pytest
import torch
import yaml

from k3batch.config import load_config
from k3batch.job import kinds
from k3batch.model import estimates, memory
from k3batch.model.kandinsky3 import layout, loading
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.model.kandinsky3 import memory as k3_memory
from k3batch.model.superres import memory as sr_memory
from k3batch.serve.config import ServeAppConfig
from tests.conftest import FP32

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Configs are meant for an 80 GB GPU (H100) unless named here.
GPU_OF = {"base-24gb.yaml": "A10G 24GB"}
# cluster/aws-gpu.yaml's GPU instance families.
INSTANCE_GPU = {"g5": "A10G 24GB", "p5": "H100 80GB"}


def actors(path: Path) -> list[memory.ActorMemory]:
    """The GPU actors (generation, T5 pool, Serve replicas) of a shipped config."""
    data = yaml.safe_load(path.read_text())
    if "applications" not in data:
        cfg = load_config(path)
        return estimates.job_estimates(cfg, kinds.get(cfg.job))
    out = []
    for app in data["applications"]:
        if app["import_path"].startswith("k3batch."):
            out += estimates.serve_estimates(ServeAppConfig.model_validate(app["args"]))
    return out


def test_parameter_counts_are_the_real_architectures():
    counts = {**k3_memory.parameter_counts(), "sr_unet": sr_memory.sr_unet_parameters()}
    # docs: T5 encoder 8.72B, UNet 3.06B, MoVQ 271M (shared/notes/kandinsky3.md).
    assert round(counts["text_encoder"] / 1e9, 2) == 8.72
    assert round(counts["unet"] / 1e9, 2) == round(counts["unet9"] / 1e9, 2) == 3.06
    assert round(counts["movq"] / 1e6) == 271
    # Conditioning and upscaling: the fork's ControlNet (469.6M, scripts/
    # check_reference_controlnet.py), CLIP ViT-L/14's vision tower (303.2M) and projection (0.8M),
    # KandiSuperRes's SR UNet (413M, docs/superres.md).
    assert round(counts["controlnet"] / 1e6, 1) == 469.6
    assert counts["image_encoder"] == 303_179_776 + 1024 * 768
    assert round(counts["sr_unet"] / 1e6) == 413


def test_estimate_matches_its_calibration_run():
    """The H200 run: base + Flash in bfloat16, batch 4 at 1024^2, decode 1 then 4."""
    cfg = load_config(
        REPO / "configs" / "base.yaml",
        ["model.refine=true", "limits.max_side=1024", "beautify.enabled=false"],
    )
    est = estimates.job_estimates(cfg, kinds.get(cfg.job))[0].estimate
    weights = est.total_gib - est.part("activations") - est.part("CUDA")
    assert weights == pytest.approx(28.1, abs=0.1)
    assert weights + est.part("activations") == pytest.approx(33.5, abs=0.2)
    cfg.resources.decode_batch_size = 4
    est4 = estimates.job_estimates(cfg, kinds.get(cfg.job))[0].estimate
    assert est4.total_gib - est4.part("CUDA") == pytest.approx(48.5, abs=0.2)


def asks_gpus_for_the_model(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    if "applications" in data:
        apps = [a["args"] for a in data["applications"] if a["import_path"].startswith("k3batch.")]
        return any(
            (app.get(g) or {}).get("num_gpus", 0) > 0
            for app in apps
            for g in ("generator", "inpaint_generator")
        )
    cfg = load_config(path)
    upscale = cfg.upscale.enabled and cfg.upscale.num_gpus_per_actor > 0
    return upscale or (cfg.job == "text_to_image" and cfg.resources.num_gpus_per_actor > 0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_gpu_config_fits_its_gpu(path):
    found = actors(path)
    if not asks_gpus_for_the_model(path):
        assert not found, "a config that runs no diffusion model on GPUs is not estimated"
        return
    assert found, f"{path.name} asks for GPUs but no GPU actor was estimated"
    gpu = GPU_OF.get(path.name, memory.DEFAULT_GPU)
    problems = [a.problem(memory.GPU_GIB[gpu], gpu) for a in found]
    assert not any(problems), problems


def test_the_estimated_gpu_configs_are_the_expected_ones():
    estimated = {p.name for p in CONFIGS if actors(p)}
    assert estimated == {
        "base.yaml",
        "base-24gb.yaml",
        "controlnet-hed.yaml",
        "dataset-synthesis.yaml",
        "flash.yaml",
        "inpaint.yaml",
        "ip-adapter.yaml",
        "kandinsky22-gpu.yaml",
        "s3.yaml",
        "serve.yaml",
        "serve-beautify.yaml",
        "upscale.yaml",
    }


def test_upscaling_memory_is_bounded_by_windows_and_tiles():
    """x4 / x2 and windowed Flash x2: the SR UNet's activations do not grow with the image
    (only its canvases do); Flash x2's whole-canvas steps grow with it up to the threshold."""
    from k3batch.config.upscale import UpscaleConfig

    def est(**fields):
        base = {"model": "x4", "path": "/sr", "kandinsky3_path": "/k3", "dtype": "float16"}
        return sr_memory.upscale_estimate(UpscaleConfig(**{**base, **fields}))

    small, large = est(max_output_side=2048), est(max_output_side=8192)
    assert small.part("activations") == large.part("activations")
    assert large.part("float32 canvases") == pytest.approx(16 * small.part("float32 canvases"))
    assert est(max_tiles_per_call=1).part("activations") < small.part("activations")
    flash = {"model": "flash-x2", "max_output_side": 4096}
    whole = est(**flash)
    assert "whole canvas" in whole.summary()
    assert whole.part("activations") == pytest.approx(sr_memory.SR_GIB_PER_MEGAPIXEL * 16)
    windowed = est(**flash, flash_whole_canvas_side=2048)
    assert windowed.part("activations") < whole.part("activations")
    # Flash x2 adds the refine's Flash UNet and MoVQ; x4 holds only the SR UNet.
    assert whole.part("Flash UNet weights") > 5 and not small.part("Flash UNet weights")


def test_every_gpu_node_type_of_the_aws_cluster_has_a_config_that_fits():
    cluster = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    gpus = {
        INSTANCE_GPU[t["node_config"]["InstanceType"].split(".")[0]]
        for t in cluster["available_node_types"].values()
        if t["resources"].get("GPU")
    }
    assert gpus == {"A10G 24GB", "H100 80GB"}
    for gpu in gpus:
        fitting = [
            p.name
            for p in CONFIGS
            if actors(p) and not any(a.problem(memory.GPU_GIB[gpu]) for a in actors(p))
        ]
        assert fitting, f"no shipped config fits {gpu}"


def test_a_config_that_cannot_fit_is_reported_with_its_parts():
    cfg = load_config(
        REPO / "configs" / "base-24gb.yaml",
        [
            "model.precision=null",
            "model.dtype={unet: float32, text_encoder: float32, movq: float32}",
            "model.device=auto",
            "limits.max_side=2048",
            "generation.width=2048",
            "generation.height=2048",
            "resources.batch_size=16",
            "resources.decode_batch_size=16",
        ],
    )
    (gen,) = estimates.job_estimates(cfg, kinds.get(cfg.job))
    message = gen.problem(memory.GPU_GIB["A10G 24GB"], "A10G 24GB")
    assert message is not None and "does not fit A10G 24GB (22.0 GiB)" in message
    for part in (
        "T5 encoder weights (float32) 32.5",
        "UNet kandinsky3 weights (float32) 11.4",
        "MoVQ weights (float32) 1.0",
        "activations (",
        "CUDA context and allocator margin",
    ):
        assert part in message, message
    assert gen.estimate.total_gib > 80  # not an 80 GB GPU's config either


def test_offload_fits_24gb_and_the_same_config_without_it_does_not():
    offload = load_config(REPO / "configs" / "base-24gb.yaml")
    assert offload.model.device_map()["text_encoder"] == "cpu"
    (gen,) = estimates.job_estimates(offload, kinds.get(offload.job))
    assert gen.estimate.part("T5") == 0 and gen.problem(memory.GPU_GIB["A10G 24GB"]) is None
    on_gpu = load_config(REPO / "configs" / "base-24gb.yaml", ["model.device=auto"])
    (gen,) = estimates.job_estimates(on_gpu, kinds.get(on_gpu.job))
    assert gen.estimate.part("T5 encoder weights") > 16
    assert "does not fit" in gen.problem(memory.GPU_GIB["A10G 24GB"])


def test_text_encoder_pool_moves_t5_to_its_own_estimate():
    cfg = load_config(
        REPO / "configs" / "base.yaml",
        [
            "resources.text_encoder_pool.enabled=true",
            "resources.text_encoder_pool.num_gpus_per_actor=0.5",
            "resources.text_encoder_pool.batch_size=32",
        ],
    )
    gen, pool = estimates.job_estimates(cfg, kinds.get(cfg.job))
    assert gen.estimate.part("T5") == 0
    assert pool.gpus == 0.5 and pool.estimate.part("T5 encoder weights") > 16
    assert pool.estimate.part("activations") < 2  # 64 prompts of 128 tokens: small
    assert pool.problem(memory.GPU_GIB["H100 80GB"]) is None  # half an H100
    assert "0.5 x A10G" in pool.problem(memory.GPU_GIB["A10G 24GB"], "A10G")


# ------------------------------------------------------------------ offload on the tiny model
def test_the_device_map_is_honoured_and_gives_the_same_image(tiny_dir):
    """T5 on its own device, projection and UNet on the UNet's: on this CPU-only machine both
    are `cpu`, so check that each component lands where the map says and that the mapped
    model generates what the one-device model does."""
    from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request

    mapped = Kandinsky3.from_pretrained(
        tiny_dir, dtype=FP32, device={"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"}
    )
    plain = Kandinsky3.from_pretrained(tiny_dir, dtype=FP32, device="cpu")
    assert {p.device.type for p in mapped.text_encoder.parameters()} == {"cpu"}
    assert {p.device.type for p in mapped.denoiser.unet.parameters()} == {"cpu"}
    # Offload keeps T5 and the UNet in their own dtypes and devices; embeddings move across.
    mixed = Kandinsky3.from_pretrained(
        tiny_dir,
        dtype={"unet": "float32", "text_encoder": "bfloat16", "movq": "float32"},
        device={"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"},
    )
    assert next(mixed.text_encoder.parameters()).dtype == torch.bfloat16
    r = Request("a red fox at sunset", "blurry", 3, 64, 64, 2, 3.0)
    a, b = mapped.generate([r]), plain.generate([r])
    assert (a[0] == b[0]).all()
    assert mixed.generate([r])[0].shape == a[0].shape


# ------------------------------------------------------------------ loading
def _mapped_files(module) -> set[str]:
    """The files whose memory mappings hold `module`'s parameters ("anonymous" for a copy)."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi, fields[5] if len(fields) > 5 else "anonymous"))
    found = set()
    for p in module.parameters():
        ptr = p.data_ptr()
        found |= {name for lo, hi, name in maps if lo <= ptr < hi} or {"anonymous"}
    return found


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")


@needs_proc
def test_diffusers_layout_weights_are_not_copied_into_host_memory(tiny_dir):
    """Loaded with `device_map=`: on the CPU in the file's dtype every parameter is the
    safetensors file's own pages (no host copy); on a GPU the same path reads them onto it.
    diffusers records the map it was given (transformers 5 keeps it only across devices)."""
    member = k3_members.MEMBERS["kandinsky3"]
    parts = loading.load(tiny_dir, [member], dtype=FP32, device="cpu")
    unet = parts.unets["kandinsky3"][0]
    for module, folder in (
        (parts.text_encoder, "text_encoder"),
        (parts.movq, "movq"),
        (unet, member.unet_folder),
    ):
        files = _mapped_files(module)
        assert len(files) == 1 and Path(files.pop()).parent.name == folder, folder
    for module in (parts.movq, unet):
        assert set(map(str, module.hf_device_map.values())) == {"cpu"}


@needs_proc
def test_reference_layout_assigns_the_memory_mapped_weights_without_a_host_copy(tiny_ref_dir):
    """Built on meta and assigned: in float32 on the CPU the UNet's parameters are the file's
    own pages; other dtypes/devices are cast tensor by tensor, to the same values."""
    member = k3_members.MEMBERS["kandinsky3"]
    root = layout.reference_root(tiny_ref_dir)
    unet, _ = loading.reference_unet(root, member)
    # The text projection comes from its own file (flan_ul2_encoder/projection.pt).
    body = torch.nn.ModuleList(c for n, c in unet.named_children() if n != "encoder_hid_proj")
    assert _mapped_files(body) == {os.path.realpath(os.path.join(root, member.reference_file))}
    half, _ = loading.reference_unet(root, member, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for p, q in zip(unet.parameters(), half.parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_starts_on_one_gpu(path):
    """As shipped, each config's pools (at their starting sizes) fit one GPU: no job or Serve
    app waits forever on a one-GPU machine for a second GPU."""
    from k3batch.gpus import gpus_needed

    data = yaml.safe_load(path.read_text())
    if "applications" in data:
        needed = sum(
            (app["args"].get(g) or {}).get("num_gpus", 0)
            * ((app["args"].get(g) or {}).get("autoscaling_config") or {}).get("min_replicas", 1)
            for app in data["applications"]
            if app["import_path"].startswith("k3batch.")
            for g in ("generator", "inpaint_generator")
            if g != "inpaint_generator" or app["args"].get("inpaint_model")
        )
    else:
        cfg = load_config(path)
        needed = gpus_needed(cfg, kinds.get(cfg.job))
    assert needed <= 1, f"{path.name} needs {needed:g} GPUs to start"


def test_a_job_above_its_gpus_memory_gets_one_warning_line_naming_the_parts():
    from k3batch.gpus import memory_warnings

    base = load_config(REPO / "configs" / "base.yaml")
    kind = kinds.get(base.job)
    (line,) = memory_warnings(base, kind, memory.GPU_GIB["A10G 24GB"], "NVIDIA A10G")
    assert "generation actor: ~50.4 GiB" in line and "T5 encoder weights (bfloat16)" in line
    assert "does not fit NVIDIA A10G (22.0 GiB)" in line and "\n" not in line
    assert memory_warnings(base, kind, memory.GPU_GIB["H100 80GB"], "NVIDIA H100") == []
    small = load_config(REPO / "configs" / "base-24gb.yaml")
    assert (
        memory_warnings(small, kinds.get(small.job), memory.GPU_GIB["A10G 24GB"], "NVIDIA A10G")
        == []
    )
