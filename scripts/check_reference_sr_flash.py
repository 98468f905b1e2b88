"""Run ai-forever/KandiSuperRes's own Flash x2 pipeline against k3batch on tiny weights.

Not part of the test suite (needs a checkout of ai-forever/KandiSuperRes and einops). It
imports the reference's modules from the checkout (nothing is copied) the way
scripts/check_reference_sr.py does, writes the tiny Flash x2 file with `make_tiny_sr_flash`,
loads it into the reference's own `UNet_sr` (strict, through the `{"unet": state}` container
as `get_sr_model` reads it) and runs `KandiSuperResPipeline(flash=True, scale=2)` with
`refine=False` on CPU in float32 after `torch.manual_seed(seed)`; k3batch runs
`KandiSuperResFlash` with `refine=False` on the same file, picture and seed.

Covered: the four x0 steps (979/729/479/229, linear betas, fresh q_sample noise, the noise
order), the rounding of sides down to 32 and the resize back; the MoVQ tiling: the
reference's own `movq.MoVQ` (KandiSuperRes's, with `use_tiling`) built at the tiny widths
with the tiny Kandinsky 3's `weights/movq.pt`, its `encode` / `decode` against
`KandiSuperResFlash.encode` / `decode`, at the reference's 1024 px tile (a 1088x1152 image)
and at a 64 px tile (every tile path on a small image).

The Kandinsky 3 Flash refine: the reference's pipeline with `refine=True`, given that MoVQ
(tile 1024, as `get_movq`) and its own T2I UNet (`model/unet.py` with `get_T2I_unet`'s
arguments at the tiny Kandinsky 3 widths of the tiny set's `k3batch_config.json`, loaded
strictly with the `unet` state of the tiny reference-layout `weights/kandinsky3_flash.pt`),
run in a working directory whose `weights/` holds the tiny `context.pt` / `context_mask.pt`
k3batch reads; k3batch runs `KandiSuperResFlash(refine=True)` on the same files, picture
and seed. Recorded on the way past (values passed through unchanged) on both sides: every
noise draw (the reference's first `torch.randn` reproduced from the global generator's
state, its q_sample noise; k3batch's generator draws), the MoVQ latent, each refine tile's
UNet input x_t and epsilon, and the refined latent. Cases: one latent tile (32x32, 40x70)
and two of the real 352-every-264 tiles down (1088x64) and across (64x1088), with the
tiled MoVQ. Each case is run three ways on k3batch's side: as is; from the reference's MoVQ
latent (the refine's inputs then equal bit for bit); and from that latent with the
reference UNet's epsilon per tile (so the schedule, the x0 and the tile blend are what is
compared). Figures (CPU, float32, one thread): the noise draws are the same tensors in the
same order (6 / 7 per image); the refined latents differ by at most 3.8e-6 (relative 1.9e-6,
from the two MoVQ encoders' and the two UNets' float32 rounding: epsilon differs by at most
6.0e-6, relative 3.7e-6, on equal inputs); with the reference's epsilon the refined latents
are equal bit for bit; the images differ by at most 1 grey level in at most 145 of 835584
bytes (the MoVQ decoders' rounding: the count stays with equal refined latents).

    python scripts/check_reference_sr_flash.py /path/to/KandiSuperRes [sr] [movq] [refine]
        [--record tests/goldens]

The cases (`FLASH_CASES`) and k3batch's side are `k3batch.testing.reference_goldens`'.
`--record DIR` writes each SR and refine case's golden files (the picture, the reference's
image, and for the refine its MoVQ and refined latents and, for the smallest case, its noise
draws) for tests/test_goldens.py; the MoVQ part records none.

(no part named: all three; the refine takes ~1 minute on one CPU thread, the MoVQ part ~2)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from k3batch.model.kandinsky3.members import FLASH_TIMESTEPS
from k3batch.model.superres.flash import SR_FILE, KandiSuperResFlash
from k3batch.model.superres.sr_unet import TINY_SR_UNET
from k3batch.testing import reference_goldens as golden
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_sr import make_tiny_sr_flash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_reference import _diff, _max_diff, tiny_movq_config  # noqa: E402
from check_reference_sr import _reference, _reference_unet  # noqa: E402

from k3batch.model.kandinsky3 import layout

PARTS = ("sr", "movq", "refine")


def main(checkout: str, parts: tuple[str, ...] = PARTS, record: str | None = None) -> None:
    ref = _reference(checkout)
    pipeline_cls = ref["sr_pipeline"].KandiSuperResPipeline
    root = tempfile.mkdtemp(prefix="k3-srflash-ref-check-")
    folder = make_tiny_sr_flash(os.path.join(root, "sr"))
    k3 = make_tiny(os.path.join(root, "k3"), layout="reference")
    unet = _reference_unet(ref, TINY_SR_UNET).eval()
    unet.load_state_dict(torch.load(os.path.join(folder, SR_FILE), weights_only=True)["unet"])
    devices = {"movq": "cpu", "refiner": "cpu", "sr_model": "cpu"}
    dtypes = {"movq": torch.float32, "refiner": torch.float32, "sr_model": torch.float32}
    pipe = pipeline_cls(2, devices, dtypes, True, unet)
    model = KandiSuperResFlash.from_pretrained(
        folder, k3, device="cpu", config=TINY_SR_UNET, refine=False
    )

    def save(case, theirs, picture):
        if record:
            weights = golden.flash_weights(folder, k3, case)
            meta = golden.metadata(
                "KandiSuperRes", checkout, "scripts/check_reference_sr_flash.py", case, weights
            )
            meta["settings"]["seed"] = golden.FLASH_SEED
            arrays = golden.flash_arrays(theirs, case)
            if case.subsample == 1:  # a large picture is rebuilt from its seed
                arrays["picture"] = picture
            golden.save(record, case.name, arrays, meta)

    if "sr" in parts:
        for case in (c for c in golden.FLASH_CASES if not c.refine):
            picture = golden.flash_picture(case)
            torch.manual_seed(golden.FLASH_SEED)
            image = pipe(Image.fromarray(picture), seed=golden.FLASH_SEED, refine=False)
            theirs = {"image": np.asarray(image)}
            ours = golden.flash_side(model, case, picture)["image"]
            print(
                f"{case.name}: flash x2 SR steps {case.height}x{case.width} -> "
                f"{ours.shape[0]}x{ours.shape[1]}: {_diff(theirs['image'], ours)}"
            )
            save(case, theirs, picture)
    if "movq" in parts:
        for tile, (h, w) in ((1024, (1088, 1152)), (64, (136, 200))):
            movq = _reference_movq(k3, tile)
            ours = KandiSuperResFlash(
                model.unet,
                model.refiner,
                model.movq,
                model.context,
                model.context_mask,
                movq_tile=tile,
            )
            x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
            with torch.no_grad():
                z_ref, z_ours = movq.encode(x), ours.encode(x)
                x_ref, x_ours = movq.decode(z_ref), ours.decode(z_ref)
            print(
                f"MoVQ tile {tile}, {h}x{w}: encode max |diff| {(z_ref - z_ours).abs().max():.2e}, "
                f"decode max |diff| {(x_ref - x_ours).abs().max():.2e} (of values up to "
                f"{x_ref.abs().max():.1f}: the two MoVQ implementations' float32 rounding, which "
                "one untiled tile shows too)"
            )
    if "refine" in parts:
        check_refine(ref, root, folder, k3, unet, model, save)


def _reference_movq(k3: str, tile: int):
    """KandiSuperRes's own MoVQ (tiling as `get_movq`, tile `tile` px) at the tiny widths."""
    import importlib

    movq = importlib.import_module("KandiSuperRes.movq").MoVQ(
        dict(
            **tiny_movq_config(),
            tile_sample_min_size=tile,
            tile_overlap_factor_enc=0.0,
            tile_overlap_factor_dec=0.25,
            use_tiling=True,
        )
    )
    file = os.path.join(k3, layout.REFERENCE_WEIGHTS_DIR, layout.REFERENCE_MOVQ_FILE)
    movq.load_state_dict(torch.load(file, weights_only=True))
    return movq.eval()


