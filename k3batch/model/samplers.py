"""The sampler choice of guided members (`generation.scheduler`): the reference's DDIM, or one
of diffusers' multistep solvers set up for Kandinsky 3's schedule.

Torch-free at import (the config and row validation read `NAMES`); diffusers loads in
`Solver`. Every solver is built from the reference's own schedule: `trained_betas` = the
cosine betas of `schedule.cosine_betas()`, epsilon prediction, and "trailing" timestep
spacing, which starts at t=999 as the reference does and equals its timesteps when the step
count divides 1000 (the default "linspace" would end on t=0 for Euler, a wasted step).

Thresholding: the reference's dynamic thresholding of x0 (the member's percentile, 0.99 base,
0.95 inpainting) is applied for every solver, by the sampler, to the epsilon handed to the
solver (`DiffusionSchedule.thresholded_eps`). For DPM-Solver++ and UniPC that is what their
own `thresholding=True` does to x0 (diffusers' version also caps the threshold at
`sample_max_value`, which the reference does not); Euler has no thresholding of its own. One
function for all keeps the solvers differing from the reference only in the solver.

The solvers offered are deterministic (no noise after the initial latent; Euler runs with
`s_churn=0`), so a row's generator draws only its initial latent (or the image-to-image
noise): nothing comes from the global RNG, and an image does not depend on its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REFERENCE = "reference"
# name -> what it is, for the config reference and the docs.
SCHEDULERS = {
    REFERENCE: "the reference's DDIM with eta=1 (ancestral) on range(999, 0, -1000//steps)",
    "dpmsolver++": "diffusers' DPMSolverMultistepScheduler, algorithm_type dpmsolver++, "
    "order 2 (DPM-Solver++ 2M)",
    "unipc": "diffusers' UniPCMultistepScheduler (order 2, bh2)",
    "euler": "diffusers' EulerDiscreteScheduler",
}
NAMES = tuple(SCHEDULERS)


def describe() -> str:
    """One line naming every choice, for config and row error messages."""
    return "; ".join(f"`{name}`: {what}" for name, what in SCHEDULERS.items())


def build(name: str):
    """A fresh diffusers scheduler `name` on Kandinsky 3's schedule (see the module doc)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from k3batch.model.schedule import NUM_TRAIN_TIMESTEPS, cosine_betas

    common = {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "trained_betas": cosine_betas().tolist(),
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
    }
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return UniPCMultistepScheduler(**common, solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"scheduler: unknown {name!r}; one of {', '.join(NAMES)}")


class Solver:
    """One `sample()` call's diffusers scheduler: its timesteps, the scaling of its state,
    and its steps. Stateful (multistep history), so built per call."""

    def __init__(self, name: str, num_inference_steps: int, strength: float | None = None):
        self.scheduler = build(name)
        # Timesteps stay on the CPU: the UNet gets them as Python numbers (no device sync).
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        times = [int(t) for t in self.scheduler.timesteps.tolist()]
        begin = 0
        if strength is not None:
            # diffusers' image-to-image rule: the last int(steps * strength) timesteps.
            begin = len(times) - min(int(len(times) * strength), len(times))
        self.timesteps = times[begin:]
        # The step index then starts here whatever timestep value a step is given.
        self.scheduler.set_begin_index(begin)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The initial latent from a standard normal draw (Euler's state is scaled by sigma)."""
        return noise * self.scheduler.init_noise_sigma

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """An input image's latent noised to the first timestep (image-to-image)."""
        import torch

        t = torch.tensor([self.timesteps[0]] * latents.shape[0])
        return self.scheduler.add_noise(latents, noise, t)

    def model_input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's input x_t (variance preserving) for the solver's state `x`."""
        return self.scheduler.scale_model_input(x, float(t))

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        # float(t): Euler refuses integer timesteps (it would read them as indices).
        return self.scheduler.step(eps, float(t), x, return_dict=False)[0]
