"""An independent, literal re-statement of the reference samplers (ai-forever/Kandinsky-3,
t2i_pipeline.py, inpainting_pipeline.py, utils.py, model/diffusion.py) for ONE prompt per
call, used as a test oracle.

Beside the reference's DDIM loop it runs the two samplers the reference has no code for, as
docs/models-and-numerics.md describes them: image-to-image (diffusers' strength rule: the
last int(steps * strength) reference timesteps, the input latent noised to the first) and a
diffusers multistep scheduler object (`solver_loop`), built and stepped by the caller, with
the reference's guidance and its dynamic thresholding of x0 written here. Nothing here
imports k3batch's sampler code (only the inpainting UNet class, a model definition).

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


def threshold(x0, percentile):
    """The reference's dynamic thresholding, per sample: clip to the percentile of |x0| (at
    least 1) and divide by it."""
    q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=-1).clamp(min=1.0)
    q = q.reshape(-1, 1, 1, 1)
    return torch.clip(x0, -q, q) / q


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

    def guided_eps(self, x, t, text, w, extra=None):
        """The reference's guided epsilon at t: (w + 1) * cond - w * uncond, both halves in
        one UNet call (its `big_x`)."""
        ctx, cmask, uctx, umask = text
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
        return (w + 1) * c - w * u

    def loop(self, x, g, text, w, times, percentile, extra=None):
        """p_sample_loop of the reference (guided DDIM, eta=1) from x over `times`."""
        times = list(times) + [0]
        for t, pt in zip(times[:-1], times[1:], strict=True):
            eps = self.guided_eps(x, t, text, w, extra)
            a, ap = self.ac[t], self.ac[pt]
            x0 = threshold((x - torch.sqrt(1 - a) * eps) / torch.sqrt(a), percentile)
            eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
            var = torch.sqrt(1.0 * (1 - a / ap) * (1 - ap) / (1 - a))
            mean = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap - var**2) * eps
            noise = torch.randn(x.shape, generator=g)
            x = mean + (1.0 if pt != 0 else 0.0) * var * noise
        return x

    def solver_loop(self, scheduler, x, text, w, times, percentile, extra=None):
        """A diffusers scheduler stepped by hand over `times` (its own timesteps, or their
        tail for image-to-image) with the reference's guidance; `percentile`: threshold x0
        here, as the reference does, and hand the solver the epsilon of the thresholded x0
        (None: the scheduler thresholds itself, `thresholding=True`)."""
        for step_t in times:  # the scheduler's own values (Euler's are floats)
            t = int(step_t)
            x_t = scheduler.scale_model_input(x, step_t)  # the UNet's variance-preserving input
            eps = self.guided_eps(x_t, t, text, w, extra)
            if percentile is not None:
                a = self.ac[t]
                x0 = threshold((x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a), percentile)
                eps = (x_t - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
            x = scheduler.step(eps, step_t, x).prev_sample
        return x

    def image(self, x):
        img = self.movq.decode(x, force_not_quantize=True).sample
        img = torch.clip((img + 1) / 2, 0, 1)
        return img.mul(255).byte()[0].permute(1, 2, 0).numpy().astype(np.uint8)

    @torch.no_grad()
    def __call__(
        self, prompt, seed, w=3.0, steps=4, size=64, negative=None, generator=None, width=None
    ):
        g = generator or torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, size // 8, (width or size) // 8, generator=g)
        x = self.loop(x, g, self.text(prompt, negative), w, range(999, 0, -1000 // steps), 0.99)
        return x, self.image(x)

    def latent_of(self, image):
        """An HxWx3 uint8 image as the reference feeds MoVQ (ToTensor() * 2 - 1), encoded."""
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        return self.movq.encode(pixels[None] * 2 - 1).latents

    @torch.no_grad()
    def image_to_image(self, prompt, seed, image, strength, w=3.0, steps=4, negative=None):
        """The reference's sampler from an input image (docs/models-and-numerics.md: the
        reference has no image-to-image): the last int(len(times) * strength) of its
        timesteps, the input's latent noised to the first of them with the row's first draw."""
        latent = self.latent_of(image)
        times = list(range(999, 0, -1000 // steps))
        times = times[len(times) - int(len(times) * strength) :]
        if not times:
            return latent
        g = torch.Generator().manual_seed(seed)
        a = self.ac[times[0]]
        noise = torch.randn(latent.shape, generator=g)
        x = torch.sqrt(a) * latent + torch.sqrt(1 - a) * noise
        return self.loop(x, g, self.text(prompt, negative), w, times, 0.99)

    @torch.no_grad()
    def solver(
        self,
        scheduler,
        prompt,
        seed,
        w=3.0,
        size=64,
        width=None,
        negative=None,
        image=None,
        strength=None,
        percentile=0.99,
    ):
        """Text-to-image (or image-to-image with `image`, `strength`) with a diffusers
        scheduler whose timesteps the caller has set: the initial latent is the seed's first
        draw scaled by the scheduler's `init_noise_sigma`; an input image's latent is noised by
        hand to the first of the last int(steps * strength) timesteps (diffusers' rule): VP
        x_t for DPM-Solver++ and UniPC, x0 + sigma * noise for Euler, whose state is x_t scaled
        to unit signal."""
        from diffusers import EulerDiscreteScheduler

        g = torch.Generator().manual_seed(seed)
        times = list(scheduler.timesteps)
        if image is None:
            shape = (1, 4, size // 8, (width or size) // 8)
            x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
        else:
            latent = self.latent_of(image)
            times = times[len(times) - int(len(times) * strength) :]
            if not times:
                return latent
            a = self.ac[int(times[0])]
            noise = torch.randn(latent.shape, generator=g)
            if isinstance(scheduler, EulerDiscreteScheduler):
                x = latent + torch.sqrt((1 - a) / a) * noise
            else:
                x = torch.sqrt(a) * latent + torch.sqrt(1 - a) * noise
        return self.solver_loop(scheduler, x, self.text(prompt, negative), w, times, percentile)

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
    def inpaint(self, prompt, seed, image, mask, w=4.0, steps=4, scheduler=None, negative=None):
        """`image`: PIL image; `mask`: HxW array, 1 = repaint (the reference's arguments).
        `scheduler`: a diffusers scheduler (timesteps set) instead of the reference's DDIM."""
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
        text = self.text(prompt, negative)
        if scheduler is not None:
            x = x * scheduler.init_noise_sigma
            return self.solver_loop(scheduler, x, text, w, scheduler.timesteps, 0.95, extra)
        times = range(999, 0, -1000 // steps)
        return self.loop(x, g, text, w, times, 0.95, extra=extra)
