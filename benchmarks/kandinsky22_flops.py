"""Kandinsky 2.2: the prior's share of an image's FLOPs, counted on meta-device copies of the
real architectures (no weights, no GPU; seconds on a CPU). It is why k3batch runs the prior
and the decoder in one generation actor rather than in two pools (docs/kandinsky22.md).

The architectures are those of kandinsky-community/kandinsky-2-2-prior and -decoder as
k3batch knows them (parameter counts printed: the Hub's float16 files give ~1.02B and
~1.23B, `model/memory.py`); `gpu_bench.py --members kandinsky2.2` builds the whole member
(CLIP towers and MoVQ too) from the same constants. FLOPs: torch's FlopCounterMode, eager attention, guided steps
(two branches each), a 768x768 image (Ikomia's default).

    .venv/bin/python benchmarks/kandinsky22_flops.py [--size 768] [--prior-steps 25] [--steps 100]
"""

from __future__ import annotations

import argparse

from k3batch.model.kandinsky3.loading import REFERENCE_MOVQ_CONFIG

PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=1280)
DECODER_UNET = dict(
    in_channels=4,
    out_channels=8,
    block_out_channels=(384, 768, 1152, 1536),
    layers_per_block=3,
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=64,
    cross_attention_dim=768,
    encoder_hid_dim=1280,
    encoder_hid_dim_type="image_proj",
    addition_embed_type="image",
    resnet_time_scale_shift="scale_shift",
    class_embed_type=None,
)
TEXT_TOKENS = 77
# The prior's CLIP ViT-bigG-14 towers and the decoder's 67M MoVQ (gpu_bench.py builds the
# whole member from these; the FLOP count here needs only the prior and the UNet).
TEXT = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    max_position_embeddings=TEXT_TOKENS,
    vocab_size=49408,
    hidden_act="gelu",
)
VISION = dict(
    hidden_size=1664,
    intermediate_size=8192,
    num_attention_heads=16,
    num_hidden_layers=48,
    patch_size=14,
    image_size=224,
    projection_dim=1280,
    hidden_act="gelu",
)
# Kandinsky 3's MoVQ architecture at half its width (the 2.2 decoder repo's movq config).
MOVQ = {**REFERENCE_MOVQ_CONFIG, "block_out_channels": [128, 256, 256, 512]}


def step_flops(side: int) -> tuple[dict[str, float], dict[str, float]]:
    """(parameters, FLOPs of one guided step) of the prior and of the decoder's UNet."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        prior = PriorTransformer(**PRIOR)
        unet = UNet2DConditionModel(**DECODER_UNET)
    unet.set_attn_processor(AttnAddedKVProcessor())  # eager: the FLOP counter sees matmuls
    dim, latent = PRIOR["embedding_dim"], side // 8
    calls = {
        "prior": lambda: prior(
            torch.zeros(2, dim),
            timestep=torch.tensor([999, 999]),
            proj_embedding=torch.zeros(2, dim),
            encoder_hidden_states=torch.zeros(2, TEXT_TOKENS, dim),
            attention_mask=torch.ones(2, TEXT_TOKENS, dtype=torch.bool),
        ),
        "decoder": lambda: unet(
            torch.zeros(2, 4, latent, latent),
            torch.tensor([999, 999]),
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": torch.zeros(2, dim)},
        ),
    }
    flops = {}
    with torch.device("meta"), torch.no_grad():
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            flops[name] = float(counter.get_total_flops())
    params = {
        n: sum(p.numel() for p in m.parameters()) for n, m in (("prior", prior), ("decoder", unet))
    }
    return params, flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    params, flops = step_flops(args.size)
    prior = flops["prior"] * args.prior_steps
    decoder = flops["decoder"] * args.steps
    print(f"\nKandinsky 2.2 FLOPs per image, {args.size}x{args.size}, guided steps")
    print(f"prior     {params['prior'] / 1e9:.2f}B params, {args.prior_steps} steps: {prior:.3g}")
    print(f"decoder   {params['decoder'] / 1e9:.2f}B params, {args.steps} steps: {decoder:.3g}")
    print(f"prior share {prior / (prior + decoder):.4f} of the image's FLOPs")


if __name__ == "__main__":
    main()
