"""One row to generate, as every family member's `generate` takes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from k3batch.model import samplers


@dataclass
class Request:
    """One row to generate; rows of one `generate` call share the model's `group_key`."""

    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    image: np.ndarray | None = None  # HxWx3 uint8 at (height, width): img2img, inpainting
    mask: np.ndarray | None = None  # HxW float32 keep-mask (1 = keep, 0 = repaint)
    strength: float | None = None  # img2img
    # Kandinsky 3: T5 output of this row from the text encoder pool; None: the model encodes.
    text: object | None = None
    scheduler: str = samplers.REFERENCE  # Kandinsky 3 base and inpainting: the sampler
    # Kandinsky 2.2: the prior's settings, a ControlNet depth hint (HxWx3 uint8 at (height,
    # width)), and image mixing: (prompt text or HxWx3 uint8 image, weight) items.
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None
    hint: np.ndarray | None = None
    mix: list[tuple[str | np.ndarray, float]] | None = None
    # Kandinsky 3 ControlNet (`model.controlnet`, `hint` above): the fork's names and window.
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    # Kandinsky 3 IP-Adapter (`model.ip_adapter`): image prompts as (HxWx3 uint8 image, weight)
    # items, mixed by weight; the adapter's scale (the fork's `img_weight`).
    ip_images: list[tuple[np.ndarray, float]] | None = None
    ip_adapter_scale: float = 1.0


def warm_up_requests(member, width: int, height: int, batch_size: int, **fields) -> list[Request]:
    """A throwaway batch at this size for a member's `warm_up`: one step, blank inputs where
    the member needs them (compilation depends on shapes, not on values or steps)."""
    blank = np.zeros((height, width, 3), np.uint8)
    return [
        Request(
            "warm-up",
            None,
            i,
            width,
            height,
            1,
            member.guidance_scale or 0.0,
            image=blank if member.needs_mask else None,
            mask=np.ones((height, width), np.float32) if member.needs_mask else None,
            hint=blank if member.needs_hint else None,
            **fields,
        )
        for i in range(batch_size)
    ]