def _reference_refiner(k3: str):
    """KandiSuperRes's own T2I UNet (`model/unet.py`) with `get_T2I_unet`'s arguments at the
    tiny Kandinsky 3 widths (the tiny set's `k3batch_config.json`), loaded strictly with the
    tiny Flash file's `unet` state (the reference's parameter names)."""
    import importlib
    import json

    from k3batch.model import family

    weights = os.path.join(k3, layout.REFERENCE_WEIGHTS_DIR)
    with open(os.path.join(weights, layout.REFERENCE_CONFIG_FILE)) as f:
        config = json.load(f)["unet"]
    mc = config["block_out_channels"][0]
    levels = len(config["block_out_channels"])
    unet = importlib.import_module("KandiSuperRes.model.unet").UNet(
        model_channels=mc,  # 384
        num_channels=4,
        init_channels=mc // 2,  # 192
        time_embed_dim=config["time_embedding_dim"],  # 1536
        context_dim=config["cross_attention_dim"],  # 4096
        groups=config["groups"],  # 32
        head_dim=config["attention_head_dim"],  # 64
        expansion_ratio=4,
        compression_ratio=2,
        dim_mult=tuple(c // mc for c in config["block_out_channels"]),  # (1, 2, 4, 8)
        num_blocks=(config["layers_per_block"],) * levels,  # (3, 3, 3, 3)
        add_cross_attention=(False, True, True, True),
        add_self_attention=(False, True, True, True),
    )
    file = os.path.join(weights, family.MEMBERS[family.FLASH].reference_file)
    unet.load_state_dict(torch.load(file, weights_only=True)["unet"])
    return unet.eval()


def check_refine(ref: dict, root: str, folder: str, k3: str, sr_unet, model, save) -> None:
    """The reference's `refine=True` (SR steps, its tiled MoVQ, `refine_tiled` with its own
    T2I UNet, the context read from `weights/` of the working directory) against
    `KandiSuperResFlash(refine=True)`; the noise draws, the MoVQ latents and the refined
    latents are recorded on the way past on both sides (values passed through unchanged);
    `save(case, reference's record, picture)` writes a case's golden."""
    import importlib
    import warnings

    from k3batch.model.superres.tiles import MOVQ_TILE

    # The reference wraps MoVQ and the refiner in torch.cuda.amp.autocast (off on CPU).
    warnings.filterwarnings("ignore", message=".*autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    base_sr = importlib.import_module("KandiSuperRes.model.diffusion_sr_turbo").BaseDiffusion
    base_refine = importlib.import_module("KandiSuperRes.model.diffusion_refine").BaseDiffusion
    devices = {"movq": "cpu", "refiner": "cpu", "sr_model": "cpu"}
    dtypes = {"movq": torch.float32, "refiner": torch.float32, "sr_model": torch.float32}
    pipe = ref["sr_pipeline"].KandiSuperResPipeline(
        2, devices, dtypes, True, sr_unet, _reference_movq(k3, MOVQ_TILE), _reference_refiner(k3)
    )
    # The reference reads `weights/context.pt` and `weights/context_mask.pt` from the working
    # directory: the same tiny files k3batch reads from `folder`.
    os.symlink(folder, os.path.join(root, "weights"))

    rec: dict = {}

    # Reference: its first draw (p_sample_loop's torch.randn, reproduced from the global
    # generator's state at entry), every q_sample's noise (the four SR steps', then one per
    # refine tile), the latent into and out of refine_tiled.
    loop, sr_q, refine_q, tiled = (
        base_sr.p_sample_loop,
        base_sr.q_sample,
        base_refine.q_sample,
        base_refine.refine_tiled,
    )

    def rec_loop(self, model_, shape, *args, **kwargs):
        g = torch.Generator().set_state(torch.get_rng_state())
        rec["noise"].append(torch.randn(*shape, generator=g))
        return loop(self, model_, shape, *args, **kwargs)

    def recorder(q_sample):
        def rec_q_sample(self, x_start, t, noise=None):
            noise = self.gen_noise(x_start) if noise is None else noise
            rec["noise"].append(noise.clone())
            return q_sample(self, x_start, t, noise)

        return rec_q_sample

    def rec_tiled(self, model_, img, context, context_mask):
        rec["latent"] = img.clone()
        rec["refined"] = out = tiled(self, model_, img, context, context_mask)
        return out.clone()

    base_sr.p_sample_loop, base_sr.q_sample = rec_loop, recorder(sr_q)
    base_refine.q_sample, base_refine.refine_tiled = recorder(refine_q), rec_tiled
    # The reference UNet's input x_t and epsilon, one call per refine tile.
    pipe.refiner.register_forward_hook(
        lambda module, args, out: rec["eps"].append((args[0].clone(), out.clone()))
    )

    def reference_eps(x, t, own):
        """The reference UNet's epsilon for each row of x (which must equal one of its x_t
        bit for bit)."""
        return torch.cat(
            [next(o for i, o in rec["eps"] if torch.equal(i, x[k : k + 1])) for k in range(len(x))]
        )

    cwd = os.getcwd()
    try:
        for case in (c for c in golden.FLASH_CASES if c.refine):
            h, w = case.height, case.width
            picture = golden.flash_picture(case)
            rec["noise"], rec["eps"] = [], []
            os.chdir(root)
            try:
                torch.manual_seed(golden.FLASH_SEED)
                image = pipe(Image.fromarray(picture), seed=golden.FLASH_SEED, refine=True)
            finally:
                os.chdir(cwd)
            theirs = dict(rec, image=np.asarray(image))
            ours = golden.flash_side(model, case, picture)
            ref_noise, our_noise = theirs["noise"], ours["noise"]
            same = len(ref_noise) == len(our_noise) and all(
                a.shape == b.shape and torch.equal(a, b)
                for a, b in zip(ref_noise, our_noise, strict=False)
            )
            z_ref, z_ours = theirs["latent"], ours["latent"]
            refined_ref = theirs["refined"]
            tiles = len(ref_noise) - 1 - len(FLASH_TIMESTEPS)
            print(
                f"{case.name}: refine {h}x{w} -> {image.size[1]}x{image.size[0]} (latent "
                f"{z_ref.shape[2]}x{z_ref.shape[3]}, {tiles} refine tile(s)): noise draws "
                f"{'the same' if same else 'DIFFER'} ({len(ref_noise)} / {len(our_noise)}); "
                f"MoVQ latent {_max_diff(z_ref, z_ours)}; refined latent "
                f"{_max_diff(refined_ref, ours['refined'][0])}; image "
                f"{_diff(theirs['image'], ours['image'])}"
            )
            save(case, theirs, picture)
            # The refine's own arithmetic: k3batch's refine on the reference's MoVQ latent
            # (the same x_t then), with its own Flash UNet and with the reference UNet's eps.
            ours = golden.flash_side(model, case, picture, latent=z_ref)
            pairs = list(zip(theirs["eps"], ours["eps"], strict=True))
            x_same = all(torch.equal(a[0], b[0]) for a, b in pairs)
            eps_d = max((a[1] - b[1]).abs().max().item() for a, b in pairs)
            eps_m = max(a[1].abs().max().item() for a, _ in pairs)
            print(
                f"  from the reference's MoVQ latent: UNet inputs x_t "
                f"{'equal bit for bit' if x_same else 'DIFFER'}, epsilon max |diff| {eps_d:.2e} "
                f"(relative {eps_d / eps_m:.1e}); refined latent "
                f"{_max_diff(refined_ref, ours['refined'][0])}; image "
                f"{_diff(theirs['image'], ours['image'])}"
            )
            ours = golden.flash_side(model, case, picture, latent=z_ref, eps=reference_eps)
            print(
                f"  and the reference UNet's epsilon: refined latent "
                f"{_max_diff(refined_ref, ours['refined'][0])}; image "
                f"{_diff(theirs['image'], ours['image'])}"
            )
    finally:
        base_sr.p_sample_loop, base_sr.q_sample = loop, sr_q
        base_refine.q_sample, base_refine.refine_tiled = refine_q, tiled


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of ai-forever/KandiSuperRes")
    parser.add_argument("parts", nargs="*", choices=PARTS, help="default: all three")
    parser.add_argument("--record", metavar="DIR", help="write each case's golden files to DIR")
    args = parser.parse_args()
    main(args.checkout, tuple(args.parts) or PARTS, args.record)
