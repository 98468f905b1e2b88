"""A Kandinsky 2.2 row's image inputs: checks naming the field (`mix`, `hint`, `image`), and
the conversions diffusers' pipelines take (a hint tensor as `make_hint` makes it, PIL
images)."""

import math
import numbers

import numpy as np
import torch


def hint_tensor(hints: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 depth maps -> (N, 3, H, W) float in [0, 1], as diffusers' `make_hint`."""
    # torch.tensor copies: a hint read from Arrow or PIL is a read-only array, which
    # torch.from_numpy would share and warn about.
    return torch.stack(
        [torch.tensor(np.asarray(h, np.uint8)).float().div(255.0).permute(2, 0, 1) for h in hints]
    )


def check_mix(mix) -> None:
    """ValueError naming `mix` (and the item) unless `mix` is a non-empty list of (prompt
    text or HxWx3 uint8 image, finite weight) items."""
    if not isinstance(mix, (list, tuple)) or not mix:
        raise ValueError("mix: expected a non-empty list of (prompt or image, weight) items")
    for i, item in enumerate(mix):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"mix[{i}]: expected a (prompt or image, weight) pair")
        cond, weight = item
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
        ):
            raise ValueError(f"mix[{i}]: weight {weight!r} is not a finite number")
        if isinstance(cond, str):
            continue
        if not isinstance(cond, np.ndarray):
            raise ValueError(
                f"mix[{i}]: expected a prompt or an HxWx3 uint8 image, got {type(cond).__name__}"
            )
        check_image(cond, f"mix[{i}]")


def check_image(image, field: str, size: tuple[int, int] | None = None) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"{field}: expected an HxWx3 uint8 image")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{field}: expected an HxWx3 uint8 image, got shape {image.shape}")
    if size is not None and image.shape[:2] != tuple(size):
        raise ValueError(
            f"{field}: size {image.shape[1]}x{image.shape[0]}, the row's is {size[1]}x{size[0]}"
        )


def pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(image, np.uint8))
