"""Run the reference implementation's own pipelines against k3batch on the tiny family.

Not part of the test suite: it needs a checkout of ai-forever/Kandinsky-3 and two packages
the project does not depend on (`pip install einops scikit-image`). It imports the reference's
modules from the checkout (nothing is copied), builds the tiny family in the reference layout
with `make_tiny`, loads those weights into the reference's own UNet, MoVQ and text encoder,
runs its text-to-image, Flash and inpainting pipelines on CPU with a seed, and runs k3batch
on the same files and seeds.

    python scripts/check_reference.py /path/to/Kandinsky-3

The reference imports torchvision only for ToTensor/ToPILImage and omegaconf only for
training configs; a CPU-only environment without them gets minimal stand-ins for those two
(ToTensor: uint8 HWC -> float CHW / 255, other arrays as they are; ToPILImage: x255, to bytes).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types

import diffusers  # noqa: F401 - before the stand-ins: these probe for torchvision on import
import numpy as np
import torch
from PIL import Image
from transformers import T5EncoderModel

from k3batch import images as kimg
from k3batch.model.kandinsky3 import loading  # noqa: F401
from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_parts import TINY_MOVQ, TINY_UNET

PROMPT = "a blue robot in the rain, oil painting"


def _stand_ins() -> None:
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        tv, tvt = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

        class ToTensor:
            def __call__(self, pic):
                if isinstance(pic, np.ndarray):
                    pic = pic[:, :, None] if pic.ndim == 2 else pic
                    t = torch.from_numpy(pic.transpose((2, 0, 1))).contiguous()
                    return t.float().div(255) if t.dtype == torch.uint8 else t
                t = torch.from_numpy(np.array(pic, np.uint8)).permute(2, 0, 1).contiguous()
                return t.float().div(255)

        class ToPILImage:
            def __call__(self, pic):
                return Image.fromarray(pic.mul(255).byte().permute(1, 2, 0).numpy(), "RGB")

        tvt.ToTensor, tvt.ToPILImage = ToTensor, ToPILImage
        tv.transforms = tvt
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt})
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        sys.modules["omegaconf"] = types.SimpleNamespace(OmegaConf=None)


def _reference(checkout: str):
    """The reference's modules, imported without its package __init__ (which downloads)."""
    _stand_ins()
    pkg = types.ModuleType("kandinsky3")
    pkg.__path__ = [f"{checkout}/kandinsky3"]
    sys.modules["kandinsky3"] = pkg
    names = ["model.unet", "movq", "condition_encoders", "condition_processors"]
    names += ["t2i_pipeline", "inpainting_pipeline"]
    return {n: importlib.import_module(f"kandinsky3.{n}") for n in names}


