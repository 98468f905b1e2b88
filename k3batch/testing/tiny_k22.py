"""Tiny random-weight Kandinsky 2.2 components, built offline, in diffusers' folder layout.

The same classes as the real checkpoints, at the sizes diffusers' own Kandinsky 2.2 tests use
(tests/pipelines/kandinsky2_2/): a `PriorTransformer` with a CLIP text tower, a CLIP image
tower and an `UnCLIPScheduler` (the prior folder), and per decoder member an image-conditioned
`UNet2DConditionModel` (4, 9 or 8+hint input channels), a `DDPMScheduler` as the real decoder
repos have, and the x8 MoVQ k3batch builds for Kandinsky 3. A tiny `DPTForDepthEstimation`
stands in for `Intel/dpt-large`. The CLIP tokenizer is trained here (no Hub download).
Weights are random but seeded, so every machine builds the same model.

Layout under `path`: `prior/` (a `KandinskyV22PriorPipeline` folder), `decoder/`,
`decoder-inpaint/`, `controlnet-depth/` (decoder pipeline folders) and `depth/`.
"""

from __future__ import annotations

import json
import os

from k3batch.model.kandinsky22.members import TINY_DEPTH as TINY_K22_DEPTH
from k3batch.model.kandinsky22.members import TINY_FOLDERS as TINY_K22_FOLDERS
from k3batch.model.kandinsky22.members import TINY_PRIOR as TINY_K22_PRIOR
from k3batch.testing.build_once import build_dir
from k3batch.testing.tiny_parts import TINY_MOVQ, TINY_SEED

MARKER = "k3batch_tiny_k22.json"
TINY_K22_FORMAT = 2
EMBED_DIM = 32  # CLIP projection = prior embedding = the decoder's image-embedding width
CLIP_IMAGE_SIZE = 224
DEPTH_IMAGE_SIZE = 32

# Folder of each decoder member under the tiny root: where `model.make_tiny` looks.
DECODER_FOLDERS = TINY_K22_FOLDERS

TINY_DECODER_UNET = dict(
    out_channels=8,  # epsilon + learned variance, as the real decoder
    addition_embed_type="image",
    encoder_hid_dim_type="image_proj",
    encoder_hid_dim=EMBED_DIM,
    cross_attention_dim=32,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=4,
    resnet_time_scale_shift="scale_shift",
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    class_embed_type=None,
)
# in_channels and the addition embedding per member (diffusers' tests).
MEMBER_UNET = {
    "kandinsky2.2": dict(in_channels=4),
    "kandinsky2.2-inpaint": dict(in_channels=9),
    "kandinsky2.2-controlnet-depth": dict(in_channels=8, addition_embed_type="image_hint"),
}


def decoder_scheduler():
    """The real decoder repos' scheduler (DDPM, linear betas 0.00085..0.012, offset 1)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
        variance_type="fixed_small",
    )


def build_prior_pipeline():
    """A seeded tiny `KandinskyV22PriorPipeline`."""
    import torch

    from k3batch.model.kandinsky22.loading import pil_fallback_quiet

    with pil_fallback_quiet():
        from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessorPil,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from k3batch.testing.tiny_scorers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(TINY_SEED + 100)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=32,
            projection_dim=EMBED_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(TINY_SEED + 101)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            image_size=CLIP_IMAGE_SIZE,
            projection_dim=EMBED_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            patch_size=14,
        )
    )
    torch.manual_seed(TINY_SEED + 102)
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1
    )
    # clip_mean/clip_std un-normalise the prior's output; at their zero init every embedding
    # would be 0 and the decoder would never see the prompt.
    g = torch.Generator().manual_seed(TINY_SEED + 103)
    with torch.no_grad():
        prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape, generator=g))
        prior.clip_std.copy_(1.0 + 0.1 * torch.rand(prior.clip_std.shape, generator=g))
    image_processor = CLIPImageProcessorPil(
        crop_size=CLIP_IMAGE_SIZE,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size=CLIP_IMAGE_SIZE,
    )
    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    return KandinskyV22PriorPipeline(
        prior=prior.eval(),
        image_encoder=image_encoder.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=image_processor,
    )


def build_decoder_pipeline(member: str, movq=None):
    """A seeded tiny decoder pipeline of `member` (its own UNet; `movq` shared if given)."""
    import torch
    from diffusers import (
        KandinskyV22ControlnetPipeline,
        KandinskyV22InpaintPipeline,
        KandinskyV22Pipeline,
        UNet2DConditionModel,
        VQModel,
    )

    index = list(DECODER_FOLDERS).index(member)
    torch.manual_seed(TINY_SEED + 110 + index)
    unet = UNet2DConditionModel(**{**TINY_DECODER_UNET, **MEMBER_UNET[member]})
    if movq is None:
        torch.manual_seed(TINY_SEED + 1)  # the Kandinsky 3 tiny MoVQ's seed and config
        movq = VQModel(**TINY_MOVQ)
    cls = {
        "kandinsky2.2": KandinskyV22Pipeline,
        "kandinsky2.2-inpaint": KandinskyV22InpaintPipeline,
        "kandinsky2.2-controlnet-depth": KandinskyV22ControlnetPipeline,
    }[member]
    return cls(unet=unet.eval(), scheduler=decoder_scheduler(), movq=movq.eval())


def build_depth_estimator():
    """(tiny random DPTForDepthEstimation, its DPTImageProcessor)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    torch.manual_seed(TINY_SEED + 120)
    config = DPTConfig(
        image_size=DEPTH_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4,
        intermediate_size=37,
        neck_hidden_sizes=[8, 16, 16, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
        is_hybrid=False,
    )
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessorPil(
        size={"height": DEPTH_IMAGE_SIZE, "width": DEPTH_IMAGE_SIZE}, keep_aspect_ratio=False
    )
    return model, processor


def is_tiny_k22(path: str) -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("format") == TINY_K22_FORMAT


def make_tiny_k22(path: str, overwrite: bool = False) -> str:
    """Write the tiny Kandinsky 2.2 folders under `path`, once however many processes ask at
    the same time (`testing.build_once`); returns `path`."""

    def write(tmp: str) -> None:
        import torch
        from diffusers import VQModel

        build_prior_pipeline().save_pretrained(os.path.join(tmp, TINY_K22_PRIOR))
        torch.manual_seed(TINY_SEED + 1)
        movq = VQModel(**TINY_MOVQ)  # one MoVQ for all decoders, as the real repos share it
        for member, folder in DECODER_FOLDERS.items():
            build_decoder_pipeline(member, movq).save_pretrained(os.path.join(tmp, folder))
        model, processor = build_depth_estimator()
        model.save_pretrained(os.path.join(tmp, TINY_K22_DEPTH))
        processor.save_pretrained(os.path.join(tmp, TINY_K22_DEPTH))
        with open(os.path.join(tmp, MARKER), "w") as f:  # last: the set is complete
            json.dump({"format": TINY_K22_FORMAT, "seed": TINY_SEED}, f)

    return build_dir(path, write, is_tiny_k22, overwrite=overwrite)
