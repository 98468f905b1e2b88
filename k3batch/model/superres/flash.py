"""KandiSuperRes Flash x2: four x0 steps of the SR UNet, then a tiled Kandinsky 3 Flash refine.

Follows ai-forever/KandiSuperRes (`sr_pipeline.py` with flash=True, scale=2,
`model/diffusion_sr_turbo.py`, `model/diffusion_refine.py`):

- pixels: each side rounded down to a multiple of 32 (PIL's bicubic resize when it changes),
  [-1, 1] floats; the canvas is twice that;
- SR: x = noise; for t in 979, 729, 479, 229 (linear betas 1e-4..0.02 over 1000 steps):
  x = UNet(q_sample(x, t, fresh noise), t, low-res image): the SR UNet predicts x0, the whole
  canvas in one call per image (the reference does not tile this part; see Deviation);
- refine: MoVQ-encode the SR image; in latent tiles of 352 every 264 (overlap 0.25, the last
  tiles shorter), q_sample at t = 229 on the cosine schedule and take x0 from the Kandinsky 3
  Flash UNet's epsilon with the fixed context of the KandiSuperRes repo (`weights/context.pt`,
  `context_mask.pt`: 128 positions already in the UNet's context space, one unmasked; the
  reference's pooling is the mean over all 128 positions, so the Denoiser pools by 128);
  tiles are blended linearly over 88 latents with the tile above and to the left (in place,
  so a tile blends with its already-blended neighbours), then cropped to 264;
- MoVQ (the reference's `get_movq`: `use_tiling`, tile 1024 px): an image above 1024 px a
  side is encoded in tiles of 1024 px every 1024 (no overlap: its blend over 0 latents leaves
  the tiles side by side), a latent above 128 a side decoded in tiles of 128 latents every 96
  (the last ones shorter), blended as the refine's tiles over 256 px and cropped to 768;
- MoVQ decode, clip((x + 1) / 2), bilinear align_corners=True to 2x the input size when the
  rounding changed it, x255 truncated.

Noise: one CPU generator per image seeded from its seed, drawn in the reference's order
(initial noise, one per SR step, one per refine tile in row-major order), so an image
depends only on its seed. Refine tiles of equal shape from any images share UNet calls of at
most `max_tiles_per_call`; MoVQ tiles run one per call (a 1024 px tile already peaks at ~5
GiB to encode and ~10 GiB to decode in float32, and fills a GPU's compute).

Memory (docs/superres.md has the figures and how they were measured): the SR UNet's
activations grow with the canvas, ~1.19 GiB per megapixel in float16 (~19 GiB for a
4096x4096 output; twice that in float32); MoVQ is bounded by its tiles; the refine by its
tiles and `max_tiles_per_call`.

Deviation: a canvas of more than `whole_canvas_side` squared pixels (config:
`upscale.flash_whole_canvas_side`, default 4096, which no output within the default
`upscale.max_output_side` exceeds; lower it e.g. for a GPU under ~32 GiB) runs the SR steps
in MultiDiffusion windows, as superres.py does for x4 / x2: `window` px every `stride`
(1024 / 800), windows of equal shape from any such images batched, at most
`max_tiles_per_call` per call; each step still noises the whole canvas with the same draws,
and the canvas becomes the per-pixel mean of the windows' x0. That bounds the SR steps'
activations to `max_tiles_per_call` windows whatever the input size (~4.75 GiB in float16
at 4 windows of 1024); the reference has no such mode (a whole 8192x8192 canvas would need
~76 GiB). At or below the threshold the steps are the reference's, one UNet call on the
whole canvas, bit for bit as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from k3batch.model.kandinsky3.members import FLASH, FLASH_TIMESTEPS, MEMBERS, REFINE_TIMESTEP
from k3batch.model.superres.checkpoints import FLASH_SIDE_MULTIPLE, SUPERRES
from k3batch.model.superres.pipeline import STRIDE, WINDOW, check_windows
from k3batch.model.superres.sr_unet import SR_UNET, SRUNet
from k3batch.model.superres.tiles import (
    MOVQ_FACTOR,
    MOVQ_TILE,
    TILE,
    blend_tiles,
    movq_decode,
    movq_encode,
    tile_starts,
)

SR_FILE = SUPERRES["flash-x2"][1]
CONTEXT_FILE = "context.pt"
CONTEXT_MASK_FILE = "context_mask.pt"
SIDE_MULTIPLE = FLASH_SIDE_MULTIPLE
MAX_TILES_PER_CALL = 4
# Canvases of more pixels than this side squared run the SR steps in windows (a deviation
# from the reference, which runs the whole canvas): the whole canvas needs ~1.19 GiB of UNet
# activations per megapixel in float16, ~19 GiB at 4096x4096 (docs/superres.md).
WHOLE_CANVAS_SIDE = 4096


def linear_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def load_context(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed refine context (`context.pt`, `context_mask.pt`: tensors only)."""
    from k3batch.model import loading

    out = []
    for name in (CONTEXT_FILE, CONTEXT_MASK_FILE):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"context_path: {folder!r} has no {name} (the KandiSuperRes repo's weights/)"
            )
        t = loading.load_pickle(file)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"context_path: {file} does not hold one tensor")
        out.append(t)
    context, mask = out
    if context.dim() != 3 or mask.shape != context.shape[:2]:
        raise ValueError(
            f"context_path: context {tuple(context.shape)} / mask {tuple(mask.shape)}"
            " are not [1, L, C] / [1, L]"
        )
    return context.float(), mask.long()


