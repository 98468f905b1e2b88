"""The Kandinsky 3 cases (scripts/check_reference.py) and k3batch's side of each."""

from __future__ import annotations

import dataclasses

import numpy as np

from .files import rng_picture

# --------------------------------------------------------------------------- Kandinsky 3
# scripts/check_reference.py: ai-forever/Kandinsky-3's own text-to-image (with and without a
# negative prompt), Flash and inpainting pipelines on the tiny family, reference layout.
K3_PROMPT = "a blue robot in the rain, oil painting"


@dataclasses.dataclass(frozen=True)
class K3Case:
    name: str
    member: str  # the family member (k3batch.model.kandinsky3.members)
    seed: int
    steps: int
    guidance: float
    width: int = 0  # inpainting: 0, the size follows the picture
    height: int = 0
    negative: str | None = None
    picture: tuple[int, int] | None = None  # inpainting: the random picture's (h, w)
    mask_box: tuple[int, int, int, int] | None = None  # rows a:b, columns c:d masked


K3_CASES = (
    K3Case("k3_text_to_image", "kandinsky3", 11, 5, 3.0, 128, 64),
    K3Case("k3_text_to_image_negative", "kandinsky3", 11, 5, 3.0, 128, 64, "blurry, ugly"),
    # The reference's Flash takes no steps or guidance: 979/729/479/229, unguided.
    K3Case("k3_flash", "kandinsky3-flash", 5, 4, 0.0, 64, 64),
    K3Case(
        "k3_inpainting",
        "kandinsky3-inpaint",
        7,
        5,
        4.0,
        picture=(150, 100),
        mask_box=(20, 90, 10, 60),
    ),
)


def k3_inputs(case: K3Case) -> dict[str, np.ndarray]:
    """The reference's inputs beyond the prompt: inpainting's picture and 0/1 mask."""
    if case.picture is None:
        return {}
    h, w = case.picture
    mask = np.zeros((h, w), dtype=np.uint8)
    a, b, c, d = case.mask_box
    mask[a:b, c:d] = 1
    return {"picture": rng_picture(h, w, 3), "mask": mask}


def k3_files(case: K3Case) -> list[str]:
    """The files of a reference-layout tiny set (`make_tiny(layout="reference")`) the case
    reads."""
    from k3batch.model.kandinsky3 import layout, members

    member = members.MEMBERS[case.member]
    w, text = layout.REFERENCE_WEIGHTS_DIR, layout.REFERENCE_TEXT_DIR
    return [
        f"{w}/{member.reference_file}",
        f"{w}/{layout.REFERENCE_MOVQ_FILE}",
        f"{w}/{text}/{member.projection_file}",
        f"{w}/{text}/model.safetensors",
        f"{w}/{text}/tokenizer.json",
    ]


def k3_request(case: K3Case, inputs: dict):
    from PIL import Image

    from k3batch import images as kimg
    from k3batch.model.kandinsky3.pipeline import Request

    if case.picture is None:
        return Request(
            K3_PROMPT, case.negative, case.seed, case.width, case.height, case.steps, case.guidance
        )
    picture = Image.fromarray(inputs["picture"])
    size = kimg.diffusion_size(*picture.size)
    return Request(
        K3_PROMPT,
        case.negative,
        case.seed,
        *size,
        case.steps,
        case.guidance,
        image=kimg.prepare_image(picture, size),
        mask=kimg.prepare_mask(inputs["mask"].astype(int), size),
    )


def k3_side(model, case: K3Case, inputs: dict) -> dict[str, np.ndarray]:
    """k3batch on the case: its first noise draw, final latent and image."""
    import torch

    from k3batch.model.noise import RowNoise

    request = k3_request(case, inputs)
    shape = (4, request.height // 8, request.width // 8)
    noise = RowNoise([torch.Generator().manual_seed(case.seed)], shape, "cpu")()
    latent = model.sample([request])
    (image,) = model.decode(latent)
    return {"noise": noise.numpy(), "latent": latent.numpy(), "image": image}
