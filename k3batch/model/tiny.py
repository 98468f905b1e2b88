"""Tiny random-weight Kandinsky 3 checkpoints, built offline, in the real on-disk layout.

Same architecture classes as the real model (Kandinsky3UNet, an x8 SpatialNorm MoVQ, a T5
encoder and a T5 tokenizer), with small widths, so tests and the demo run the real loading
and sampling code on a CPU in seconds. Weights are random but seeded: every machine that
builds the model gets the same weights, so a cluster's workers can each build their own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TINY_SEED = 20231122
MARKER = "k3batch_tiny.json"
TINY_FORMAT = 1

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


def _corpus() -> list[str]:
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
    tok.train_from_iterator(_corpus(), trainer)
    vocab = [tuple(item) for item in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_components(null_embedding: bool = True):
    """The tiny components, seeded. Sizes follow diffusers' own Kandinsky 3 tests."""
    import torch
    from diffusers import DDPMScheduler, Kandinsky3UNet, VQModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(TINY_SEED)
    unet = Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=3,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=32,
    )
    torch.manual_seed(TINY_SEED + 1)
    # Four levels: a true x8 autoencoder like the real MoVQ (SpatialNorm needs channels that
    # are multiples of 32 here).
    movq = VQModel(
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = T5EncoderModel(
        T5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=5,
            num_heads=4,
            relative_attention_num_buckets=8,
            vocab_size=len(tokenizer),
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # The scheduler config only makes the directory a complete diffusers pipeline; k3batch
    # samples with the reference schedule, not with this object.
    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        thresholding=False,
        variance_type="fixed_small",
    )
    torch.manual_seed(TINY_SEED + 3)
    null = torch.randn(4) if null_embedding else None
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        movq=movq.eval(),
        scheduler=scheduler,
        null_embedding=null,
    )


def is_tiny_checkpoint(path: str) -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("format") == TINY_FORMAT


def make_tiny(path: str, null_embedding: bool = True, overwrite: bool = False) -> str:
    """Write a tiny diffusers-layout Kandinsky 3 checkpoint to `path` (atomic rename)."""
    if is_tiny_checkpoint(path) and not overwrite:
        return path
    from diffusers import Kandinsky3Pipeline
    from safetensors.torch import save_file

    parts = build_components(null_embedding=null_embedding)
    null = parts.pop("null_embedding")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        Kandinsky3Pipeline(**parts).save_pretrained(tmp)
        if null is not None:
            save_file(
                {"null_embedding": null.contiguous()},
                os.path.join(tmp, "unet", "null_embedding.safetensors"),
            )
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(
                {"format": TINY_FORMAT, "seed": TINY_SEED, "null_embedding": null is not None}, f
            )
        if os.path.exists(path):
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process (a second worker on this node) finished first.
            if not is_tiny_checkpoint(path):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
