"""`generation.scheduler`: diffusers' multistep solvers on Kandinsky 3's schedule, per config
and per row. The reference sampler itself is pinned by the parity tests in test_model.py.

The oracle for each solver is diffusers' own scheduler class, configured here from the
documented settings (docs/models-and-numerics.md, Schedulers) and stepped by hand in
`reference_oracle.Oracle.solver_loop` with the reference's guidance, text conditioning,
noise and dynamic thresholding written there: no k3batch sampler code runs on that side."""

import numpy as np
import pytest
import torch

from k3batch import schema
from k3batch.model import samplers
from k3batch.model.kandinsky3.pipeline import Request
from k3batch.model.schedule import DiffusionSchedule, base_timesteps
from k3batch.rows.check import normalise_row
from k3batch.rows.rules import RowRules

from .conftest import FP32, assert_same_images, load_tiny, row_capabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOLVERS = [n for n in samplers.NAMES if n != samplers.REFERENCE]
# Batch shapes change CPU kernels' rounding (~1e-7 of epsilon, see conftest.LATENT_ATOL);
# Euler's first steps scale epsilon by sigma (up to ~2250 on the cosine schedule), so its
# latents agree to ~1e-4 rather than ~1e-6. Different seeds differ by ~1 (asserted below).
SOLVER_ATOL = 1e-3


def req(prompt="a red cat at sunset", seed=1, steps=3, w=3.0, scheduler="euler", **kw):
    return Request(prompt, None, seed, 64, 64, steps, w, scheduler=scheduler, **kw)


