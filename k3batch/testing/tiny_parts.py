"""The parts of tiny random-weight Kandinsky 3 family checkpoints: tokenizer, architectures
(tiny, bench, and full-size for GPU benchmarks) and seeded random components.

Same architecture classes as the real models (Kandinsky3UNet for base and Flash, its 9-in
variant for inpainting, an x8 SpatialNorm MoVQ, a T5 encoder and a T5 tokenizer), with small
widths, so tests and the demo run the real loading
and sampling code on a CPU in seconds. Weights are random but seeded: every machine that
builds the model gets the same weights, so a cluster's workers can each build their own.
"""

from __future__ import annotations

import json

from k3batch.model.kandinsky3 import members as k3_members

TINY_SEED = 20231122
MARKER = "k3batch_tiny.json"
# 3: the tiny set holds the IP-Adapter folder (an older set is rebuilt, not used without it).
TINY_FORMAT = 3

_COLOURS = [
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "black",
    "white",
    "golden",
    "silver",
    "rusty",
]
_SUBJECTS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "whale",
    "castle",
    "lighthouse",
    "robot",
    "dragon",
    "tree",
    "forest",
    "city",
    "street",
    "bridge",
    "mountain",
    "lake",
    "river",
    "boat",
    "train",
    "bicycle",
    "teapot",
    "guitar",
    "violin",
    "astronaut",
    "knight",
    "wizard",
    "flower",
    "garden",
    "cake",
    "bowl",
    "portrait",
    "village",
]
_STYLES = [
    "oil painting",
    "watercolor",
    "pencil sketch",
    "photo",
    "3d render",
    "pixel art",
    "anime style",
    "ukiyo-e print",
    "cinematic still",
    "studio lighting",
    "isometric view",
    "low poly",
]
_PLACES = [
    "at sunset",
    "in the rain",
    "under the stars",
    "on the moon",
    "in winter",
    "in a misty morning",
]


def corpus() -> list[str]:
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, colour in enumerate(_COLOURS):
            style = _STYLES[(i + j) % len(_STYLES)]
            place = _PLACES[(i * 3 + j) % len(_PLACES)]
            lines.append(f"a {colour} {subject} {place}, {style}")
    return lines


def build_tokenizer():
    """A small T5 (Unigram) tokenizer trained offline; ids 0/1/2 are <pad>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(corpus(), trainer)
    vocab = [tuple(item) for item in json.loads(tok.to_str())["model"]["vocab"]]
    # The trainer's scores vary in the last bits from run to run (its EM sums run in
    # parallel), and it orders pieces of equal score differently, which swaps their ids.
    # Rounded scores, ties ordered by the piece: every build gets the same tokenizer.
    specials, pieces = vocab[:3], [(p, round(s, 9)) for p, s in vocab[3:]]
    return T5Tokenizer(vocab=specials + sorted(pieces, key=lambda v: (-v[1], v[0])), extra_ids=0)


TINY_UNET = dict(
    time_embedding_dim=4,
    groups=2,
    attention_head_dim=4,
    layers_per_block=3,
    block_out_channels=(32, 64),
    cross_attention_dim=4,
    encoder_hid_dim=32,
)
# Four levels: a true x8 autoencoder like the real MoVQ. 32 groups as in the reference's
# MoVQ (its GroupNorms are hard-coded to 32), so channels are multiples of 32.
TINY_MOVQ = dict(
    block_out_channels=[32, 32, 64, 64],
    down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    norm_type="spatial",
    num_vq_embeddings=12,
    vq_embed_dim=4,
)

# Benchmark size: the same classes, wider (UNet 128/256 channels, 32-wide heads; MoVQ
# 64/128), so a batch of 4 at 128x128 and 8 steps costs about a second on a 2-core CPU in
# fewer, larger operations, as the real model's are (the tiny one's are mostly overhead).
BENCH_UNET = dict(
    TINY_UNET,
    time_embedding_dim=128,
    groups=32,
    attention_head_dim=32,
    layers_per_block=2,
    block_out_channels=(128, 256),
    cross_attention_dim=128,
)
BENCH_MOVQ = dict(TINY_MOVQ, block_out_channels=[64, 64, 128, 128])
SIZES = {"tiny": (TINY_UNET, TINY_MOVQ), "bench": (BENCH_UNET, BENCH_MOVQ)}


TINY_T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=5,
    num_heads=4,
    relative_attention_num_buckets=8,
)


def diffusers_scheduler():
    """The scheduler that makes a directory a diffusers Kandinsky3Pipeline (and the one that
    pipeline samples with); k3batch samples with the reference schedule, not with it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        thresholding=False,
        variance_type="fixed_small",
    )


