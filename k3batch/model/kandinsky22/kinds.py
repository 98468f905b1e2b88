"""A Kandinsky 2.2 row's mode (`Kandinsky22.kind`), and the key of the decoder pipeline that
runs it (`loading` builds them; mixing runs the text-to-image decoder)."""

KIND_TEXT = "text-to-image"
KIND_IMAGE = "image-to-image"
KIND_INPAINT = "inpainting"
KIND_CONTROLNET = "controlnet"
KIND_MIX = "mix"
