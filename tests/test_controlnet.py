"""Kandinsky 3 ControlNet (HED): loading, architecture, and the residual path."""

import pytest
import torch

from k3batch.model.adapters import controlnet as cn
from k3batch.testing.tiny_parts import TINY_UNET

# Three skips like the real UNet (the tiny base UNet has two levels, one skip).
UNET = dict(TINY_UNET, block_out_channels=(32, 32, 64, 64))
NET = {k: v for k, v in UNET.items() if k != "encoder_hid_dim"}


def _wake(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def parts():
    from diffusers import Kandinsky3UNet

    torch.manual_seed(0)
    unet = _wake(Kandinsky3UNet(in_channels=4, **UNET), 1)
    net = _wake(cn.Kandinsky3ControlNet(**NET), 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, UNET["encoder_hid_dim"], generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hint = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return unet, net, x, torch.tensor(500.0), ctx, mask, hint


def test_folder_loads_strictly_in_the_forks_names(parts, tmp_path):
    net = parts[1]
    cn.save(net, str(tmp_path))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / cn.WEIGHT_FILES[0])))
    assert "to_time_embed.1.weight" in keys and "feature_pooling.attention.to_query.weight" in keys
    assert "input_hint_block.conv7.weight" in keys and "convs.2.weight" in keys
    assert any(".resnet_attn_blocks.0.1.attention." in k for k in keys)
    loaded = cn.load(str(tmp_path))
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # one missing tensor: strict loading refuses
    from safetensors.torch import save_file

    state = load_file(str(tmp_path / cn.WEIGHT_FILES[0]))
    state.pop("convs.0.bias")
    save_file(state, str(tmp_path / cn.WEIGHT_FILES[0]))
    with pytest.raises(RuntimeError, match="convs.0.bias"):
        cn.load(str(tmp_path))


def test_real_architecture_on_meta():
    """The fork's real config: 3 copied levels of the 384-wide UNet + hint stack + 1x1 convs."""
    fork = dict(
        model_channels=384, init_channels=192, num_channels=4, time_embed_dim=1536,
        groups=32, head_dim=64, dim_mult=(1, 2, 4, 8), num_blocks=(3, 3, 3, 3),
        context_dim=4096, hint_channels=3,
    )  # fmt: skip
    config = cn.config_from_reference(fork)
    assert config == cn.REAL_CONFIG
    with torch.device("meta"):
        net = cn.Kandinsky3ControlNet(**config)
        from diffusers import Kandinsky3UNet

        unet = Kandinsky3UNet(**{k: v for k, v in config.items() if k != "hint_channels"})
    names = dict(net.named_parameters())
    assert [tuple(names[f"convs.{i}.weight"].shape) for i in range(3)] == [
        (384, 384, 1, 1), (768, 768, 1, 1), (1536, 1536, 1, 1)
    ]  # fmt: skip
    assert tuple(names["input_hint_block.out.weight"].shape) == (192, 256, 3, 3)
    # The copied part is exactly the base UNet's first three levels + its stem, same shapes.
    base = dict(unet.named_parameters())
    copied = [k for k in names if not k.startswith(("input_hint_block.", "convs."))]
    for k in copied:
        assert tuple(base[k].shape) == tuple(names[k].shape), k
    hint = sum(p.numel() for k, p in names.items() if k.startswith("input_hint_block."))
    convs = sum(p.numel() for k, p in names.items() if k.startswith("convs."))
    # hint stack: convs 3->16->16->32->32->96->96->256 (3x3) + out 256->192
    widths = [3, 16, 16, 32, 32, 96, 96, 256, 192]
    assert hint == sum(a * b * 9 + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert convs == sum(c * c + c for c in (384, 768, 1536))
    assert all(k.startswith(("down_blocks.0.", "down_blocks.1.", "down_blocks.2.", "time_", "add_time", "conv_in")) for k in copied)  # fmt: skip


def test_controlled_forward_without_residuals_is_the_unet(parts):
    unet, _, x, t, ctx, mask, _ = parts
    with torch.no_grad():
        ours = cn.controlled_unet(unet, x, t, ctx, mask)
        theirs = unet(x, t, ctx, mask, return_dict=False)[0]
    assert torch.equal(ours, theirs)


def test_zero_scale_is_the_base_bit_for_bit_and_nonzero_changes(parts):
    unet, net, x, t, ctx, mask, hint = parts
    with torch.no_grad():
        base = unet(x, t, ctx, mask, return_dict=False)[0]
        out = cn.controlnet_eps(unet, net, x, t, ctx, mask, hint, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], base[0])
    assert (out[1] - base[1]).abs().max() > 1e-3


def _oracle(unet, net, x, t, ctx, mask, hint, scale):
    """diffusers' own forward, the residuals added to the skip half of each up block's input."""
    additive = ((1 - mask.float()) * -10000.0).unsqueeze(1)
    proj = unet.encoder_hid_proj(ctx)
    # hand-written ControlNet pass, block by block
    emb = net.time_embedding(net.time_proj(t.expand(x.shape[0])))
    emb = net.add_time_condition(emb, proj, additive)
    h = net.conv_in(x) + net.input_hint_block(hint)
    res = []
    for block, conv in zip(net.down_blocks, net.convs, strict=True):
        h = conv(block(h, emb, proj, additive))  # the fork: the conv's output goes on
        res.append(h * scale)
    hooks = []
    for level, up in enumerate(unet.up_blocks):
        if level == 0:
            continue
        r = res[len(res) - level]

        def pre(module, args, r=r):
            s = args[0]
            c = r.shape[1]
            return (torch.cat([s[:, :-c], s[:, -c:] + r], dim=1), *args[1:])

        hooks.append(up.register_forward_pre_hook(pre))
    try:
        return unet(x, t, ctx, mask, return_dict=False)[0]
    finally:
        for hk in hooks:
            hk.remove()


def test_residual_path_matches_an_independent_oracle(parts):
    unet, net, x, t, ctx, mask, hint = parts
    with torch.no_grad():
        ours = cn.controlnet_eps(unet, net, x, t, ctx, mask, hint, torch.tensor([0.7, 1.5]))
        ref = _oracle(unet, net, x, t, ctx, mask, hint, torch.tensor([0.7, 1.5]).view(-1, 1, 1, 1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_guidance_window_follows_the_forks_rule():
    # 10 steps, window [0.2, 0.5]: steps int(2)..int(5) inclusive
    got = [float(cn.step_scales([0.8], [0.2], [0.5], i, 10)[0]) for i in range(10)]
    assert got == pytest.approx([0, 0, 0.8, 0.8, 0.8, 0.8, 0, 0, 0, 0])
    # per row in one batch
    s = cn.step_scales([1.0, 2.0], [0.0, 0.9], [0.1, 1.0], 0, 10)
    assert s.tolist() == [1.0, 0.0]
