"""The ControlNet and IP-Adapter cases (scripts/check_reference_controlnet.py,
check_reference_ip_adapter.py) and k3batch's side of each."""

from __future__ import annotations

import numpy as np

from .files import weights_summary

# --------------------------------------------------------------------------- ControlNet
# scripts/check_reference_controlnet.py: the fork's UNetKandi3Controlnet (ai-forever/
# kandinsky3-diffusers) loaded with a tiny random k3batch ControlNet's published-layout file.
CONTROLNET_CASE = "controlnet_residuals"


def controlnet_config() -> dict:
    """A tiny ControlNet of four levels and three skips, like the real one."""
    from k3batch.testing.tiny_parts import TINY_UNET

    config = dict(TINY_UNET, block_out_channels=(32, 32, 64, 64))
    config.pop("encoder_hid_dim")
    return config


def controlnet_model():
    """The tiny ControlNet: every parameter random (seed 0, x0.2), its zero convs too, so
    the residuals are not zero."""
    import torch

    from k3batch.model.adapters import controlnet as cn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cn.Kandinsky3ControlNet(**controlnet_config())
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval()


def controlnet_inputs() -> dict[str, np.ndarray]:
    """Latents, timestep, context, its 0/1 mask and a uint8 hint picture (the golden keeps
    them all)."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, controlnet_config()["cross_attention_dim"], generator=g)
    hint = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    t = np.array([500.0, 500.0], dtype=np.float32)
    return {"x": x.numpy(), "t": t, "context": ctx.numpy(), "mask": mask, "hint": hint.numpy()}


def controlnet_hint(inputs: dict):
    import torch

    return torch.from_numpy(inputs["hint"]).float() / 127.5 - 1


def controlnet_side(model, inputs: dict) -> dict[str, np.ndarray]:
    """k3batch's ControlNet residuals, one per skip."""
    import torch

    mask = torch.from_numpy(inputs["mask"]).float()
    additive = ((1 - mask) * -10000.0).unsqueeze(1)
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["t"])[:1],
            torch.from_numpy(inputs["context"]),
            additive,
            controlnet_hint(inputs),
        )
    return {f"residual_{i}": r.numpy() for i, r in enumerate(out)}


# --------------------------------------------------------------------------- IP-Adapter
# scripts/check_reference_ip_adapter.py: the fork's UNetKandi3IpAdapter at the tiny sizes with
# the tiny base UNet and the tiny adapter file, one UNet call at several image weights.
IP_ADAPTER_CASE = "ip_adapter_unet"
IP_SCALES = (0.0, 0.5, 1.0, 2.0)


def ip_base_unet():
    """The tiny base UNet the check loads both adapters onto (seed 0, zero weights woken)."""
    import torch
    from diffusers import Kandinsky3UNet

    from k3batch.testing.tiny_parts import TINY_UNET, _wake_zero_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = Kandinsky3UNet(in_channels=4, **TINY_UNET).eval()
    _wake_zero_weights(base, 1)
    return base


def ip_adapter_file(folder: str, base) -> str:
    import torch

    from k3batch.testing.tiny_ip_adapter import make_tiny_ip_adapter

    with torch.random.fork_rng(devices=[]):
        return make_tiny_ip_adapter(folder, base)


def ip_weights(base, adapter_file: str) -> dict:
    from safetensors.torch import load_file

    named = [(f"unet/{k}", v) for k, v in base.state_dict().items()]
    return weights_summary(
        named + [(f"adapter/{k}", v) for k, v in load_file(adapter_file).items()]
    )


def ip_inputs() -> dict[str, np.ndarray]:
    import torch

    from k3batch.testing.tiny_ip_adapter import TINY_IMAGE_EMBED_DIM
    from k3batch.testing.tiny_parts import TINY_UNET

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 6, TINY_UNET["encoder_hid_dim"], generator=g)
    emb = torch.randn(2, TINY_IMAGE_EMBED_DIM, generator=g)
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, 4:] = 0
    t = np.array([999, 421], dtype=np.int64)
    return {
        "x": x.numpy(),
        "t": t,
        "context": ctx.numpy(),
        "mask": mask,
        "image_embeds": emb.numpy(),
    }


def ip_side(base, adapter_file: str, inputs: dict) -> dict[str, np.ndarray]:
    """The base UNet with k3batch's adapter (`ip_adapter.load`) at each of `IP_SCALES`, and
    without it ("plain")."""
    import torch

    from k3batch.model.adapters import ip_adapter

    adapter = ip_adapter.load(base, adapter_file)
    x, t, ctx, mask, emb = (
        torch.from_numpy(inputs[k]) for k in ("x", "t", "context", "mask", "image_embeds")
    )
    out = {}
    with torch.no_grad():
        out["plain"] = base(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        for i, scale in enumerate(IP_SCALES):
            with adapter.conditioned(emb, torch.full((2,), scale)):
                out[f"scale_{i}"] = base(
                    x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask
                ).sample
    return {k: v.numpy() for k, v in out.items()}
