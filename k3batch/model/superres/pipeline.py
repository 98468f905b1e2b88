"""KandiSuperRes x4 / x2: load a published checkpoint safely, upscale images as the reference.

Sampling follows ai-forever/KandiSuperRes (`model/diffusion_sr.py`, `sr_pipeline.py`, the
non-Flash path):

- the low-resolution image as [-1, 1] floats, bilinearly resized (align_corners=False) to
  the canvas: (side + side % 2) * scale, i.e. odd sides rounded up to even first;
- diffusers' `DPMSolverMultistepScheduler` exactly as the reference configures it: linear
  betas 1e-4..0.02 over 1000 steps, prediction_type "sample" (the UNet predicts x0),
  DPM-Solver++ 2M with its defaults, 5 steps (timesteps 999, 799, 599, 400, 200);
- MultiDiffusion: at every step the canvas is cut into windows of `window` px (1024) every
  `stride` px (800; the last window flush with the far edge; a side no longer than the
  window is one window of that side), each window is denoised and stepped by the solver with
  its own multistep history, and the canvas becomes the per-pixel mean of the windows;
- [0, 1] = clip((x + 1) / 2); a canvas larger than the output (odd sides) is resized with
  bilinear align_corners=True; x255 then truncation to uint8 (torchvision's ToPILImage).

Reproducibility: each row's initial noise comes from its own CPU `torch.Generator` seeded
from its seed (the reference's `torch.randn` with that seed on the CPU; DPM-Solver++ draws
nothing after it), so an image depends on its seed, not on its batch or device.

Memory: windows of every row go through the UNet in calls of at most `max_tiles_per_call`
windows (windows of equal shape, from any rows), so the UNet's activations are bounded
whatever the input size; the canvases and the windows' solver history scale with the input.

Precision: the UNet runs in its dtype, as the reference casts the noisy window, the time and
the low-resolution window to it; the solver, the canvas and the averaging stay float32.

Deviation, only where the reference cannot run: a canvas side no larger than the window
that is not a multiple of 8 (x2 of a side that is 2 mod 4) breaks the UNet's skip
connections there; such a side is rounded up to a multiple of 8 and the result resized to
the output size like an odd side.

Flash x2 (`diffusion_sr_turbo.py`) is `superres_flash.KandiSuperResFlash`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from k3batch.model.superres.checkpoints import SUPERRES
from k3batch.model.superres.sr_unet import SIZE_MULTIPLE, SR_UNET, SRUNet

# scale -> the file name on the Hugging Face repo ai-forever/KandiSuperRes.
CHECKPOINTS = {SUPERRES[m][0]: SUPERRES[m][1] for m in ("x4", "x2")}
WINDOW = 1024
STRIDE = 800
STEPS = 5
MAX_TILES_PER_CALL = 4


def solver(num_inference_steps: int):
    """The reference's DPM-Solver, set to `num_inference_steps` (multistep: one per window
    group, never shared)."""
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(
        beta_schedule="linear", prediction_type="sample", thresholding=False
    )
    s.set_timesteps(num_inference_steps, device="cpu")
    return s


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side: every `stride`, the last flush with the end."""
    if side <= window:
        return [0]
    count = -(-(side - window) // stride) + 1
    return [min(i * stride, side - window) for i in range(count)]


def checkpoint_state(obj) -> dict:
    """The UNet's state dict from a loaded checkpoint: the published .ckpt is the state dict
    itself; a {"unet": state} container (the Flash x2 .pt) is accepted too, as the
    reference's loader does."""
    if isinstance(obj, dict) and isinstance(obj.get("unet"), dict):
        obj = obj["unet"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint: expected a state dict of tensors (or {'unet': state})")
    return obj


@dataclass
class _Row:
    """One image being upscaled: its canvas, conditioning, windows and solver."""

    out_size: tuple[int, int]
    x: torch.Tensor  # (1, 3, H, W) float32 canvas
    lowres: torch.Tensor  # (1, 3, H, W) float32, the input resized to the canvas
    views: list[tuple[int, int, int, int]]  # (top, bottom, left, right)
    solver: object

    def crops(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :, a:b, c:d] for a, b, c, d in self.views])


