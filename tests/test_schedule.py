"""The Kandinsky 3 schedule and DDIM step against diffusers' DDIMScheduler, an independent
implementation of the same rule: the cosine schedule is diffusers' `squaredcos_cap_v2`, the
reference's step is DDIM with eta=1 on the thresholded x0 and the epsilon recomputed from it
(`use_clipped_model_output`), and its last step targets alphas_cumprod[0]
(`set_alpha_to_one=False`) and adds no noise. Fast: these are the schedule's tests for
mutation testing (tests/mutation_map.toml); the tiny-model loops check the same path against
the reference's sampler in tests/test_model.py."""

import pytest
import torch
from diffusers import DDIMScheduler

from k3batch.model.schedule import DiffusionSchedule, base_timesteps, image_to_image_timesteps


def diffusers_ddim(percentile: float | None) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        set_alpha_to_one=False,
        clip_sample=percentile is None,
        clip_sample_range=1.0,
        thresholding=percentile is not None,
        dynamic_thresholding_ratio=percentile if percentile is not None else 0.995,
        sample_max_value=1e6,  # the reference clamps the percentile below (at 1), not above
    )


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=g)
    # Large enough that x0 goes past 1: the thresholding (or clipping) changes it.
    eps = torch.randn((2, 4, 8, 8), generator=g) * 3
    noise = torch.randn((2, 4, 8, 8), generator=g)
    return x, eps, noise


def test_cumulative_alphas_are_diffusers_cosine_schedule():
    torch.testing.assert_close(
        DiffusionSchedule().alphas_cumprod, diffusers_ddim(0.99).alphas_cumprod, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("percentile", [0.95, None])
@pytest.mark.parametrize(("t", "prev_t"), [(999, 979), (520, 270), (259, 9)])
def test_ddim_step_is_diffusers_ddim_with_eta_one(t, prev_t, percentile):
    x, eps, noise = inputs(t)
    s = DiffusionSchedule()
    x0 = s.x0_from_eps(x, t, eps)
    assert float(x0.abs().max()) > 2  # the threshold acts
    ref = diffusers_ddim(percentile)
    ref.set_timesteps(1000 // (t - prev_t))
    want = ref.step(
        eps, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=noise
    ).prev_sample
    got = s.ddim_step(x, t, prev_t, eps, noise, percentile)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("percentile", [0.95, None])
def test_last_ddim_step_targets_the_first_alpha_without_noise(percentile):
    x, eps, noise = inputs(3)
    ref = diffusers_ddim(percentile)
    ref.set_timesteps(50)  # 19 -> -1: diffusers' final alpha, alphas_cumprod[0] here
    want = ref.step(
        eps, 19, x, eta=1.0, use_clipped_model_output=True, variance_noise=torch.zeros_like(x)
    ).prev_sample
    got = DiffusionSchedule().ddim_step(x, 19, 0, eps, noise, percentile)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_add_noise_is_diffusers():
    x0, noise, _ = inputs(5)
    for t in (0, 400, 999):
        want = diffusers_ddim(0.99).add_noise(x0, noise, torch.tensor([t]))
        torch.testing.assert_close(DiffusionSchedule().add_noise(x0, t, noise), want)


def test_image_to_image_timesteps_keep_the_last_share_of_the_reference_ones():
    ten = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert base_timesteps(10) == ten
    assert image_to_image_timesteps(10, 0.35) == [299, 199, 99]  # int(10 * 0.35) = 3
    assert image_to_image_timesteps(10, 1.0) == ten
    assert image_to_image_timesteps(10, 0.05) == []
    # 30 steps: the reference's spacing gives 31 timesteps (999 down to 9 by 33); half is 15.
    thirty = image_to_image_timesteps(30, 0.5)
    assert len(base_timesteps(30)) == 31
    assert thirty == list(range(999 - 16 * 33, 0, -33)) and len(thirty) == 15


def test_schedule_is_float32_on_the_device_asked_for():
    """float32 whatever torch's default dtype (as the reference's tensors), on the schedule's
    device (`meta` stands in for a GPU: a table left on the CPU would show)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        s = DiffusionSchedule("meta")
    finally:
        torch.set_default_dtype(default)
    assert s.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.device.type == "meta"


def test_step_counts_at_the_ends_of_the_range():
    assert base_timesteps(1) == [999]
    assert base_timesteps(1000) == list(range(999, 0, -1))  # 999 steps, down to 1
    assert base_timesteps(500)[-1] == 1 and len(base_timesteps(500)) == 500  # by 2: 999 .. 1
    for bad in (0, 1001):
        with pytest.raises(
            ValueError, match=rf"num_inference_steps must be in \[1, 1000\], got {bad}"
        ):
            base_timesteps(bad)
