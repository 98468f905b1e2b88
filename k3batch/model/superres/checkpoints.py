"""The KandiSuperRes checkpoints (`ai-forever/KandiSuperRes`): `upscale.model` -> (scale, the
published file). Torch-free: the config reads it."""

SUPERRES = {
    "x4": (4, "KandiSuperRes.ckpt"),
    "x2": (2, "KandiSuperRes_x2.ckpt"),
    "flash-x2": (2, "KandiSuperRes_flash_x2.pt"),
}
