"""Kandinsky 3 IP-Adapter: the fork's layout loaded strictly, the decoupled attention against a
hand-written oracle, scale 0 / no image reproducing the base UNet bit for bit, image mixing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from k3batch.model.adapters import ip_adapter  # noqa: E402
from k3batch.testing import tiny_ip_adapter  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    from diffusers import Kandinsky3UNet

    from k3batch.testing.tiny_parts import TINY_UNET, _wake_zero_weights

    torch.manual_seed(0)
    u = Kandinsky3UNet(in_channels=4, **TINY_UNET).eval()
    _wake_zero_weights(u, 1)
    return u


def _fresh(unet):
    import copy

    return copy.deepcopy(unet)


def _inputs(batch=2, context_dim=32):
    """UNet inputs (the text context before the UNet's projection: 32 wide) and embeddings."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, context_dim, generator=g)
    mask = torch.ones(batch, 5)
    mask[0, 3:] = 0
    emb = torch.randn(batch, tiny_ip_adapter.TINY_IMAGE_EMBED_DIM, generator=g)
    return x, ctx, mask, emb


def test_layers_and_names_follow_the_fork(unet):
    names = ip_adapter.cross_attention_layers(unet)
    # Tiny UNet: 2 levels; every cross-attention layer (down 1, up 0 and 1), 3 blocks each.
    assert [ip_adapter.reference_name(n) for n in names] == [
        f"{side}_samples.{level}.resnet_attn_blocks.{j}.1.attention"
        for side, level in (("down", 1), ("up", 0), ("up", 1))
        for j in range(3)
    ]
    keys = tiny_ip_adapter.build_tiny_ip_adapter(unet).reference_state_dict()
    assert "image_proj.weight" in keys and "image_norm.bias" in keys
    assert "down_samples.1.resnet_attn_blocks.0.1.attention.processor.to_key_ip.weight" in keys
    assert all(ip_adapter.is_adapter_key(k) for k in keys)


def test_real_architecture_names_and_shapes_match_the_fork():
    """On meta: the full-size UNet's adapter has the fork's hard-coded layers and sizes."""
    from diffusers import Kandinsky3UNet

    from k3batch.testing.tiny_parts import architecture

    unet_config = architecture("full", 16)[0]
    with torch.device("meta"):
        adapter = ip_adapter.IPAdapter(Kandinsky3UNet(in_channels=4, **unet_config))
    shapes = {k: tuple(v.shape) for k, v in adapter.reference_state_dict().items()}
    assert shapes["image_proj.weight"] == (4 * 4096, 768)
    assert shapes["image_norm.weight"] == (4096,)
    # The fork's set_ip_processors: (level, block) -> channels.
    fork = {("down", 1): 768, ("down", 2): 1536, ("down", 3): 3072, ("up", 0): 3072}
    for (side, level), ch in fork.items():
        for j in range(3):
            p = f"{side}_samples.{level}.resnet_attn_blocks.{j}.1.attention.processor."
            assert shapes[p + "to_key_ip.weight"] == (ch, 4096)
            assert shapes[p + "to_v_ip.bias"] == (ch,)
            assert shapes[p + "to_out_ip.weight"] == (ch, ch)
    assert shapes["up_samples.1.resnet_attn_blocks.0.1.attention.processor.to_key_ip.weight"] == (
        3072,
        4096,
    )
    assert shapes["up_samples.1.resnet_attn_blocks.1.1.attention.processor.to_key_ip.weight"] == (
        1536,
        4096,
    )
    assert shapes["up_samples.2.resnet_attn_blocks.0.1.attention.processor.to_key_ip.weight"] == (
        1536,
        4096,
    )
    assert shapes["up_samples.2.resnet_attn_blocks.2.1.attention.processor.to_key_ip.weight"] == (
        768,
        4096,
    )
    assert len([k for k in shapes if k.endswith("to_key_ip.weight")]) == 18


def test_tiny_file_loads_strictly(unet, tmp_path):
    path = tiny_ip_adapter.make_tiny_ip_adapter(str(tmp_path), unet)
    u = _fresh(unet)
    adapter = ip_adapter.load(u, path)
    want = tiny_ip_adapter.build_tiny_ip_adapter(unet).reference_state_dict()
    got = adapter.reference_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A missing key or a wrong shape is refused, naming the key.
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    del state["image_norm.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="image_norm.bias"):
        ip_adapter.load(_fresh(unet), str(tmp_path / "missing.safetensors"))
    state = load_file(path)
    key = "up_samples.0.resnet_attn_blocks.1.1.attention.processor.to_v_ip.bias"
    state[key] = torch.zeros(3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="to_v_ip.bias: shape"):
        ip_adapter.load(_fresh(unet), str(tmp_path / "shape.safetensors"))


def test_pickle_of_a_whole_unet_reads_only_adapter_keys(unet, tmp_path):
    adapter = tiny_ip_adapter.build_tiny_ip_adapter(unet)
    state = dict(adapter.reference_state_dict())
    state["in_layer.weight"] = torch.zeros(2)  # a UNet key: not the adapter's
    torch.save(state, tmp_path / "unet.pt")
    assert set(ip_adapter.read_weights(str(tmp_path / "unet.pt"))) == set(
        adapter.reference_state_dict()
    )


def _oracle_layer(attn, proc, x, ctx, mask, tokens, scale):
    """Hand-written attention: masked text attention plus the decoupled image branch."""
    h = attn.heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
    s = (q @ k.transpose(-1, -2)) * attn.scale
    # The text half as diffusers' Kandinsky 3 attention (the wrapped processor) applies the
    # context mask: added to the scores. The image half has no mask.
    s = s + mask[:, None, None, :]
    text = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    text = attn.to_out[0](text)
    ki, vi = split(proc.to_key_ip(tokens)), split(proc.to_v_ip(tokens))
    si = ((q @ ki.transpose(-1, -2)) * attn.scale).softmax(-1)
    img = (si @ vi).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return text + proc.to_out_ip(img) * scale[:, None, None]


def test_processor_matches_hand_written_attention(unet):
    u = _fresh(unet)
    adapter = tiny_ip_adapter.build_tiny_ip_adapter(u)
    adapter.attach()
    name = ip_adapter.cross_attention_layers(u)[1]
    attn = u.get_submodule(name)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    _, ctx, mask, emb = _inputs(context_dim=u.config.cross_attention_dim)
    scale = torch.tensor([1.0, 0.5])
    with torch.no_grad(), adapter.conditioned(emb, scale):
        got = attn(x, ctx, mask)
        want = _oracle_layer(
            attn, adapter.processors[name], x, ctx, mask, adapter.state.tokens, scale
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scale_zero_and_no_image_reproduce_the_base_unet(unet):
    x, ctx, mask, emb = _inputs()
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        base = unet(x, t, ctx, mask, return_dict=False)[0]
        u = _fresh(unet)
        adapter = tiny_ip_adapter.build_tiny_ip_adapter(u)
        adapter.attach()
        plain = u(x, t, ctx, mask, return_dict=False)[0]  # no image tokens set
        with adapter.conditioned(emb, torch.tensor([0.0, 1.0])):
            mixed = u(x, t, ctx, mask, return_dict=False)[0]
    assert torch.equal(plain, base)
    # Row 0 at scale 0 is the base row bit for bit; row 1 is changed by its image.
    assert torch.equal(mixed[0], base[0])
    assert not torch.allclose(mixed[1], base[1], atol=1e-4)


def test_untrained_adapter_is_the_identity(unet):
    """to_out_ip starts at zero as in the fork: a fresh adapter does not change the UNet."""
    x, ctx, mask, emb = _inputs()
    t = torch.tensor([10.0, 10.0])
    u = _fresh(unet)
    adapter = ip_adapter.IPAdapter(u, image_embed_dim=emb.shape[1])
    adapter.attach()
    with torch.no_grad(), adapter.conditioned(emb, torch.ones(2)):
        out = u(x, t, ctx, mask, return_dict=False)[0]
        base = unet(x, t, ctx, mask, return_dict=False)[0]
    assert torch.equal(out, base)


def test_mixing_weights_as_the_fork_does():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(3, 8, generator=g)
    w = torch.tensor([0.2, 0.5, 0.3])
    mixed = ip_adapter.mix_embeddings(e, w)
    torch.testing.assert_close(mixed, 0.2 * e[0] + 0.5 * e[1] + 0.3 * e[2])
    # Order of the images does not matter; weights are not normalised (2x weights, 2x embedding).
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(ip_adapter.mix_embeddings(e[perm], w[perm]), mixed)
    torch.testing.assert_close(ip_adapter.mix_embeddings(e, 2 * w), 2 * mixed)