def tiny_movq_config() -> dict:
    """The reference MoVQ's constructor arguments at k3batch's tiny MoVQ widths (the
    Kandinsky 3 reference's and KandiSuperRes's MoVQ take the same ones)."""

    levels = len(TINY_MOVQ["block_out_channels"])
    ch = TINY_MOVQ["block_out_channels"][0]
    return dict(
        double_z=False,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=ch,
        ch_mult=[c // ch for c in TINY_MOVQ["block_out_channels"]],
        num_res_blocks=TINY_MOVQ["layers_per_block"],
        attn_resolutions=[256 // 2 ** (levels - 1)],
        dropout=0.0,
    )


def _diff(ref, ours) -> str:
    d = np.abs(np.asarray(ref).astype(int) - np.asarray(ours).astype(int))
    return f"max |diff| {d.max()} grey levels, {(d > 0).sum()} of {d.size} bytes differ"


def main(checkout: str) -> None:
    ref = _reference(checkout)
    root = make_tiny(tempfile.mkdtemp(prefix="k3-ref-check-") + "/tiny", layout="reference")
    w = f"{root}/weights"
    mc = TINY_UNET["block_out_channels"][0]

    def unet(file, channels):
        u = (
            ref["model.unet"]
            .UNet(
                model_channels=mc,
                init_channels=mc // 2,
                num_channels=channels,
                time_embed_dim=TINY_UNET["time_embedding_dim"],
                context_dim=TINY_UNET["cross_attention_dim"],
                groups=TINY_UNET["groups"],
                head_dim=TINY_UNET["attention_head_dim"],
                dim_mult=tuple(c // mc for c in TINY_UNET["block_out_channels"]),
            )
            .eval()
        )
        ckpt = torch.load(f"{w}/{file}", weights_only=True)
        u.load_state_dict(ckpt["unet"])
        return u, ckpt["null_embedding"]

    def encoder(projection_file):
        enc_cls = ref["condition_encoders"].T5TextConditionEncoder
        enc = enc_cls.__new__(enc_cls)  # its __init__ passes 8/4-bit flags transformers 5 rejects
        torch.nn.Module.__init__(enc)
        enc.encoder = T5EncoderModel.from_pretrained(f"{w}/flan_ul2_encoder").encoder.eval()
        dim, ctx = TINY_UNET["encoder_hid_dim"], TINY_UNET["cross_attention_dim"]
        enc.projection = torch.nn.Sequential(
            torch.nn.Linear(dim, ctx, bias=False), torch.nn.LayerNorm(ctx)
        )
        state = torch.load(f"{w}/flan_ul2_encoder/{projection_file}", weights_only=True)
        enc.projection.load_state_dict(state)
        return enc.eval()

    movq = ref["movq"].MoVQ(tiny_movq_config()).eval()
    movq.load_state_dict(torch.load(f"{w}/movq.pt", weights_only=True))
    processor = ref["condition_processors"].T5TextConditionProcessor(128, f"{w}/flan_ul2_encoder")
    devices = dict.fromkeys(("unet", "text_encoder", "movq"), "cpu")
    dtypes = dict.fromkeys(("unet", "text_encoder", "movq"), torch.float32)
    T2I = ref["t2i_pipeline"].Kandinsky3T2IPipeline

    def ours(member, request):
        model = Kandinsky3.from_pretrained(root, member=member, dtype="float32", device="cpu")
        return model.generate([request])[0]

    u, null = unet("kandinsky3.pt", 4)
    pipe = T2I(devices, dtypes, u, null, processor, encoder("projection.pt"), movq, False)
    for negative in (None, "blurry, ugly"):
        torch.manual_seed(11)
        image = pipe(PROMPT, negative_text=negative, width=128, height=64, steps=5)[0]
        mine = ours("kandinsky3", Request(PROMPT, negative, 11, 128, 64, 5, 3.0))
        print(f"text-to-image, negative={negative!r}: {_diff(image, mine)}")

    u, null = unet("kandinsky3_flash.pt", 4)
    pipe = T2I(devices, dtypes, u, null, processor, encoder("projection_flash.pt"), movq, True)
    torch.manual_seed(5)
    image = pipe(PROMPT, width=64, height=64)[0]
    print(
        f"flash: {_diff(image, ours('kandinsky3-flash', Request(PROMPT, None, 5, 64, 64, 4, 0.0)))}"
    )

    u, null = unet("kandinsky3_inpainting.pt", 9)
    inpaint_cls = ref["inpainting_pipeline"].Kandinsky3InpaintingPipeline
    pipe = inpaint_cls(
        devices, dtypes, u, null, processor, encoder("projection_inpainting.pt"), movq
    )
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 100, 3), np.uint8))
    mask = np.zeros((150, 100), dtype=int)
    mask[20:90, 10:60] = 1
    torch.manual_seed(7)
    image = pipe(PROMPT, picture, mask, steps=5)[0]
    size = kimg.diffusion_size(*picture.size)
    request = Request(
        PROMPT,
        None,
        7,
        *size,
        5,
        4.0,
        image=kimg.prepare_image(picture, size),
        mask=kimg.prepare_mask(mask, size),
    )
    print(
        f"inpainting {picture.size} -> {image.size}: {_diff(image, ours('kandinsky3-inpaint', request))}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
