"""The Kandinsky 3.1 members: base, Flash and inpainting, declared once.

They share the T5 (Flan-UL2) encoder, the MoVQ and the reference's samplers; each has its
own UNet and text projection (`layout.py` says where their weights live).
"""

from __future__ import annotations

from k3batch.model.member import Member

FAMILY = "kandinsky3"
BASE = "kandinsky3"
FLASH = "kandinsky3-flash"
INPAINT = "kandinsky3-inpaint"

GUIDANCE = "(w+1)*cond - w*uncond"
FLASH_TIMESTEPS = (979, 729, 479, 229)  # range(979, 0, -250) of the reference
REFINE_TIMESTEP = 229  # one Flash step, as the 3.1 release and KandiSuperRes refine

MEMBERS = {
    BASE: Member(
        BASE,
        FAMILY,
        in_channels=4,
        num_inference_steps=50,
        guidance_scale=3.0,
        threshold_percentile=0.99,
        summary="base text-to-image (and image-to-image for rows with an `image`)",
        image_input="optional",
        refinable=True,
        conditioning=True,
        guidance_formula=GUIDANCE,
        unet_folder="unet",
        reference_file="kandinsky3.pt",
        projection_file="projection.pt",
    ),
    FLASH: Member(
        FLASH,
        FAMILY,
        in_channels=4,
        num_inference_steps=None,
        guidance_scale=None,
        summary="Kandinsky 3.1 Flash, 4 fixed steps, no guidance",
        fixed_timesteps=FLASH_TIMESTEPS,
        guidance_formula=GUIDANCE,
        unet_folder="unet_flash",
        reference_file="kandinsky3_flash.pt",
        projection_file="projection_flash.pt",
    ),
    INPAINT: Member(
        INPAINT,
        FAMILY,
        in_channels=9,
        num_inference_steps=50,
        guidance_scale=4.0,
        threshold_percentile=0.95,
        summary="inpainting, rows carry `image` and `mask`",
        image_input="required",
        needs_mask=True,
        guidance_formula=GUIDANCE,
        unet_folder="unet_inpaint",
        reference_file="kandinsky3_inpainting.pt",
        projection_file="projection_inpainting.pt",
    ),
}
NAMES = tuple(MEMBERS)


def members_needed(name: str, refine: bool = False) -> list[Member]:
    """The members a job loads: its own, plus Flash when a base job refines."""
    needed = [MEMBERS[name]]
    if refine and MEMBERS[name].refinable:
        needed.append(MEMBERS[FLASH])
    return needed
