"""LoRA for the UNet: both key layouts, scales and sums, one-line refusals, the fingerprint,
and a job's GenerateStage with `model.lora` (tiny random LoRAs on the tiny model).

Two oracles share nothing with `lora.py`'s key tables: a fork-layout file named from the
fork's own code (`tiny_lora.FORK_PROCESSOR_LAYERS`, its source recorded there) whose update
is added in the fork's (reference) namespace to a reference-layout checkpoint; and LoRAs made
by peft on the UNet and saved by diffusers' own `save_lora_weights`, against peft's own
forward (no key is read by the test at all)."""

from __future__ import annotations

import copy

import pytest
import torch

from k3batch.config import ConfigError, ModelConfig, load_config
from k3batch.model.adapters import lora
from k3batch.testing.tiny_lora import (
    FORK_PROCESSOR_LAYERS,
    fork_lora_for_reference_state,
    lora_keys,
    lora_tensors,
    write_lora,
)

from .conftest import FP32, job_config, load_tiny


@pytest.fixture(scope="module")
def unet(tiny_dir):
    from diffusers import Kandinsky3UNet

    return Kandinsky3UNet.from_pretrained(tiny_dir, subfolder="unet").eval()


def fused(unet, loras, dtype=torch.float32) -> dict:
    u = copy.deepcopy(unet).to(dtype)
    lora.fuse(u, loras)
    return u.state_dict()


def test_both_layouts_fuse_the_same_update_and_several_loras_add_up(unet, tmp_path):
    t1, t2 = lora_tensors(unet, seed=1), lora_tensors(unet, seed=2)
    diff = write_lora(str(tmp_path / "d.safetensors"), t1)
    fork = write_lora(str(tmp_path / "f.safetensors"), t1, layout=lora.LAYOUT_FORK)
    assert lora.read(diff)[0] == lora.LAYOUT_DIFFUSERS and lora.read(fork)[0] == lora.LAYOUT_FORK
    base = unet.state_dict()
    a, b = fused(unet, [(diff, 1.0)]), fused(unet, [(fork, 1.0)])
    assert all(torch.equal(a[k], b[k]) for k in base)
    # Exactly the attention projections change, each by up @ down.
    changed = {k for k in base if not torch.equal(a[k], base[k])}
    assert changed == {f"{m}.weight" for m in t1} and len(changed) == 52
    name = "down_blocks.1.attentions.1.attention.to_k"  # a cross-attention key: 64 x 4
    down, up = t1[name]
    torch.testing.assert_close(a[f"{name}.weight"], base[f"{name}.weight"] + up @ down)

    # alpha / rank = 2 at scale 0.5 is the plain update.
    alpha = write_lora(str(tmp_path / "alpha.safetensors"), t1, alpha=4.0)
    c = fused(unet, [(alpha, 0.5)])
    assert all(torch.equal(a[k], c[k]) for k in base)

    # Two LoRAs at 0.7 and -0.4 equal one LoRA of rank 4 holding both updates.
    other = write_lora(str(tmp_path / "o.safetensors"), t2)
    both = {
        m: (torch.cat([t1[m][0], t2[m][0]]), torch.cat([0.7 * t1[m][1], -0.4 * t2[m][1]], 1))
        for m in t1
    }
    one = write_lora(str(tmp_path / "one.safetensors"), both)
    two, single = fused(unet, [(diff, 0.7), (other, -0.4)]), fused(unet, [(one, 1.0)])
    for k in base:
        torch.testing.assert_close(two[k], single[k], rtol=0, atol=1e-6)

    # Half precision: summed in float32, rounded once.
    half = fused(unet, [(diff, 1.0)], dtype=torch.bfloat16)
    w = unet.state_dict()[f"{name}.weight"].to(torch.bfloat16).float()
    assert torch.equal(half[f"{name}.weight"], (w + up @ down).to(torch.bfloat16))


