"""Kandinsky 3 ControlNet inside k3batch's sampler: `Kandinsky3.generate` with hint rows."""

import os

import numpy as np
import pytest
import torch

from k3batch.model.adapters import controlnet
from k3batch.model.kandinsky3.pipeline import Request

from .conftest import LATENT_ATOL, load_tiny

SIZE, STEPS = 64, 2


def req(seed=1, hint=None, **control):
    r = Request("a house by a lake", None, seed, SIZE, SIZE, STEPS, 3.0, hint=hint)
    for k, v in control.items():
        setattr(r, k, v)
    return r


def edges(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((SIZE, SIZE, 3)) > 0.8).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load_tiny(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_tiny(tiny_dir, controlnet=os.path.join(tiny_dir, "controlnet_hed"))


def _unet_with_skip_residuals(unet, x, t, context, mask, residuals):
    """Oracle: Kandinsky3UNet's forward written out, residual i added to encoder skip i."""
    mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
    temb = unet.time_embedding(unet.time_proj(t.expand(x.shape[0])).to(x.dtype))
    context = unet.encoder_hid_proj(context)
    temb = unet.add_time_condition(temb, context, mask)
    h, skips = unet.conv_in(x), []
    for level, block in enumerate(unet.down_blocks):
        h = block(h, temb, context, mask)
        if level < len(unet.down_blocks) - 1:
            skips.append(h + residuals[level])
    for level, block in enumerate(unet.up_blocks):
        if level:
            h = torch.cat([h, skips.pop()], dim=1)
        h = block(h, temb, context, mask)
    return unet.conv_out(unet.conv_act_out(unet.conv_norm_out(h)))


def test_skip_hooks_equal_a_hand_written_forward_with_residuals(tiny_dir):
    from diffusers.models.unets.unet_kandinsky3 import Kandinsky3UNet

    unet = Kandinsky3UNet.from_pretrained(os.path.join(tiny_dir, "unet")).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, unet.config.encoder_hid_dim, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = torch.tensor([500.0])
    # One skip in the two-level tiny UNet: level 0's output, 32 channels at 4x4.
    residuals = [torch.randn(2, 32, 4, 4, generator=gen)]
    skips = controlnet.SkipResiduals(unet)
    with torch.no_grad():
        before = unet(x, t, context, mask, return_dict=False)[0]
        skips.residuals = residuals
        hooked = unet(x, t, context, mask, return_dict=False)[0]
        skips.residuals = None
        oracle = _unet_with_skip_residuals(unet, x, t, context, mask, residuals)
        after = unet(x, t, context, mask, return_dict=False)[0]
    torch.testing.assert_close(hooked, oracle, rtol=0, atol=1e-5)
    assert (hooked - before).abs().max() > 1e-3
    assert torch.equal(after, before)


def test_zero_scale_no_hint_hint_scale_and_window(model, plain):
    """One batch: zero scale and a hintless row are the base latents bit for bit (batched with
    hinted rows); a hint, another hint, another scale and a late window each change them.

    Bit for bit against the plain model on the same six rows (it ignores hints): the same
    shapes run the same kernels. Against the two rows alone, a batch of another size, CPU
    kernels may round differently (issue 29: on AVX-512 EPYC machines they do), so that
    comparison is within LATENT_ATOL."""
    hint = edges(0)
    rows = [
        req(1, hint, controlnet_conditioning_scale=0.0),
        req(2),
        req(1, hint),
        req(1, edges(1)),
        req(1, hint, controlnet_conditioning_scale=2.0),
        # Two steps: int(2*0.6)=1 -> only step 1 is controlled.
        req(1, hint, control_guidance_start=0.6, control_guidance_end=0.9),
    ]
    out = model.sample(rows)
    base = plain.sample(rows)
    assert torch.equal(out[0], base[0])
    assert torch.equal(out[1], base[1])
    alone = plain.sample([req(1), req(2)])
    torch.testing.assert_close(out[:2], alone, atol=LATENT_ATOL, rtol=0)

    def differ(a, b):
        return (a - b).abs().max() > 1e-3

    full = out[2]
    assert differ(full, base[0]) and differ(full, out[3]) and differ(full, out[4])
    assert differ(out[5], base[0]) and differ(out[5], full)
    assert [controlnet.active(0.6, 0.9, i, 2) for i in range(2)] == [False, True]
    assert [controlnet.active(0.0, 0.4, i, 2) for i in range(2)] == [True, False]
    # And through the decoder: a zero-scale row's image is the base image.
    assert np.array_equal(
        model.generate([req(1, hint, controlnet_conditioning_scale=0.0)])[0],
        plain.generate([req(1)])[0],
    )
    # A batch with no hint does not run the ControlNet at all (it would add zeros).
    calls = []
    residuals = model.control.residuals
    model.control.residuals = lambda *a: calls.append(1) or residuals(*a)
    try:
        model.sample([req(2)])
        assert calls == []
        model.sample([req(1, hint)])
        assert len(calls) == 2  # one per step
    finally:
        del model.control.residuals


def test_controlled_rows_of_one_batch_match_the_reference_loop_with_the_forks_control(
    model, tiny_dir
):
    """The reference's DDIM loop (tests/reference_oracle.py, its own UNet) with the fork's
    pipeline rule (docs/controlnet.md): the ControlNet runs on the doubled batch, both guidance
    branches with the same hint, its residuals times the row's scale at steps
    int(n * start) <= i <= int(n * end), added to the UNet's skips by a hook written here.
    Rows of other hints, scales, windows and guidance, and a plain row, in one batch."""
    from .reference_oracle import Oracle

    net = controlnet.load(os.path.join(tiny_dir, "controlnet_hed"))
    steps = 4  # the reference's own DDIM step goes NaN at 3 (1 - abar_prev - sigma^2 < 0)

    class Controlled(Oracle):
        hint, scale, start, end, step = None, 0.0, 0.0, 1.0, 0

        def guided_eps(self, x, t, text, w, extra=None):
            ctx, cmask, uctx, umask = text
            on = int(steps * self.start) <= self.step <= int(steps * self.end)
            self.step += 1
            if self.hint is None or not on:
                return super().guided_eps(x, t, text, w, extra)
            additive = ((1 - torch.cat([cmask, umask]).float()) * -10000.0).unsqueeze(1)
            residuals = net(
                x.repeat(2, 1, 1, 1),
                torch.tensor([float(t)] * 2),
                torch.cat([ctx, uctx]),
                additive,
                self.hint.repeat(2, 1, 1, 1),
            )
            hooks = []
            for level, up in enumerate(self.unet.up_blocks):
                if level == 0:
                    continue
                r = residuals[len(residuals) - level] * self.scale

                def pre(module, args, r=r):
                    c = r.shape[1]
                    return (torch.cat([args[0][:, :-c], args[0][:, -c:] + r], 1), *args[1:])

                hooks.append(up.register_forward_pre_hook(pre))
            try:
                return super().guided_eps(x, t, text, w, extra)
            finally:
                for h in hooks:
                    h.remove()

    oracle = Controlled(tiny_dir)
    rows = [
        Request("a house by a lake", None, 3, SIZE, SIZE, steps, 4.5, hint=edges(2),
                controlnet_conditioning_scale=1.5),
        Request("a red barn", "fog", 4, SIZE, SIZE, steps, 2.0, hint=edges(3),
                controlnet_conditioning_scale=0.7, control_guidance_start=0.5),
        Request("a tower", None, 5, SIZE, SIZE, steps, 6.0),
    ]  # fmt: skip
    latents = model.sample(rows)
    for r, latent in zip(rows, latents, strict=True):
        oracle.step = 0
        oracle.hint = None
        if r.hint is not None:
            oracle.hint = torch.from_numpy(r.hint.copy()).permute(2, 0, 1)[None].float() / 255
        oracle.scale = r.controlnet_conditioning_scale
        oracle.start, oracle.end = r.control_guidance_start, r.control_guidance_end
        with torch.no_grad():
            want, _ = oracle(r.prompt, r.seed, r.guidance_scale, steps, SIZE, r.negative_prompt)
        torch.testing.assert_close(latent[None], want, atol=1e-4, rtol=1e-4)


def test_controlnet_needs_the_base_member(tiny_dir):
    with pytest.raises(ValueError, match="kandinsky3"):
        load_tiny(
            tiny_dir,
            member="kandinsky3-inpaint",
            controlnet=os.path.join(tiny_dir, "controlnet_hed"),
        )