def diffusers_scheduler(name, steps, thresholding_at=None):
    """diffusers' scheduler `name` as the docs describe k3batch's: the reference's cosine betas
    (restated in reference_oracle), epsilon prediction, trailing spacing; DPM-Solver++ 2M,
    UniPC order 2 with bh2. `thresholding_at`: the scheduler's own dynamic thresholding at
    that percentile, with no cap (the reference has none)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from .reference_oracle import betas_cosine

    config = dict(
        num_train_timesteps=1000,
        trained_betas=betas_cosine().tolist(),
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    if thresholding_at is not None:
        config.update(
            thresholding=True, dynamic_thresholding_ratio=thresholding_at, sample_max_value=1e30
        )
    if name == "dpmsolver++":
        s = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    elif name == "unipc":
        s = UniPCMultistepScheduler(**config, solver_order=2, solver_type="bh2")
    else:
        s = EulerDiscreteScheduler(**config)
    s.set_timesteps(steps)
    return s


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    from .reference_oracle import Oracle

    return Oracle(tiny_dir)


# Final latents (thresholded: within [-1, 1]) against the oracle. The two sides round
# differently (a batch of rows and a 128-position context here, one row and the reference's
# cut context there): up to ~1.5e-4 measured. The solvers' own thresholding=True thresholds
# x0 after the solver's epsilon -> x0 conversion, k3batch before it; at t=999 that conversion
# scales epsilon's rounding by sigma/alpha ~ 2250, so the two agree to ~1.2e-3. A wrong
# setting or step moves latents by 6e-2 or more (no thresholding at all: 6e-2 to 0.3).
ORACLE_ATOL = 5e-4
OWN_THRESHOLDING_ATOL = 5e-3


def test_solver_timesteps_are_the_references_and_strength_keeps_the_last_ones():
    for name in SOLVERS:
        assert samplers.Solver(name, 50).timesteps == base_timesteps(50)
        # diffusers' image-to-image rule: the last int(10 * 0.35) = 3 of 10 timesteps.
        full = samplers.Solver(name, 10).timesteps
        assert samplers.Solver(name, 10, strength=0.35).timesteps == full[-3:]
        assert samplers.Solver(name, 10, strength=0.05).timesteps == []
    with pytest.raises(ValueError, match="unknown 'ddim'"):
        samplers.build("ddim")


def test_thresholded_eps_gives_the_thresholded_x0():
    s = DiffusionSchedule()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) * 3
    fixed = s.thresholded_eps(x, 500, eps, 0.99)
    x0 = s.x0_from_eps(x, 500, fixed)
    torch.testing.assert_close(x0, s.threshold(s.x0_from_eps(x, 500, eps), 0.99))
    assert float(x0.abs().max()) <= 1 + 1e-5


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_equals_diffusers_scheduler_stepped_by_hand(tiny_model, oracle, name):
    """Three rows with different prompts, seeds, guidance and negative prompts in one batch,
    on a non-square canvas; each row against the oracle alone. Five steps: DPM-Solver++ and
    UniPC run a second-order step in the middle (first order at both ends)."""
    steps, height, width = 5, 64, 96
    rows = [
        Request("a red cat at sunset", None, 1, width, height, steps, 3.0, scheduler=name),
        Request("a blue robot in the rain, oil painting", "blurry", 2, width, height, steps, 5.5,
                scheduler=name),
        Request("owl", "a dark forest at night", 3, width, height, steps, 0.5, scheduler=name),
    ]  # fmt: skip
    got = tiny_model.sample(rows)
    assert samplers.Solver(name, steps).timesteps == base_timesteps(steps)
    for i, r in enumerate(rows):
        want = oracle.solver(
            diffusers_scheduler(name, steps),
            r.prompt, r.seed, r.guidance_scale, height, width, r.negative_prompt,
        )  # fmt: skip
        torch.testing.assert_close(got[i : i + 1], want, atol=ORACLE_ATOL, rtol=0)
        if name != "euler":
            # The solver's own thresholding=True (uncapped) gives the same: the docs' claim.
            own = oracle.solver(
                diffusers_scheduler(name, steps, thresholding_at=0.99),
                r.prompt, r.seed, r.guidance_scale, height, width, r.negative_prompt,
                percentile=None,
            )  # fmt: skip
            torch.testing.assert_close(got[i : i + 1], own, atol=OWN_THRESHOLDING_ATOL, rtol=0)
    # Thresholding is live in these runs: without it the oracle's latents are elsewhere.
    unthresholded = oracle.solver(
        diffusers_scheduler(name, steps), rows[1].prompt, 2, 5.5, height, width, "blurry",
        percentile=1.0,
    )  # fmt: skip
    assert (unthresholded - got[1:2]).abs().max() > 5e-2


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_image_to_image_equals_diffusers_scheduler_by_hand(tiny_model, oracle, name):
    """5 steps at strength 0.6: int(5 * 0.6) = 3 solver steps from t=599, guidance 2.5."""
    images = [np.random.default_rng(s).integers(0, 256, (64, 64, 3), np.uint8) for s in (4, 5)]
    common = dict(strength=0.6, scheduler=name)
    rows = [
        Request("a red cat at sunset", None, 4, 64, 64, 5, 2.5, image=images[0], **common),
        Request("a lighthouse", "fog", 5, 64, 64, 5, 7.0, image=images[1], **common),
    ]
    got = tiny_model.sample(rows)
    assert samplers.Solver(name, 5, strength=0.6).timesteps == [599, 399, 199]
    for i, (r, image) in enumerate(zip(rows, images, strict=True)):
        want = oracle.solver(
            diffusers_scheduler(name, 5), r.prompt, r.seed, r.guidance_scale,
            negative=r.negative_prompt, image=image, strength=0.6,
        )  # fmt: skip
        torch.testing.assert_close(got[i : i + 1], want, atol=ORACLE_ATOL, rtol=0)


def test_solvers_inpainting_equals_diffusers_scheduler_stepped_by_hand(tiny_dir, oracle):
    """Inpainting thresholds at 0.95 and guides at the row's scale (4.5 here, 3 steps)."""
    from PIL import Image

    from .test_family import inpaint_request, sample_image

    model = load_tiny(tiny_dir, "kandinsky3-inpaint")
    inpaint_oracle = type(oracle)(tiny_dir, "unet_inpaint")
    # 150x70 is sized to 128x64 (a 16x8 latent), the mask with it.
    image = sample_image(150, 70, seed=6)
    repaint = np.zeros((70, 150))
    repaint[8:40, 16:100] = 1
    for name in SOLVERS:
        r = inpaint_request(image, repaint, seed=8, scheduler=name)
        r.num_inference_steps, r.guidance_scale = 5, 4.5
        got = model.sample([r])
        want = inpaint_oracle.inpaint(
            r.prompt, 8, Image.fromarray(image), repaint, w=4.5,
            scheduler=diffusers_scheduler(name, 5),
        )  # fmt: skip
        torch.testing.assert_close(got, want, atol=ORACLE_ATOL, rtol=0)


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_images_depend_on_their_row_not_their_batch(tiny_model, name):
    rows = [
        req("a red cat at sunset", 1, scheduler=name),
        req("a blue robot in the rain, with a much longer prompt", 2, w=5.0, scheduler=name),
        req("owl", 3, w=0.0, scheduler=name),
    ]
    rng = torch.get_rng_state()
    together = tiny_model.sample(rows)
    assert torch.equal(torch.get_rng_state(), rng), "a solver drew from the global RNG"
    alone = torch.cat([tiny_model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=SOLVER_ATOL, rtol=0)
    assert torch.isfinite(together).all()
    other_seed = tiny_model.sample([req("a red cat at sunset", 9, scheduler=name)])
    assert (other_seed - together[:1]).abs().max() > 1e-2
    reference = tiny_model.sample([req("a red cat at sunset", 1, scheduler="reference")])
    assert (reference - together[:1]).abs().max() > 1e-2


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_image_to_image_is_batch_independent_and_keeps_the_input_near_zero_strength(
    tiny_model, name
):
    images = [np.random.default_rng(s).integers(0, 256, (64, 64, 3), np.uint8) for s in (1, 2)]
    rows = [
        req(seed=s, steps=4, image=im, strength=0.5, scheduler=name)
        for s, im in zip((1, 2), images, strict=True)
    ]
    together = tiny_model.sample(rows)
    alone = torch.cat([tiny_model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=SOLVER_ATOL, rtol=0)
    source = tiny_model.encode(tiny_model._pixels(rows))
    # int(4 * 0.1) = 0 steps: the input latent itself.
    kept = tiny_model.sample([req(seed=1, steps=4, image=images[0], strength=0.1, scheduler=name)])
    assert torch.equal(kept, source[:1])
    # Half the steps from the input stay closer to it than full strength does.
    full = tiny_model.sample([req(seed=1, steps=4, image=images[0], strength=1.0, scheduler=name)])
    assert (together[:1] - source[:1]).abs().mean() < (full - source[:1]).abs().mean()


def test_solvers_run_inpainting_batch_independently(tiny_dir):
    from .test_family import inpaint_request, left_half_mask, sample_image

    model = load_tiny(tiny_dir, "kandinsky3-inpaint")
    for name in SOLVERS:
        rows = [
            inpaint_request(sample_image(seed=s), left_half_mask(), seed=s, scheduler=name)
            for s in (1, 2)
        ]
        together = model.sample(rows)
        alone = torch.cat([model.sample([r]) for r in rows])
        torch.testing.assert_close(together, alone, atol=SOLVER_ATOL, rtol=0)
        assert torch.isfinite(together).all()


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_multistep_solvers_converge_as_steps_grow(tiny_model, name):
    """Deterministic solvers approach their own many-step result (the reference sampler is
    ancestral, so they converge to a different sample of it: see models-and-numerics.md)."""
    r = {"prompt": "a lighthouse at dawn", "seed": 4, "scheduler": name}
    target = tiny_model.sample([req(steps=40, **r)])
    errors = [
        float((tiny_model.sample([req(steps=n, **r)]) - target).abs().mean()) for n in (4, 16)
    ]
    assert errors[1] < errors[0] / 2, errors


def test_rows_with_different_schedulers_never_share_a_call(tiny_model):
    keys = {tiny_model.group_key(req(scheduler=n)) for n in samplers.NAMES}
    assert len(keys) == len(samplers.NAMES)
    with pytest.raises(ValueError, match="and scheduler"):
        tiny_model.sample([req(scheduler="euler"), req(scheduler="unipc")])


def test_row_scheduler_is_validated_and_flash_ignores_it_with_a_warning():
    rules = RowRules(width=64, height=64, scheduler="unipc")

    def row(**kw):
        return normalise_row({schema.ID: "r", schema.PROMPT: "a cat", **kw}, "prompt", rules)

    assert row()[schema.SCHEDULER] == "unipc"
    assert row(scheduler="euler")[schema.SCHEDULER] == "euler"
    for bad in ("ddim", 3):
        out = row(scheduler=bad)
        assert out[schema.STATUS] == schema.STATUS_ERROR
        assert out[schema.ERROR].startswith("scheduler:") and repr(bad) in out[schema.ERROR]
    flash = RowRules(width=64, height=64, capabilities=row_capabilities(name="kandinsky3-flash"))
    out = normalise_row(
        {schema.ID: "r", schema.PROMPT: "a cat", schema.SCHEDULER: "euler"}, "prompt", flash
    )
    assert out[schema.STATUS] == schema.STATUS_OK and out[schema.SCHEDULER] == "reference"
    assert "scheduler: ignored by kandinsky3-flash" in out[schema.WARNING]


def test_config_scheduler_names_are_checked_and_flash_refuses_one(tiny_dir):
    from k3batch.config import ConfigError, load_config

    def config(generation, model=None):
        return load_config(
            data={
                "input": {"uri": "in.parquet"},
                "model": {"path": tiny_dir, **(model or {})},
                "generation": generation,
                "output": {"uri": "out"},
            }
        )

    assert config({"scheduler": "dpmsolver++"}).generation.scheduler == "dpmsolver++"
    assert config({}).generation.scheduler == "reference"
    with pytest.raises(ConfigError, match="generation.scheduler.*'reference', 'dpmsolver\\+\\+'"):
        config({"scheduler": "ddim"})
    with pytest.raises(ConfigError, match="generation.scheduler: kandinsky3-flash always runs"):
        config({"scheduler": "euler"}, {"name": "kandinsky3-flash"})


def test_generate_stage_runs_each_rows_scheduler(tiny_dir, tiny_model):
    from k3batch.config import ModelConfig
    from k3batch.stages.generate import GenerateStage

    stage = GenerateStage(ModelConfig(path=tiny_dir, dtype=FP32, device="cpu"))
    names = ["euler", "reference", "euler", "unipc"]
    batch = {
        schema.ID: ["a", "b", "c", "d"],
        schema.PROMPT: ["a cat"] * 4,
        schema.NEGATIVE_PROMPT: [None] * 4,
        schema.SEED: [5] * 4,
        schema.WIDTH: [64] * 4,
        schema.HEIGHT: [64] * 4,
        schema.NUM_INFERENCE_STEPS: [2] * 4,
        schema.GUIDANCE_SCALE: [3.0] * 4,
        schema.SCHEDULER: names,
        schema.STATUS: ["ok"] * 4,
        schema.ERROR: [None] * 4,
    }
    out = stage(batch)
    assert out[schema.STATUS] == ["ok"] * 4
    got = [np.frombuffer(b, np.uint8).reshape(64, 64, 3) for b in out[schema.IMAGE_RGB]]
    # Equal rows at two positions of one batch: to the rounding of CPU kernels (conftest).
    assert_same_images([got[0]], [got[2]])
    for i, name in enumerate(names):
        (want,) = tiny_model.generate([req("a cat", 5, steps=2, scheduler=name)])
        assert np.abs(got[i].astype(int) - want.astype(int)).max() <= 1, name
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[3])


def test_scheduler_choices_are_described_and_an_unknown_one_lists_them():
    described = samplers.describe()
    assert described.startswith("`reference`: the reference's DDIM with eta=1")
    assert described.count("; `") == len(samplers.NAMES) - 1
    assert "; `dpmsolver++`: diffusers' DPMSolverMultistepScheduler" in described
    with pytest.raises(
        ValueError,
        match=r"^scheduler: unknown 'ddpm'; one of reference, dpmsolver\+\+, unipc, euler$",
    ):
        samplers.build("ddpm")