def test_a_lora_that_does_not_fit_the_unet_fails_with_one_line(unet, tiny_dir, tmp_path):
    from safetensors.torch import save_file

    t = lora_tensors(unet)
    name = "up_blocks.1.attentions.0.attention.to_v"  # 16 x 16
    t[name] = (torch.zeros(2, 32), t[name][1])  # a LoRA for a 32-wide layer
    bad = write_lora(str(tmp_path / "bad.safetensors"), t, layout=lora.LAYOUT_FORK)
    with pytest.raises(lora.LoraError) as err:
        lora.fuse(copy.deepcopy(unet), [(bad, 1.0)])
    message = str(err.value)
    assert "\n" not in message and bad in message
    assert repr(lora_keys(name, lora.LAYOUT_FORK)[0]) in message and "(16, 16)" in message

    foreign = str(tmp_path / "te.safetensors")
    te = "text_encoder.encoder.block.0.q"
    save_file(
        {f"{te}.lora_A.weight": torch.zeros(2, 32), f"{te}.lora_B.weight": torch.zeros(32, 2)},
        foreign,
    )
    with pytest.raises(lora.LoraError, match=r"'text_encoder\.encoder.*' targets .*not in the"):
        lora.check(unet, foreign)
    save_file({"something.else": torch.zeros(2)}, foreign)
    with pytest.raises(lora.LoraError, match="'something.else' is not a UNet LoRA weight"):
        lora.check(unet, foreign)
    down_only = str(tmp_path / "down.safetensors")
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(2, 16)}, down_only)
    with pytest.raises(lora.LoraError, match="has no up matrix"):
        lora.check(unet, down_only)

    # Pre-flight refuses it before Ray starts, against the checkpoint's meta-device UNet.
    from k3batch.job import kinds
    from k3batch.job.preflight import check_model

    def check(data):
        cfg = load_config(data=data)
        check_model(cfg, kinds.get(cfg.job))

    data = job_config(tmp_path, "in.parquet", tiny_dir)
    data["model"]["lora"] = [{"path": bad}]
    with pytest.raises(ConfigError, match=r"^model\.lora\[0\]\.path: LoRA .* does not fit "):
        check(data)
    data["model"]["lora"] = [{"path": str(tmp_path / "missing.safetensors")}]
    with pytest.raises(ConfigError, match="no such file"):
        check(data)
    data["model"]["lora"] = [{"path": bad, "scale": float("nan")}]
    with pytest.raises(ConfigError, match="model.lora.0.scale"):
        load_config(data=data)


def test_the_fingerprint_holds_each_lora_its_scale_and_its_content(tmp_path, unet):
    from k3batch import resume

    path = write_lora(str(tmp_path / "a.safetensors"), lora_tensors(unet, seed=1))
    data = job_config(tmp_path, "in.parquet", "tiny")
    base = resume.job_identity(load_config(data=data))
    data["model"]["lora"] = [{"path": path, "scale": 1.0}]
    one = resume.job_identity(load_config(data=data))
    data["model"]["lora"][0]["scale"] = 0.5
    half = resume.job_identity(load_config(data=data))
    write_lora(path, lora_tensors(unet, seed=2))  # rewritten in place
    rewritten = resume.job_identity(load_config(data=data))
    assert resume.differences(base, one) == ["model.lora", "model.lora_sha256"]
    assert resume.differences(one, half) == ["model.lora"]
    assert resume.differences(half, rewritten) == ["model.lora_sha256"]


def test_generate_stage_with_a_lora_at_scale_0_is_the_base_image_and_at_1_is_not(
    tiny_dir, unet, tmp_path
):
    from k3batch.rows.rules import RowRules
    from k3batch.stages.generate import GenerateStage
    from k3batch.stages.validate import ValidateStage

    path = write_lora(str(tmp_path / "a.safetensors"), lora_tensors(unet, seed=3))
    rules = RowRules(width=64, height=64, num_inference_steps=2, seed=0)
    rows = {"prompt": ["a red fox in the snow"], "row_hash": [0]}
    batch = {**rows, **ValidateStage(rules)(rows)}

    def images(loras):
        model = ModelConfig(path=tiny_dir, dtype=FP32, device="cpu", lora=loras)
        out = GenerateStage(model)(batch)
        assert out["status"] == ["ok"], out["error"]
        return out

    base = images([])
    zero = images([{"path": path, "scale": 0.0}])
    one = images([{"path": path, "scale": 1.0}])
    assert zero["image_rgb"] == base["image_rgb"]
    assert one["image_rgb"] != base["image_rgb"]
    assert one["model"][0] == f"kandinsky3+lora(a.safetensors@1):{tiny_dir}"