@dataclass
class _Row:
    out_size: tuple[int, int]
    lowres: torch.Tensor  # (1, 3, H, W) float32 at the canvas size
    generator: torch.Generator


class KandiSuperResFlash:
    """The Flash x2 SR UNet, Kandinsky 3 Flash (as a Denoiser) and the MoVQ."""

    scale = 2

    def __init__(
        self,
        unet: SRUNet,
        refiner,
        movq,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        *,
        refine: bool = True,
        max_tiles_per_call: int = MAX_TILES_PER_CALL,
        window: int = WINDOW,
        stride: int = STRIDE,
        whole_canvas_side: int = WHOLE_CANVAS_SIDE,
        movq_tile: int = MOVQ_TILE,
    ):
        check_windows(window, stride, max_tiles_per_call)
        if whole_canvas_side < 1:
            raise ValueError(f"whole_canvas_side: {whole_canvas_side!r}, expected >= 1")
        if movq_tile <= 0 or movq_tile % (4 * MOVQ_FACTOR):
            # A multiple of 32: the decode's latent step (3/4 of a tile) is whole latents.
            raise ValueError(f"movq_tile: {movq_tile!r}, expected a positive multiple of 32")
        self.unet = unet.eval()
        self.refiner = refiner  # k3batch.model.kandinsky3.denoiser.Denoiser of the Flash member
        self.movq = movq
        self.context, self.context_mask = context, context_mask
        self.refine = refine
        self.max_tiles_per_call = max_tiles_per_call
        self.window, self.stride = window, stride
        self.whole_canvas_side = whole_canvas_side
        self.movq_tile = movq_tile
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.abar_sr = linear_alphas_cumprod()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        kandinsky3_path: str,
        context_path: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        *,
        config: dict | None = None,
        **sampling,
    ) -> KandiSuperResFlash:
        """`path`: `KandiSuperRes_flash_x2.pt` or a folder holding it; `kandinsky3_path`: a
        Kandinsky 3 checkpoint k3batch loads (reference `weights/` or diffusers layout) for
        the Flash UNet and the MoVQ (MoVQ in float32, as the reference); `context_path`: the
        folder with `context.pt` and `context_mask.pt` (default: `path`'s folder, then its
        `weights/`). Every file is read with `weights_only=True`: no pickled code runs."""
        from k3batch.model import loading
        from k3batch.model.kandinsky3 import loading as k3_loading
        from k3batch.model.kandinsky3.denoiser import Denoiser

        if dtype not in loading.DTYPES:
            raise ValueError(f"dtype: {dtype!r}, expected one of {sorted(loading.DTYPES)}")
        file = os.path.join(path, SR_FILE) if os.path.isdir(path) else path
        folder = os.path.dirname(os.path.abspath(file))
        if context_path is None:
            context_path = folder
            if not os.path.isfile(os.path.join(folder, CONTEXT_FILE)):
                context_path = os.path.join(folder, "weights")
        context, mask = load_context(context_path)
        from k3batch.model.superres.pipeline import checkpoint_state

        dev = loading.resolve_device(device)
        unet = loading.build(
            SRUNet,
            config or SR_UNET,
            checkpoint_state(loading.load_pickle(file)),
            loading.DTYPES[dtype],
            dev,
        )
        member = MEMBERS[FLASH]
        parts = k3_loading.load(
            kandinsky3_path,
            [member],
            dtype={"unet": dtype, "movq": "float32", "text_encoder": "float32"},
            device=device,
            text_encoder=False,
        )
        flash_unet, null = parts.unets[member.name]
        return cls(unet, Denoiser(member, flash_unet, null), parts.movq, context, mask, **sampling)

    def _row(self, image: np.ndarray, seed: int) -> _Row:
        h, w = image.shape[:2]
        rh, rw = h - h % SIDE_MULTIPLE, w - w % SIDE_MULTIPLE
        if (rh, rw) != (h, w):
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        lowres = pixels.float().div(255) * 2 - 1
        # The UNet resizes the low-res image bilinearly to its input; doing it once here is
        # the same interpolation.
        lowres = F.interpolate(lowres, (rh * 2, rw * 2), mode="bilinear").to(self.device)
        return _Row((h * 2, w * 2), lowres, torch.Generator("cpu").manual_seed(seed))

    def _noise(self, row: _Row, shape) -> torch.Tensor:
        return torch.randn(shape, generator=row.generator).to(self.device)

    def sr(self, row: _Row) -> torch.Tensor:
        """The four x0 steps on one canvas: (1, 3, 2H', 2W') float32 in [-1, 1]-ish."""
        # no_grad in the body, not as a decorator: mutmut leaves decorated functions unmutated.
        with torch.no_grad():
            shape = tuple(row.lowres.shape)
            x = self._noise(row, shape)
            for t in FLASH_TIMESTEPS:
                abar = self.abar_sr[t]
                x_t = abar.sqrt() * x + (1 - abar).sqrt() * self._noise(row, shape)
                time = torch.full((1,), float(t), device=self.device, dtype=self.dtype)
                x = self.unet(x_t.to(self.dtype), time, row.lowres.to(self.dtype)).float()
            return x

    def upscale(self, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        """Each HxWx3 uint8 image upscaled to (2H)x(2W)x3 uint8 with its seed."""
        from k3batch.model.superres.pipeline import _check_inputs, _to_uint8

        with torch.no_grad():
            _check_inputs(images, seeds, 1)
            for i, im in enumerate(images):
                if min(im.shape[:2]) < SIDE_MULTIPLE:
                    raise ValueError(
                        f"images[{i}]: sides must be >= {SIDE_MULTIPLE} px, got {im.shape[:2]}"
                    )
            rows = [self._row(im, int(s)) for im, s in zip(images, seeds, strict=True)]
            srs = self.sr_steps(rows)
            if not self.refine:
                return [_to_uint8(x, row.out_size) for x, row in zip(srs, rows, strict=True)]
            latents = [self.encode(x) for x in srs]
            del srs
            refined = self.refine_tiles(rows, latents)
            return [
                _to_uint8(self.decode(z), row.out_size)
                for z, row in zip(refined, rows, strict=True)
            ]

    def runs_whole(self, row: _Row) -> bool:
        """Whether the row's SR steps run the whole canvas in one UNet call (as the
        reference): at most `whole_canvas_side` squared pixels."""
        h, w = row.lowres.shape[-2:]
        return h * w <= self.whole_canvas_side**2

    def sr_steps(self, rows: list[_Row]) -> list[torch.Tensor]:
        """The four x0 steps of every row: whole canvases one by one (`sr`), the larger ones
        together in windows (`sr_windows`)."""
        out = [self.sr(row) if self.runs_whole(row) else None for row in rows]
        large = [i for i, x in enumerate(out) if x is None]
        if large:
            for i, x in zip(large, self.sr_windows([rows[i] for i in large]), strict=True):
                out[i] = x
        return out

    def sr_windows(self, rows: list[_Row]) -> list[torch.Tensor]:
        """The four x0 steps in MultiDiffusion windows (superres.py's geometry: `window` px
        every `stride`, the last flush with the edge): each step noises the whole canvas with
        the same draws as `sr`, predicts x0 per window (windows of equal shape from any rows
        batched, at most `max_tiles_per_call` per call) and takes the per-pixel mean."""
        from k3batch.model.superres.pipeline import merge_windows, predict_windows, window_starts

        with torch.no_grad():
            xs, views = [], []
            for row in rows:
                ch, cw = row.lowres.shape[-2:]
                wh, ww = min(ch, self.window), min(cw, self.window)
                tops = window_starts(ch, self.window, self.stride)
                lefts = window_starts(cw, self.window, self.stride)
                views.append([(a, a + wh, c, c + ww) for a in tops for c in lefts])
                xs.append(self._noise(row, tuple(row.lowres.shape)))
            for t in FLASH_TIMESTEPS:
                abar = self.abar_sr[t]
                canvases = []
                for x, row, v in zip(xs, rows, views, strict=True):
                    x_t = abar.sqrt() * x + (1 - abar).sqrt() * self._noise(row, tuple(x.shape))
                    canvases.append((x_t, row.lowres, v))
                preds = predict_windows(self.unet, canvases, t, self.max_tiles_per_call)
                xs = [merge_windows(x, v, p) for x, v, p in zip(xs, views, preds, strict=True)]
            return xs

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 MoVQ latent of one SR image (1, 3, H, W), in tiles of `movq_tile` px
        above that side (`tiles.movq_encode`)."""
        return movq_encode(self.movq, x.to(self.device), self.movq_tile)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A latent's image (1, 3, 8h, 8w) float32 in [-1, 1]-ish, in tiles of `movq_tile` / 8
        latents above that side (`tiles.movq_decode`)."""
        return movq_decode(self.movq, z, self.movq_tile)

    def refine_tiles(self, rows: list[_Row], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tiled one-step refine of each row's latent, tiles batched across rows."""
        from k3batch.model.schedule import DiffusionSchedule

        sched = DiffusionSchedule(self.device)
        t = REFINE_TIMESTEP
        tiles, groups = [], {}
        for r, (row, z) in enumerate(zip(rows, latents, strict=True)):
            grid = []
            for a in tile_starts(z.shape[2]):
                line = []
                for c in tile_starts(z.shape[3]):
                    tile = z[:, :, a : a + TILE, c : c + TILE]
                    x_t = sched.add_noise(tile, t, self._noise(row, tuple(tile.shape)))
                    groups.setdefault(tuple(tile.shape[2:]), []).append((r, len(grid), len(line)))
                    line.append(x_t)
                grid.append(line)
            tiles.append(grid)
        for members in groups.values():
            for i in range(0, len(members), self.max_tiles_per_call):
                chunk = members[i : i + self.max_tiles_per_call]
                x = torch.cat([tiles[r][a][c] for r, a, c in chunk])
                eps = self._eps(x, t)
                for (r, a, c), e in zip(chunk, eps, strict=True):
                    tiles[r][a][c] = sched.x0_from_eps(tiles[r][a][c], t, e[None])
        return [blend_tiles(grid) for grid in tiles]

    def _eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        n = x.shape[0]
        dev, dt = self.refiner.device, self.refiner.dtype
        context = self.context.to(dev, dt).expand(n, -1, -1)
        mask = self.context_mask.to(dev).expand(n, -1)
        # The reference pools by the mean over every context position.
        lengths = torch.full((n,), float(context.shape[1]), device=dev)
        return self.refiner(x, t, context, mask, lengths).to(x.device)
