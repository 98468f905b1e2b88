"""The KandiSuperRes checkpoints (`ai-forever/KandiSuperRes`): `upscale.model` -> (scale, the
published file). Torch-free: the config reads it."""

SUPERRES = {
    "x4": (4, "KandiSuperRes.ckpt"),
    "x2": (2, "KandiSuperRes_x2.ckpt"),
    "flash-x2": (2, "KandiSuperRes_flash_x2.pt"),
}
# Flash x2 works on sides that are multiples of 32 (an input is cropped down to them), so an
# image needs at least 32 px a side.
FLASH_SIDE_MULTIPLE = 32