def test_a_fork_layout_lora_is_the_forks_update_in_the_forks_namespace(tiny_ref_dir, tmp_path):
    """The fork adds `up @ down` to the reference Attention's own linears (to_query, to_key,
    to_value, output_layer): applied there, to the reference-layout checkpoint itself, it must
    give the UNet k3batch fuses from the file, whatever names k3batch maps in between."""
    import os
    import shutil

    from safetensors.torch import save_file

    from k3batch.model.kandinsky3 import layout

    weights = os.path.join(layout.REFERENCE_WEIGHTS_DIR, "kandinsky3.pt")
    checkpoint = torch.load(os.path.join(tiny_ref_dir, weights), weights_only=True)
    tensors, updates = fork_lora_for_reference_state(checkpoint["unet"], seed=5)
    # Every attention of the tiny UNet, the pooling's too, each with the fork's four layers.
    assert {k.rsplit(".", 2)[1] for k in updates} == set(FORK_PROCESSOR_LAYERS)
    assert any(k.startswith("feature_pooling.attention.") for k in updates)
    assert "down_samples.1.resnet_attn_blocks.0.1.attention.processor.to_v_lora.up.weight" in (
        tensors
    )
    path = str(tmp_path / "fork.safetensors")
    save_file(tensors, path)

    state = dict(checkpoint["unet"])
    for key, (down, up) in updates.items():
        state[key] = state[key] + 0.6 * (up @ down)
    oracle_dir = tmp_path / "oracle"
    shutil.copytree(tiny_ref_dir, oracle_dir)
    torch.save({**checkpoint, "unet": state}, oracle_dir / weights)

    fused = load_tiny(tiny_ref_dir, lora=[(path, 0.6)]).unet.state_dict()
    expected = load_tiny(str(oracle_dir)).unet.state_dict()
    plain = load_tiny(tiny_ref_dir).unet.state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], expected[k])]
    assert len(changed) == len(updates)
    for k in plain:
        torch.testing.assert_close(fused[k], expected[k], rtol=0, atol=1e-6, msg=k)