def _wake_zero_weights(module, seed: int) -> None:
    """Give zero-initialised weights (the UNet's time-conditioned norms) small random values.

    Kandinsky3UNet starts its ConditionalGroupNorm MLPs at zero, which would make a random
    UNet ignore the timestep, the attention pooling and the null embedding; tests must see
    those paths.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def build_components(null_embedding: bool = True, size: str = "tiny"):
    """The tiny components, seeded: shared tokenizer, T5, MoVQ; one UNet per family member.

    UNet sizes follow diffusers' own Kandinsky 3 tests; each member has its own weights and
    its own text projection (`encoder_hid_proj`), as the real Flash and inpainting models do.
    `size`: `tiny`, or `bench` (wider UNet and MoVQ, same T5; see BENCH_UNET).
    """
    import torch
    from diffusers import VQModel
    from transformers import T5EncoderModel

    from k3batch.model.kandinsky3.loading import t5_config, unet_class

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    unet_config, movq_config = SIZES[size]
    tokenizer = build_tokenizer()
    unets = {}
    for i, name in enumerate(k3_members.NAMES):
        member = k3_members.MEMBERS[name]
        torch.manual_seed(TINY_SEED + 10 * i)
        unet = unet_class(member)(in_channels=member.in_channels, **unet_config)
        _wake_zero_weights(unet, TINY_SEED + 10 * i + 1)
        torch.manual_seed(TINY_SEED + 10 * i + 2)
        null = torch.randn(unet_config["cross_attention_dim"]) if null_embedding else None
        unets[name] = (unet.eval(), null)
    torch.manual_seed(TINY_SEED + 1)
    movq = VQModel(**movq_config)
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = T5EncoderModel(t5_config(TINY_T5, len(tokenizer)))
    scheduler = diffusers_scheduler()
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        movq=movq.eval(),
        scheduler=scheduler,
        unets=unets,
    )


def architecture(size: str, tiny_vocab: int) -> tuple[dict, dict, object]:
    """(UNet kwargs, MoVQ kwargs, T5Config) of the `tiny` or `full` (real) architecture."""
    from k3batch.model.kandinsky3.loading import full_architecture, t5_config

    if size == "full":
        return full_architecture()
    if size == "tiny":
        return TINY_UNET, TINY_MOVQ, t5_config(TINY_T5, tiny_vocab)
    raise ValueError(f"size must be tiny or full, got {size!r}")


def random_components(
    size: str,
    device,
    dtype,
    seed: int = TINY_SEED,
    members: tuple[str, ...] | None = None,
    text_encoder: bool = True,
) -> dict:
    """Random-weight components of the `tiny` or `full` (real) architecture, for benchmarks.

    Built on the meta device and materialised on `device` in `dtype`, so the full size
    (12B parameters) never takes float32 host memory. Weights are N(0, 1/fan_in), norm
    scales 1, biases 0: activations stay in range through the real depth. Returns what
    `build_components` does, with UNets for base and Flash (no inpainting) as
    {name: (unet, null_embedding)} (`members` picks fewer); the tokenizer is the tiny one at both sizes (token ids
    fit the full vocabulary; the encoder runs on 128 positions whatever the prompt).
    `text_encoder=False` leaves T5 out (None): UNet and MoVQ benchmarks need no 8.7B encoder.
    """
    import torch
    from diffusers import Kandinsky3UNet, VQModel
    from transformers import T5EncoderModel

    tokenizer = build_tokenizer()
    unet_config, movq_config, t5_config = architecture(size, len(tokenizer))
    gen = torch.Generator(device).manual_seed(seed)

    def materialise(build):
        with torch.device("meta"):
            model = build()
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast.
        model = torch.nn.Module.to(model, dtype).to_empty(device=device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
                else:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
        return model.eval()

    unets = {}
    for name in members or (k3_members.BASE, k3_members.FLASH):
        unet = materialise(lambda: Kandinsky3UNet(in_channels=4, **unet_config))
        null = torch.randn(unet_config["cross_attention_dim"], generator=gen, device=device)
        unets[name] = (unet, null)
    return dict(
        tokenizer=tokenizer,
        text_encoder=materialise(lambda: T5EncoderModel(t5_config)) if text_encoder else None,
        movq=materialise(lambda: VQModel(**movq_config)),
        scheduler=diffusers_scheduler(),
        unets=unets,
    )
