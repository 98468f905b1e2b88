"""The reference diffusion schedule and DDIM (eta=1) step of Kandinsky 3.

Follows `kandinsky3/model/diffusion.py` of ai-forever/Kandinsky-3: cosine betas over 1000
train steps, epsilon prediction, x0 dynamically thresholded at a percentile, then the DDIM
update with eta=1. All arithmetic is float32 whatever the UNet's dtype, as in the reference
(its schedule tensors are float32 and autocast leaves elementwise ops alone).
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Betas of the cosine schedule, clipped at 0.999 (computed in float64, stored float32)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def base_timesteps(num_inference_steps: int) -> list[int]:
    """The reference's timesteps: `range(999, 0, -1000 // steps)`.

    The count equals `num_inference_steps` when it divides 1000 (50 -> 999, 979, ..., 19); for
    other values the reference spacing decides, e.g. 30 -> 30 steps of 34, 600 -> 999 steps.
    """
    if not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_inference_steps must be in [1, 1000], got {num_inference_steps}")
    return list(range(NUM_TRAIN_TIMESTEPS - 1, 0, -(NUM_TRAIN_TIMESTEPS // num_inference_steps)))


class DiffusionSchedule:
    """Cumulative alphas of the cosine schedule and the reference sampling step."""

    def __init__(self, device: torch.device | str = "cpu"):
        alphas = 1.0 - cosine_betas()
        self.alphas_cumprod = torch.cumprod(alphas, dim=0).to(device)

    def _abar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t]

    def x0_from_eps(self, x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return (x - torch.sqrt(1.0 - abar) * eps) / torch.sqrt(abar)

    def eps_from_x0(self, x: torch.Tensor, t: int, x0: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return (x - torch.sqrt(abar) * x0) / torch.sqrt(1.0 - abar)

    def add_noise(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return torch.sqrt(abar) * x0 + torch.sqrt(1.0 - abar) * noise

    @staticmethod
    def threshold(x0: torch.Tensor, percentile: float | None) -> torch.Tensor:
        """Dynamic thresholding per sample: clip to the percentile of |x0| (at least 1), rescale."""
        if percentile is None:
            return x0.clamp(-1.0, 1.0)
        flat = x0.reshape(x0.shape[0], -1).abs()
        s = torch.quantile(flat, percentile, dim=-1).clamp(min=1.0)
        s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s

    def thresholded_eps(
        self, x: torch.Tensor, t: int, eps: torch.Tensor, percentile: float | None
    ) -> torch.Tensor:
        """The epsilon whose x0 is the thresholded x0 at (x, t): the reference's thresholding
        for solvers that take epsilon (`samplers`); `x` is the variance-preserving x_t."""
        return self.eps_from_x0(x, t, self.threshold(self.x0_from_eps(x, t, eps), percentile))

    def ddim_step(
        self,
        x: torch.Tensor,
        t: int,
        prev_t: int,
        eps: torch.Tensor,
        noise: torch.Tensor,
        percentile: float | None,
        eta: float = 1.0,
    ) -> torch.Tensor:
        """One reference step from t to prev_t (prev_t == 0 is the last step: no noise added).

        Note the reference uses alphas_cumprod[0] (not 1.0) as the target of the last step.
        """
        x0 = self.threshold(self.x0_from_eps(x, t, eps), percentile)
        eps = self.eps_from_x0(x, t, x0)
        abar_t, abar_prev = self._abar(t), self._abar(prev_t)
        sigma = torch.sqrt(eta * (1.0 - abar_t / abar_prev) * (1.0 - abar_prev) / (1.0 - abar_t))
        # 1 - abar_prev - sigma^2 >= 0 exactly, but with eta=1 it is 0 up to rounding and can
        # come out slightly negative in float32 (NaN from then on); clamped, as it is exactly.
        direction = (1.0 - abar_prev - sigma**2).clamp(min=0.0)
        mean = torch.sqrt(abar_prev) * x0 + torch.sqrt(direction) * eps
        if prev_t == 0:
            return mean
        return mean + sigma * noise


def image_to_image_timesteps(num_inference_steps: int, strength: float) -> list[int]:
    """The last `int(len(times) * strength)` reference timesteps (diffusers' strength rule)."""
    times = base_timesteps(num_inference_steps)
    n = min(int(len(times) * strength), len(times))
    return times[len(times) - n :]
