"""The Kandinsky 3.1 family's samplers, as `Kandinsky3` (`pipeline`) runs them: the
`Sampling` mixin reads the components `Kandinsky3` holds. Sampling follows
ai-forever/Kandinsky-3 (see `schedule.py` and `text.py`), not diffusers' pipelines:

- base text-to-image: DDIM eta=1 on `range(999, 0, -1000//steps)`, guidance against the
  null embedding, x0 thresholded at percentile 0.99;
- image-to-image (base): the input's MoVQ latent noised to the first of the last
  `int(steps * strength)` of those timesteps, then the same loop;
- inpainting: the same loop on a 9-channel UNet input (noisy latent, keep-mask, latent of the
  masked image), guidance 4, percentile 0.95;
- Flash: at each of 979, 729, 479, 229 re-noise the current x0 estimate to t, predict
  epsilon, take x0; no guidance, no thresholding;
- refine (base + Flash): one Flash step at t=229 on the base result's latent.

`Request.scheduler` (`generation.scheduler`, `samplers.py`) swaps the DDIM loop of the base
and inpainting members for a diffusers multistep solver on the same schedule, guidance and
thresholding; image-to-image then starts at the last int(steps * strength) of the solver's
timesteps. Flash and the refiner keep their own steps.

Reproducibility: every row has its own CPU `torch.Generator` seeded from its `seed`. It
draws, in this order: the initial latent (text-to-image, inpainting, Flash) or the noise that
takes an input image's latent to the first timestep (image-to-image); one draw per step
(DDIM: at every step, the last one's unused, as in the reference; Flash: the re-noising of
every step; the diffusers solvers draw nothing after the initial latent); then one draw
for the refiner's re-noising. An image depends only on its row, not on the batch it ran
in or the device's RNG.

Precision: each component runs in its `model.dtype`, but the sampler's state stays float32
whatever the UNet's dtype: latents between steps, noise, the guidance combination
(w+1)*cond - w*uncond (w=3 multiplies the UNet's rounding by 7), x0 and its percentile
threshold, the DDIM update and the MoVQ output's conversion to pixels. The UNet gets a
copy of the latent in its own dtype; its epsilon comes back as float32.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from k3batch.model import movq as movq_codec
from k3batch.model import samplers
from k3batch.model.kandinsky3 import text as textmod
from k3batch.model.kandinsky3.members import REFINE_TIMESTEP
from k3batch.model.noise import RowNoise
from k3batch.model.request import Request
from k3batch.model.schedule import base_timesteps, image_to_image_timesteps

KIND_TEXT = "text-to-image"
KIND_IMAGE = "image-to-image"
KIND_INPAINT = "inpainting"
KIND_FLASH = "flash"


class Sampling:
    """The samplers of `Kandinsky3`, on the components it holds: `denoiser` and `refiner`,
    `schedule`, `control` and `image_prompts`, `movq`, `tokenizer` and `text_encoder`,
    `device`; `group_key` and `decode_batch_size` are its too."""

    def sample(self, requests: list[Request]) -> torch.Tensor:
        """Final latents (float32) for rows of one `group_key`."""
        # no_grad in the body, not as a decorator: mutmut leaves decorated functions unmutated.
        with torch.no_grad():
            key = self.group_key(requests[0])
            if any(self.group_key(r) != key for r in requests):
                raise ValueError(
                    "one generate() call takes rows of one size, step count and kind (and strength "
                    "and scheduler)"
                )
            kind = key[3]
            lengths, hidden = self._text(requests)
            cond = self.denoiser.condition(hidden, lengths)
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
            shape = (4, requests[0].height // 8, requests[0].width // 8)
            noise = RowNoise(generators, shape, self.device)
            first, solver = requests[0], None
            if kind != KIND_FLASH and first.scheduler != samplers.REFERENCE:
                strength = first.strength if kind == KIND_IMAGE else None
                solver = samplers.Solver(first.scheduler, first.num_inference_steps, strength)
            if kind == KIND_FLASH:
                x = self._flash(cond, noise)
            elif kind == KIND_INPAINT:
                x = self._inpaint(requests, cond, noise, solver)
            elif kind == KIND_IMAGE:
                x = self._image_to_image(requests, cond, noise, solver)
            else:
                x = self._guided(requests, self._start(noise(), solver), cond, noise, solver=solver)
            if self.refiner is not None:
                x = self._refine(x, hidden, lengths, noise)
            return x

    def _text(self, requests) -> tuple[torch.Tensor, textmod.Hidden]:
        """(token counts, T5 outputs) of the rows: from the text encoder pool or run here."""
        guided = self.denoiser.guided
        if all(r.text is not None for r in requests):
            return textmod.from_embeddings([r.text for r in requests], with_negatives=guided)
        if self.text_encoder is None:
            raise RuntimeError(
                "the model was loaded without its text encoder; rows need prompt embeddings "
                "(resources.text_encoder_pool)"
            )
        tokens = textmod.tokenize(
            self.tokenizer,
            [r.prompt for r in requests],
            [r.negative_prompt if guided else None for r in requests],
        )
        return tokens.lengths, textmod.run_encoder(tokens, self.text_encoder, guided)

    # ------------------------------------------------------------ samplers
    @staticmethod
    def _start(noise, solver):
        return noise if solver is None else solver.start(noise)

    def _guided(self, requests, x, cond, noise, times=None, extra=None, solver=None):
        """The guided loop: the reference's DDIM (eta=1), or `solver`'s steps on the same
        guidance and thresholding; `extra` = inpainting's input channels."""
        d = self.denoiser
        if solver is not None:
            times = solver.timesteps
        elif times is None:
            times = base_timesteps(requests[0].num_inference_steps)
        w = torch.tensor([r.guidance_scale for r in requests], device=self.device).view(-1, 1, 1, 1)
        # Cond and uncond rows go through the UNet in one forward of twice the batch.
        context = torch.cat([cond.context, cond.uncond_context])
        mask = torch.cat([cond.context_mask, cond.uncond_mask])
        lengths = torch.cat([cond.pool_lengths, cond.pool_lengths])
        if extra is not None:
            extra = torch.cat([extra, extra])
        percentile = d.member.threshold_percentile
        control = (
            self.control if self.control is not None and self.control.wanted(requests) else None
        )
        hint = control.hints(requests) if control is not None else None
        prompts = self.image_prompts
        if prompts is not None and not prompts.wanted(requests):
            prompts = None
        with prompts.guided(requests) if prompts is not None else contextlib.nullcontext():
            for step, (t, prev_t) in enumerate(zip(times, [*times[1:], 0], strict=True)):
                x_t = x if solver is None else solver.model_input(x, t)
                unet_in = torch.cat([x_t, x_t])
                if extra is not None:
                    unet_in = torch.cat([unet_in, extra], dim=1)
                if control is not None:
                    scale = control.scales(requests, step, len(times))
                    control.skips.residuals = control.residuals(
                        unet_in, t, context, mask, lengths, hint, scale
                    )
                try:
                    eps_cond, eps_uncond = d(unet_in, t, context, mask, lengths).chunk(2)
                finally:
                    if control is not None:
                        control.skips.residuals = None
                eps = (w + 1.0) * eps_cond - w * eps_uncond
                if solver is not None:
                    eps = self.schedule.thresholded_eps(x_t, t, eps, percentile)
                    x = solver.step(eps, t, x)
                    continue
                # Drawn at the last step too (unused there), as the reference's p_sample does, so
                # a row's generator is where the reference's would be after the loop.
                x = self.schedule.ddim_step(x, t, prev_t, eps, noise(), percentile)
        return x

    def _flash(self, cond, noise):
        d = self.denoiser
        x = noise()
        for t in d.member.fixed_timesteps:
            x_t = self.schedule.add_noise(x, t, noise())
            eps = d(x_t, t, cond.context, cond.context_mask, cond.pool_lengths)
            x = self.schedule.x0_from_eps(x_t, t, eps)
        return x

    def _refine(self, x, hidden, lengths, noise):
        cond = self.refiner.condition(hidden, lengths)
        t = REFINE_TIMESTEP
        x_t = self.schedule.add_noise(x, t, noise())
        eps = self.refiner(x_t, t, cond.context, cond.context_mask, cond.pool_lengths)
        return self.schedule.x0_from_eps(x_t, t, eps)

    def _image_to_image(self, requests, cond, noise, solver=None):
        latents = self.encode(self._pixels(requests))
        if solver is not None:
            if not solver.timesteps:
                return latents
            x = solver.noised(latents, noise())
            return self._guided(requests, x, cond, noise, solver=solver)
        times = image_to_image_timesteps(requests[0].num_inference_steps, requests[0].strength)
        if not times:
            return latents
        x = self.schedule.add_noise(latents, times[0], noise())
        return self._guided(requests, x, cond, noise, times=times)

    def _inpaint(self, requests, cond, noise, solver=None):
        image = self._pixels(requests)
        keep = torch.stack([torch.from_numpy(np.array(r.mask, dtype=np.float32)) for r in requests])
        keep = keep.unsqueeze(1).to(image.device)
        # As the reference: zero the repaint area (any pixel whose keep value is below 1),
        # MoVQ-encode, and nearest-resize the keep-mask to latent size.
        masked = image.masked_fill((1 - keep).bool(), 0)
        masked_latent = self.encode(masked)
        keep_latent = F.interpolate(keep, size=masked_latent.shape[-2:]).to(self.device)
        extra = torch.cat([keep_latent, masked_latent], dim=1)
        x = self._start(noise(), solver)
        return self._guided(requests, x, cond, noise, extra=extra, solver=solver)

    # ------------------------------------------------------------ helpers
    def _pixels(self, requests) -> torch.Tensor:
        """Input images as the reference's ToTensor()*2-1: float32 in [-1, 1], NCHW."""
        images = [torch.from_numpy(np.array(r.image, dtype=np.uint8)) for r in requests]
        x = torch.stack(images).permute(0, 3, 1, 2).float().div(255)
        return (x * 2 - 1).to(next(self.movq.parameters()).device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """MoVQ latents (float32, UNet device) of [-1, 1] images (`movq.encode`)."""
        return movq_codec.encode(self.movq, pixels).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """MoVQ-decode to uint8 HWC images, at most `decode_batch_size` latents per call; a
        call that runs out of memory halves it for later batches too (`movq.decode`)."""
        images, self.decode_batch_size = movq_codec.decode(
            self.movq, latents, self.decode_batch_size, self.movq_memory_format
        )
        return images
