"""Compare k3batch's Kandinsky 3 IP-Adapter with the fork's own code.

    python scripts/check_reference_ip_adapter.py /path/to/kandinsky3-diffusers

Imports `Attention`, `Kandi3AttnProcessorIpAdapter` and `UNetKandi3IpAdapter` from the fork's
checkout (never copied), then:
1. the published (full-size) architecture: the fork's adapter parameter names and shapes (its
   UNet built on meta) against `ip_adapter.IPAdapter` on diffusers' full-size UNet;
2. every cross-attention layer of the tiny UNet with the tiny adapter's weights: the fork's
   attention + IP processor against k3batch's processor, on the same image tokens and scale.

The fork's package imports pieces of older huggingface_hub / transformers and matplotlib; the
script stubs those names (and skips the package's heavy `__init__`) only for this import.
"""

from __future__ import annotations

import os
import sys
import types


def import_fork(checkout: str):
    import diffusers  # noqa: F401  (before the matplotlib stub: diffusers probes for it)
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    hub_constants.hf_cache_home = os.path.expanduser("~/.cache/huggingface")
    huggingface_hub.HfFolder = type("HfFolder", (), {})
    mpl = types.ModuleType("matplotlib")
    mpl.pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules.setdefault("matplotlib", mpl)
    sys.modules.setdefault("matplotlib.pyplot", mpl.pyplot)
    root = os.path.join(checkout, "src", "kandinsky3_diffusers")
    for name, path in (
        ("kandinsky3_diffusers", root),
        ("kandinsky3_diffusers.models", os.path.join(root, "models")),
    ):
        module = types.ModuleType(name)
        module.__path__ = [path]
        module.__version__ = "0"
        sys.modules[name] = module
    from kandinsky3_diffusers.models.attention_processor import Kandi3AttnProcessorIpAdapter
    from kandinsky3_diffusers.models.unet_kandi3 import Attention, UNetKandi3IpAdapter

    return Attention, Kandi3AttnProcessorIpAdapter, UNetKandi3IpAdapter


def check_names(UNetKandi3IpAdapter) -> None:
    import torch
    from diffusers import Kandinsky3UNet

    from k3batch.model import ip_adapter
    from k3batch.testing.tiny_parts import architecture

    with torch.device("meta"):
        fork = UNetKandi3IpAdapter(
            model_channels=384,
            init_channels=192,
            num_channels=4,
            time_embed_dim=1536,
            groups=32,
            head_dim=64,
        )
        ours = ip_adapter.IPAdapter(Kandinsky3UNet(in_channels=4, **architecture("full", 16)[0]))
    theirs = {
        k: tuple(v.shape) for k, v in fork.state_dict().items() if ip_adapter.is_adapter_key(k)
    }
    mine = {k: tuple(v.shape) for k, v in ours.reference_state_dict().items()}
    if theirs != mine:
        diff = sorted(set(theirs.items()) ^ set(mine.items()))
        raise SystemExit(f"names/shapes differ: {diff[:8]}")
    print(f"full-size adapter: {len(mine)} tensors, names and shapes equal")


def check_layers(Attention, Kandi3AttnProcessorIpAdapter) -> float:
    import copy

    import torch
    from diffusers import Kandinsky3UNet

    from k3batch.model import ip_adapter
    from k3batch.testing import tiny_ip_adapter
    from k3batch.testing.tiny_parts import TINY_UNET, _wake_zero_weights

    torch.manual_seed(0)
    unet = Kandinsky3UNet(in_channels=4, **TINY_UNET).eval()
    _wake_zero_weights(unet, 1)
    unet = copy.deepcopy(unet)
    adapter = tiny_ip_adapter.build_tiny_ip_adapter(unet)
    adapter.attach()
    g = torch.Generator().manual_seed(11)
    ctx_dim = unet.config.cross_attention_dim
    emb = torch.randn(2, tiny_ip_adapter.TINY_IMAGE_EMBED_DIM, generator=g)
    scale = 0.7
    worst = 0.0
    with torch.no_grad(), adapter.conditioned(emb, torch.full((2,), scale)):
        tokens = adapter.state.tokens
        for name in ip_adapter.cross_attention_layers(unet):
            attn = unet.get_submodule(name)
            dim, head_dim = attn.to_q.out_features, attn.to_q.out_features // attn.heads
            ref = Attention(attn.to_q.in_features, dim, ctx_dim, head_dim=head_dim)
            ref.to_query.weight.copy_(attn.to_q.weight)
            ref.to_key.weight.copy_(attn.to_k.weight)
            ref.to_value.weight.copy_(attn.to_v.weight)
            ref.output_layer.weight.copy_(attn.to_out[0].weight)
            proc = Kandi3AttnProcessorIpAdapter(dim, dim, image_dim=ctx_dim, head_dim=head_dim)
            proc.load_state_dict(adapter.processors[name].state_dict())
            ref.set_processor(proc)
            x = torch.randn(2, 16, attn.to_q.in_features, generator=g)
            ctx = torch.randn(2, 5, ctx_dim, generator=g)
            # All positions valid: the fork masks with masked_fill, diffusers adds the mask;
            # an all-ones mask is the same for both (the base attention is checked elsewhere).
            mine = attn(x, ctx, torch.ones(2, 5))
            theirs = ref(x, ctx, None, image_features=tokens, img_weight=scale)
            d = (mine - theirs).abs().max().item()
            print(f"{ip_adapter.reference_name(name)}: max |diff| {d:.2e}")
            worst = max(worst, d)
    return worst


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    Attention, Processor, UNet = import_fork(sys.argv[1])
    check_names(UNet)
    worst = check_layers(Attention, Processor)
    if worst > 1e-5:
        raise SystemExit(f"FAIL: max |diff| {worst:.2e}")
    print(f"OK: every layer within 1e-5 (max |diff| {worst:.2e})")


if __name__ == "__main__":
    main()
