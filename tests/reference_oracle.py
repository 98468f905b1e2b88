"""An independent, literal re-statement of the reference sampler (ai-forever/Kandinsky-3,
t2i_pipeline.py + model/diffusion.py) for ONE prompt per call, used as a test oracle.

It keeps the reference's own choices that k3batch changes for batching: the context is cut
to the prompt's length + 1 and the UNet's attention pooling is diffusers' stock mean. Noise
comes from one generator in the reference's draw order (initial latent, then one draw per
step), which is what k3batch's per-row generator reproduces.
"""

import math

import numpy as np
import torch
from diffusers import Kandinsky3UNet, VQModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel


def betas_cosine(timesteps=1000):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [
            min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
            for i in range(timesteps)
        ],
        dtype=torch.float32,
    )


class Oracle:
    def __init__(self, path):
        self.tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder").eval()
        self.unet = Kandinsky3UNet.from_pretrained(path, subfolder="unet").eval()
        self.proj = self.unet.encoder_hid_proj  # the reference projects inside its text encoder
        self.unet.encoder_hid_proj = torch.nn.Identity()
        self.movq = VQModel.from_pretrained(path, subfolder="movq").eval()
        self.null = load_file(f"{path}/unet/null_embedding.safetensors")["null_embedding"]
        self.ac = torch.cumprod(1.0 - betas_cosine(), dim=0)

    def encode(self, ids, mask):
        ctx = self.proj(self.t5(input_ids=ids[None], attention_mask=mask[None]).last_hidden_state)
        m = mask[None]
        ctx[m == 0] = torch.zeros_like(ctx[m == 0])
        n = int(m.sum(-1).max()) + 1
        return ctx[:, :n], m[:, :n]

    @torch.no_grad()
    def __call__(self, prompt, seed, w=3.0, steps=4, size=64, negative=None):
        enc = self.tok(prompt, max_length=128, truncation=True)["input_ids"]
        pad = 128 - len(enc)
        ids = torch.tensor(enc + [0] * pad)
        mask = torch.tensor([1] * len(enc) + [0] * pad)
        ctx, cmask = self.encode(ids, mask)
        if negative is not None:
            neg = self.tok(negative, max_length=128, truncation=True)["input_ids"][: len(enc)]
            neg[-1] = 1
            nids = torch.tensor(neg + [0] * (128 - len(neg)))
            uctx, umask = self.encode(nids, mask)
        else:
            uctx, umask = torch.zeros_like(ctx), torch.zeros_like(cmask)
            uctx[:, 0] = self.null
            umask[:, 0] = 1
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, size // 8, size // 8, generator=g)
        times = list(range(999, 0, -1000 // steps)) + [0]
        for t, pt in zip(times[:-1], times[1:], strict=True):
            big = self.unet(
                x.repeat(2, 1, 1, 1),
                torch.tensor([t, t], dtype=torch.float32),
                torch.cat([ctx, uctx]),
                torch.cat([cmask, umask]),
            ).sample
            c, u = big.chunk(2)
            eps = (w + 1) * c - w * u
            a, ap = self.ac[t], self.ac[pt]
            x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
            q = (
                torch.quantile(x0.reshape(1, -1).abs(), 0.99, dim=-1)
                .clamp(min=1.0)
                .reshape(1, 1, 1, 1)
            )
            x0 = torch.clip(x0, -q, q) / q
            eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
            var = torch.sqrt(1.0 * (1 - a / ap) * (1 - ap) / (1 - a))
            mean = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap - var**2) * eps
            noise = torch.randn(x.shape, generator=g)
            x = mean + (1.0 if pt != 0 else 0.0) * var * noise
        img = self.movq.decode(x, force_not_quantize=True).sample
        img = torch.clip((img + 1) / 2, 0, 1)
        return x, img.mul(255).byte()[0].permute(1, 2, 0).numpy().astype(np.uint8)