class KandiSuperRes:
    """A loaded SR UNet and the reference's x4 / x2 sampler for batches of images."""

    def __init__(
        self,
        unet: SRUNet,
        scale: int,
        *,
        window: int = WINDOW,
        stride: int = STRIDE,
        max_tiles_per_call: int = MAX_TILES_PER_CALL,
    ):
        if scale not in CHECKPOINTS:
            raise ValueError(f"scale: {scale!r}, expected one of {sorted(CHECKPOINTS)}")
        check_windows(window, stride, max_tiles_per_call)
        self.unet = unet.eval()
        self.scale = scale
        self.window = window
        self.stride = stride
        self.max_tiles_per_call = max_tiles_per_call
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        scale: int = 4,
        device: str = "auto",
        dtype: str = "float32",
        *,
        config: dict | None = None,
        **sampling,
    ) -> KandiSuperRes:
        """Load `path`: a checkpoint file, or a folder holding the published file for
        `scale` (`CHECKPOINTS`). Read with `torch.load(weights_only=True, mmap=True)`:
        tensors only, no pickled code runs. `config`: the UNet's architecture (`SR_UNET`);
        `sampling`: the constructor's window, stride and max_tiles_per_call."""
        from k3batch.model import loading

        if scale not in CHECKPOINTS:
            raise ValueError(f"scale: {scale!r}, expected one of {sorted(CHECKPOINTS)}")
        if dtype not in loading.DTYPES:
            raise ValueError(f"dtype: {dtype!r}, expected one of {sorted(loading.DTYPES)}")
        file = os.path.join(path, CHECKPOINTS[scale]) if os.path.isdir(path) else path
        state = checkpoint_state(loading.load_pickle(file))
        unet = loading.build(
            SRUNet,
            config or SR_UNET,
            state,
            loading.DTYPES[dtype],
            loading.resolve_device(device),
        )
        return cls(unet, scale, **sampling)

    def canvas_side(self, side: int) -> int:
        canvas = (side + side % 2) * self.scale
        if canvas <= self.window and canvas % SIZE_MULTIPLE:
            canvas += SIZE_MULTIPLE - canvas % SIZE_MULTIPLE
        return canvas

    def _row(self, image: np.ndarray, seed: int, steps: int) -> _Row:
        h, w = image.shape[:2]
        ch, cw = self.canvas_side(h), self.canvas_side(w)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # a copy: writable
        lowres = pixels.float().div(255) * 2 - 1
        lowres = F.interpolate(lowres.to(self.device), (ch, cw), mode="bilinear")
        generator = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, 3, ch, cw), generator=generator).to(self.device)
        tops = window_starts(ch, self.window, self.stride)
        lefts = window_starts(cw, self.window, self.stride)
        wh, ww = min(ch, self.window), min(cw, self.window)
        views = [(a, a + wh, c, c + ww) for a in tops for c in lefts]
        return _Row((h * self.scale, w * self.scale), x, lowres, views, solver(steps))

    def upscale(
        self, images: list[np.ndarray], seeds: list[int], num_inference_steps: int = STEPS
    ) -> list[np.ndarray]:
        """Each HxWx3 uint8 image upscaled to (H*scale)x(W*scale)x3 uint8 with its seed."""
        # no_grad in the body, not as a decorator: mutmut leaves decorated functions unmutated.
        with torch.no_grad():
            _check_inputs(images, seeds, num_inference_steps)
            rows = [
                self._row(im, int(s), num_inference_steps)
                for im, s in zip(images, seeds, strict=True)
            ]
            for t in rows[0].solver.timesteps.tolist():
                predictions = self._predict(rows, t)
                for row, x0 in zip(rows, predictions, strict=True):
                    stepped = row.solver.step(x0, t, row.crops(row.x), return_dict=False)[0]
                    row.x = merge_windows(row.x, row.views, stepped)
            return [_to_uint8(row.x, row.out_size) for row in rows]

    def _predict(self, rows: list[_Row], t: int) -> list[torch.Tensor]:
        """Every row's x0 per window at time t, windows of equal shape batched across rows."""
        return predict_windows(
            self.unet, [(row.x, row.lowres, row.views) for row in rows], t, self.max_tiles_per_call
        )