def _peft_lora(unet, tmp_path, name, seed, rank, alpha, targets, **settings):
    """(peft-wrapped copy of `unet`, the file diffusers' save_lora_weights writes for it);
    `settings`: more of peft's LoraConfig."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **settings
    )
    with torch.random.fork_rng():  # peft draws its random init from the global RNG
        torch.manual_seed(seed)
        wrapped = inject_adapter_in_model(config, copy.deepcopy(unet), adapter_name=name)
    folder = tmp_path / name
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(wrapped, adapter_name=name),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return wrapped, str(folder / "pytorch_lora_weights.safetensors"), config


def test_peft_loras_saved_by_diffusers_fuse_to_what_peft_computes(unet, tmp_path):
    """Two LoRAs made by peft (attention linears and the 3x3 conv_in; alpha != rank), saved by
    diffusers' save_lora_weights, fused at scales 0.7 and -0.4: the UNet's output equals
    peft's own forward with both adapters active at those scales."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    wrapped, first, _ = _peft_lora(
        unet, tmp_path, "a", 1, 2, 3, ["to_q", "to_k", "to_v", "to_out.0", "conv_in"]
    )
    _, second, config_b = _peft_lora(unet, tmp_path, "b", 2, 3, 1, ["to_k", "to_out.0"])
    assert lora.read(first)[0] == lora.LAYOUT_DIFFUSERS
    with torch.random.fork_rng():
        torch.manual_seed(2)
        inject_adapter_in_model(config_b, wrapped, adapter_name="b")
    layers = [m for m in wrapped.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.set_adapter([a for a in ("a", "b") if a in m.lora_A])
        for adapter, scale in (("a", 0.7), ("b", -0.4)):
            if adapter in m.lora_A:
                m.set_scale(adapter, scale)
    ours = copy.deepcopy(unet)
    assert lora.fuse(ours, [(first, 0.7), (second, -0.4)]) == len(layers)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 6, unet.config.encoder_hid_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        want = wrapped(x, t, ctx, mask, return_dict=False)[0]
        got = ours(x, t, ctx, mask, return_dict=False)[0]
        base = unet(x, t, ctx, mask, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2


def test_diffusers_attention_processor_loras_fuse_as_diffusers_reads_them(unet, tmp_path):
    """The older diffusers layout, `<attention>.processor.{to_q,to_k,to_v,to_out}_lora.
    {down,up}.weight` (its LoRAAttnProcessor's layers): the keys are written here from that
    naming and checked against diffusers' own converter to PEFT names; fused at 0.6, every
    projection is its weight plus 0.6 * up @ down, nothing else changes."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import save_file

    updates = lora_tensors(unet, seed=5)
    old, peft_names = {}, {}
    for module, (down, up) in updates.items():
        attention, proj = module.removesuffix(".0").rsplit(".", 1)
        for part, value, peft in (("down", down, "lora_A"), ("up", up, "lora_B")):
            old[f"{attention}.processor.{proj}_lora.{part}.weight"] = value.contiguous()
            peft_names[f"{module}.{peft}.weight"] = value
    converted = convert_unet_state_dict_to_peft(dict(old))
    assert converted.keys() == peft_names.keys()
    path = str(tmp_path / "processor.safetensors")
    save_file(old, path)
    assert lora.read(path)[0] == lora.LAYOUT_DIFFUSERS
    base, got = unet.state_dict(), fused(unet, [(path, 0.6)])
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == {f"{m}.weight" for m in updates}
    assert any(m.endswith("to_out.0") for m in updates)
    for module, (down, up) in updates.items():
        want = base[f"{module}.weight"] + 0.6 * (up @ down)
        torch.testing.assert_close(got[f"{module}.weight"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(alpha_pattern={"to_q": 4}), "alpha_pattern"),
    ],
)
def test_peft_variants_fusing_cannot_reproduce_are_refused(unet, tmp_path, settings, name):
    """DoRA, rsLoRA (alpha / sqrt(rank)) and per-module alphas, written into the file's
    metadata by diffusers' save_lora_weights from peft's config: refused, not fused wrong."""
    _, path, _ = _peft_lora(unet, tmp_path, "v", 1, 2, 2, ["to_q", "to_k"], **settings)
    with pytest.raises(lora.LoraError) as e:
        lora.read(path)
    assert str(e.value) == f"LoRA {path}: PEFT {name} is not supported (metadata {name})"


def test_unreadable_incomplete_and_misfit_files_are_refused_with_the_exact_message(unet, tmp_path):
    """Each refusal names the file and, where there is one, the key of the update's `down`
    matrix (not its alpha's, which sorts first)."""
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(lora.LoraError) as e:
        lora.read(str(junk))
    assert str(e.value).startswith(f"LoRA {junk}: not a safetensors file (SafetensorError: ")
    empty = str(tmp_path / "empty.safetensors")
    save_file({}, empty)
    with pytest.raises(lora.LoraError) as e:
        lora.read(empty)
    assert str(e.value) == f"LoRA {empty}: holds no tensors"
    name = "up_blocks.1.attentions.0.attention.to_v"  # 16 x 16
    up_only = str(tmp_path / "up.safetensors")
    save_file({f"unet.{name}.lora_B.weight": torch.zeros(16, 2)}, up_only)
    with pytest.raises(lora.LoraError) as e:
        lora.read(up_only)
    assert str(e.value) == f"LoRA {up_only}: key 'unet.{name}.lora_B.weight' has no down matrix"
    t = lora_tensors(unet)
    t[name] = (torch.zeros(2, 32), t[name][1])
    misfit = write_lora(str(tmp_path / "misfit.safetensors"), t, alpha=4.0)
    with pytest.raises(lora.LoraError) as e:
        lora.check(unet, misfit)
    assert str(e.value) == (
        f"LoRA {misfit}: key 'unet.{name}.lora_A.weight': up (16, 2) @ down (2, 32) does not "
        f"fit {name}.weight (16, 16)"
    )


def test_updates_whose_matrices_do_not_chain_to_the_weight_are_refused(unet, tmp_path):
    """Shapes `check` refuses, with the weight each would have fit had it been read
    loosely: a 1-D `up`, and a convolution `up` with a kernel (only `down` carries it)."""
    from safetensors.torch import save_file

    conv = unet.conv_in.weight.shape  # (out, in, 3, 3)
    linear = "up_blocks.1.attentions.0.attention.to_v"  # 16 x 16
    cases = [
        ("conv_in", torch.zeros(2, *conv[1:]), torch.zeros(conv[0], 2, 3, 1)),
        ("conv_in", torch.zeros(2, *conv[1:]), torch.zeros(conv[0], 2, 3, 3)),
        (linear, torch.zeros(2, 16), torch.zeros(16)),
    ]
    for i, (module, down, up) in enumerate(cases):
        path = str(tmp_path / f"{i}.safetensors")
        save_file({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, path)
        weight = tuple(dict(unet.named_parameters())[f"{module}.weight"].shape)
        with pytest.raises(lora.LoraError) as e:
            lora.check(unet, path)
        assert str(e.value) == (
            f"LoRA {path}: key '{module}.lora_A.weight': up {tuple(up.shape)} @ down "
            f"{tuple(down.shape)} does not fit {module}.weight {weight}"
        )


def test_a_half_precision_lora_is_multiplied_out_in_float32(unet, tmp_path):
    """LoRAs are often saved in float16: the update is still up @ down in float32 (a float16
    product would round every sum to 11 bits)."""
    updates = {m: (d.half(), u.half()) for m, (d, u) in lora_tensors(unet, seed=7).items()}
    path = write_lora(str(tmp_path / "half.safetensors"), updates)
    base, got = unet.state_dict(), fused(unet, [(path, 1.0)])
    for module, (down, up) in updates.items():
        want = base[f"{module}.weight"] + up.float() @ down.float()
        torch.testing.assert_close(got[f"{module}.weight"], want, rtol=0, atol=1e-6)
