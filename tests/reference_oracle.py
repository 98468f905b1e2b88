"""An independent, literal re-statement of the reference samplers (ai-forever/Kandinsky-3,
t2i_pipeline.py, inpainting_pipeline.py, utils.py, model/diffusion.py) for ONE prompt per
call, used as a test oracle.

It keeps the reference's own choices that k3batch changes for batching: the context is cut
to the prompt's length + 1 and the UNet's attention pooling is diffusers' stock mean. Noise
comes from one generator in the reference's draw order (initial latent, then one draw per
step), which is what k3batch's per-row generator reproduces.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Kandinsky3UNet, VQModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5EncoderModel

from k3batch.model.kandinsky3.loading import Kandinsky3InpaintUNet


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
    def __init__(self, path, folder="unet"):
        self.tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder").eval()
        cls = Kandinsky3InpaintUNet if folder == "unet_inpaint" else Kandinsky3UNet
        self.unet = cls.from_pretrained(path, subfolder=folder).eval()
        self.proj = self.unet.encoder_hid_proj  # the reference projects inside its text encoder
        self.unet.encoder_hid_proj = torch.nn.Identity()
        self.movq = VQModel.from_pretrained(path, subfolder="movq").eval()
        self.null = load_file(f"{path}/{folder}/null_embedding.safetensors")["null_embedding"]
        self.ac = torch.cumprod(1.0 - betas_cosine(), dim=0)

    def encode(self, ids, mask):
        ctx = self.proj(self.t5(input_ids=ids[None], attention_mask=mask[None]).last_hidden_state)
        m = mask[None]
        ctx[m == 0] = torch.zeros_like(ctx[m == 0])
        n = int(m.sum(-1).max()) + 1
        return ctx[:, :n], m[:, :n]

    def text(self, prompt, negative=None):
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
        return ctx, cmask, uctx, umask

    def loop(self, x, g, text, w, times, percentile, extra=None):
        """p_sample_loop of the reference (guided DDIM, eta=1) from x over `times`."""
        ctx, cmask, uctx, umask = text
        times = list(times) + [0]
        for t, pt in zip(times[:-1], times[1:], strict=True):
            big_x = x.repeat(2, 1, 1, 1)
            if extra is not None:
                big_x = torch.cat([big_x, extra.repeat(2, 1, 1, 1)], dim=1)
            big = self.unet(
                big_x,
                torch.tensor([t, t], dtype=torch.float32),
                torch.cat([ctx, uctx]),
                torch.cat([cmask, umask]),
            ).sample
            c, u = big.chunk(2)
            eps = (w + 1) * c - w * u
            a, ap = self.ac[t], self.ac[pt]
            x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
            q = (
                torch.quantile(x0.reshape(1, -1).abs(), percentile, dim=-1)
                .clamp(min=1.0)
                .reshape(1, 1, 1, 1)
            )
            x0 = torch.clip(x0, -q, q) / q
            eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
            var = torch.sqrt(1.0 * (1 - a / ap) * (1 - ap) / (1 - a))
            mean = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap - var**2) * eps
            noise = torch.randn(x.shape, generator=g)
            x = mean + (1.0 if pt != 0 else 0.0) * var * noise
        return x

    def image(self, x):
        img = self.movq.decode(x, force_not_quantize=True).sample
        img = torch.clip((img + 1) / 2, 0, 1)
        return img.mul(255).byte()[0].permute(1, 2, 0).numpy().astype(np.uint8)

    @torch.no_grad()
    def __call__(self, prompt, seed, w=3.0, steps=4, size=64, negative=None, generator=None):
        g = generator or torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, size // 8, size // 8, generator=g)
        x = self.loop(x, g, self.text(prompt, negative), w, range(999, 0, -1000 // steps), 0.99)
        return x, self.image(x)

    def flash_step(self, img, t, g, text):
        """One step of the reference's `gan` branch: re-noise x0 to t, predict, take x0."""
        ctx, cmask = text[:2]
        a = self.ac[t]
        x_t = torch.sqrt(a) * img + torch.sqrt(1 - a) * torch.randn(img.shape, generator=g)
        eps = self.unet(x_t, torch.tensor([t], dtype=torch.float32), ctx, cmask).sample
        return (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a)

    @torch.no_grad()
    def flash(self, prompt, seed, size=64):
        g = torch.Generator().manual_seed(seed)
        img = torch.randn(1, 4, size // 8, size // 8, generator=g)
        text = self.text(prompt)
        for t in range(979, 0, -250):
            img = self.flash_step(img, t, g, text)
        return img

    @torch.no_grad()
    def inpaint(self, prompt, seed, image, mask, w=4.0, steps=4):
        """`image`: PIL image; `mask`: HxW array, 1 = repaint (the reference's arguments)."""
        from scipy import ndimage

        # utils.resize_image_for_diffusion / resize_mask_for_diffusion (skimage's resize with
        # order 1, no anti-aliasing, preserve_range = ndimage.zoom, mirror, grid_mode, clip)
        rf = max(1, (image.size[0] * image.size[1] / 1024**2) ** 0.5)
        size = ((round(image.size[0] / rf) // 64) * 64, (round(image.size[1] / rf) // 64) * 64)
        pixels = np.asarray(image.convert("RGB").resize(size))
        pixels = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255) * 2 - 1
        m = np.asarray(mask, dtype=np.float64)
        zoom = (size[1] / m.shape[0], size[0] / m.shape[1])
        m = np.clip(ndimage.zoom(m, zoom, order=1, mode="mirror", grid_mode=True), m.min(), m.max())
        keep = (1 - torch.from_numpy(m)[None]).type(torch.float32)[None]
        # shared_step
        masked = pixels[None].masked_fill((1 - keep).bool(), 0)
        masked_latent = self.movq.encode(masked).latents
        keep = F.interpolate(keep, size=masked_latent.shape[2:])
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, *masked_latent.shape[2:], generator=g)
        extra = torch.cat([keep, masked_latent], dim=1)
        times = range(999, 0, -1000 // steps)
        return self.loop(x, g, self.text(prompt), w, times, 0.95, extra=extra)