def check_windows(window: int, stride: int, max_tiles_per_call: int) -> None:
    """The MultiDiffusion window settings both SR models take; ValueError naming the bad one."""
    if max_tiles_per_call < 1:
        raise ValueError(f"max_tiles_per_call: {max_tiles_per_call!r}, expected >= 1")
    if window <= 0 or window % SIZE_MULTIPLE:
        raise ValueError(f"window: {window!r}, expected a positive multiple of 8")
    if not 0 < stride <= window:
        raise ValueError(f"stride: {stride!r}, expected 1..window ({window})")


def predict_windows(unet, canvases, t: int, max_tiles_per_call: int) -> list[torch.Tensor]:
    """The UNet's x0 for every window of each (x, lowres, views) canvas at time t, stacked per
    canvas: windows of equal shape from any canvases go through the UNet together, at most
    `max_tiles_per_call` per call, in the UNet's dtype (the result float32)."""
    first = next(unet.parameters())
    device, dtype = first.device, first.dtype
    tiles: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, (_, _, views) in enumerate(canvases):
        a, b, c, d = views[0]
        tiles.setdefault((b - a, d - c), []).extend((r, v) for v in range(len(views)))
    out = [[None] * len(views) for _, _, views in canvases]
    for group in tiles.values():
        for i in range(0, len(group), max_tiles_per_call):
            chunk = group[i : i + max_tiles_per_call]
            x = torch.cat([_view(canvases[r][0], canvases[r][2][v]) for r, v in chunk])
            lo = torch.cat([_view(canvases[r][1], canvases[r][2][v]) for r, v in chunk])
            time = torch.full((len(chunk),), float(t), device=device, dtype=dtype)
            x0 = unet(x.to(dtype), time, lo.to(dtype)).float()
            for (r, v), pred in zip(chunk, x0, strict=True):
                out[r][v] = pred
    return [torch.stack(preds) for preds in out]


def merge_windows(like: torch.Tensor, views, tiles: torch.Tensor) -> torch.Tensor:
    """The canvas shaped like `like` that is the per-pixel mean of `tiles` at `views`."""
    value, count = torch.zeros_like(like), torch.zeros_like(like)
    for (a, b, c, d), tile in zip(views, tiles, strict=True):
        value[:, :, a:b, c:d] += tile
        count[:, :, a:b, c:d] += 1
    return value / count


def _view(t: torch.Tensor, view: tuple[int, int, int, int]) -> torch.Tensor:
    a, b, c, d = view
    return t[:, :, a:b, c:d]


def _to_uint8(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    out = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    if tuple(out.shape[-2:]) != size:
        out = F.interpolate(out, size, mode="bilinear", align_corners=True)
    # x255 then truncation, as torchvision's ToPILImage in the reference.
    return out[0].mul(255).byte().permute(1, 2, 0).cpu().numpy()


def _check_inputs(images, seeds, steps) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images: expected a non-empty list of HxWx3 uint8 arrays")
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8:
            raise ValueError(f"images[{i}]: expected a uint8 numpy array")
        if im.ndim != 3 or im.shape[2] != 3 or 0 in im.shape:
            raise ValueError(f"images[{i}]: expected shape HxWx3 with H, W > 0, got {im.shape}")
    if not isinstance(seeds, (list, tuple)) or len(seeds) != len(images):
        raise ValueError(f"seeds: expected a list of {len(images)} ints, one per image")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seeds[{i}]: expected an int, got {s!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {steps!r}")
