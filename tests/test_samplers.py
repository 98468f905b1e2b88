"""`generation.scheduler`: diffusers' multistep solvers on Kandinsky 3's schedule, per config
and per row. The reference sampler itself is pinned by the parity tests in test_model.py."""

import numpy as np
import pytest
import torch

from k3batch import schema
from k3batch.model import samplers
from k3batch.model.kandinsky3.pipeline import Request
from k3batch.model.schedule import DiffusionSchedule, base_timesteps
from k3batch.rows.check import normalise_row
from k3batch.rows.rules import RowRules

from .conftest import FP32, load_tiny, row_capabilities

SOLVERS = [n for n in samplers.NAMES if n != samplers.REFERENCE]
# Batch shapes change CPU kernels' rounding (~1e-7 of epsilon, see conftest.LATENT_ATOL);
# Euler's first steps scale epsilon by sigma (up to ~2250 on the cosine schedule), so its
# latents agree to ~1e-4 rather than ~1e-6. Different seeds differ by ~1 (asserted below).
SOLVER_ATOL = 1e-3


def req(prompt="a red cat at sunset", seed=1, steps=3, w=3.0, scheduler="euler", **kw):
    return Request(prompt, None, seed, 64, 64, steps, w, scheduler=scheduler, **kw)


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
    got = [np.frombuffer(b, np.uint8) for b in out[schema.IMAGE_RGB]]
    assert np.array_equal(got[0], got[2])
    for i, name in enumerate(names):
        (want,) = tiny_model.generate([req("a cat", 5, steps=2, scheduler=name)])
        assert np.abs(got[i].astype(int) - want.reshape(-1).astype(int)).max() <= 1, name
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[3])
