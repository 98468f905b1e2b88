"""Run the reference implementation's own pipelines against k3batch on the tiny family.

Not part of the test suite: it needs a checkout of ai-forever/Kandinsky-3 and two packages
the project does not depend on (`pip install einops scikit-image`). It imports the reference's
modules from the checkout (nothing is copied), builds the tiny family in the reference layout
with `make_tiny`, loads those weights into the reference's own UNet, MoVQ and text encoder,
runs its text-to-image, Flash and inpainting pipelines on CPU with a seed, and runs k3batch
on the same files and seeds. The cases (`K3_CASES`) and k3batch's side of each are
`k3batch.testing.reference_goldens`'; besides the images it compares the first noise draw
and the final latent (MoVQ's input), recorded on the way past.

    python scripts/check_reference.py /path/to/Kandinsky-3 [--record tests/goldens]

`--record DIR` writes each case's golden files (the reference's inputs, first noise draw,
final latent and image, and a JSON of where they came from) for tests/test_goldens.py.

The reference imports torchvision only for ToTensor/ToPILImage and omegaconf only for
training configs; a CPU-only environment without them gets minimal stand-ins for those two
(ToTensor: uint8 HWC -> float CHW / 255, other arrays as they are; ToPILImage: x255, to bytes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types

import diffusers  # noqa: F401 - before the stand-ins: these probe for torchvision on import
import numpy as np
import torch
from PIL import Image
from transformers import T5EncoderModel

from k3batch.model.kandinsky3 import (
    loading,  # noqa: F401
    members,
)
from k3batch.model.kandinsky3.pipeline import Kandinsky3
from k3batch.testing import reference_goldens as golden
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_parts import TINY_MOVQ, TINY_UNET


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
    names = ["model.unet", "model.diffusion", "movq", "condition_encoders", "condition_processors"]
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


def _max_diff(a, b) -> str:
    """Of two float arrays or tensors (`b` against `a`): the largest difference, absolute and
    relative to `a`'s largest value."""
    a, b = (golden.to_numpy(v).astype(np.float64) for v in (a, b))
    d, top = np.abs(a - b).max(), np.abs(a).max()
    return f"max |diff| {d:.2e} (relative {d / top:.1e}, of values up to {top:.2f})"


def main(checkout: str, record: str | None = None) -> None:
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

    def pipeline(name):
        member = members.MEMBERS[name]
        u, null = unet(member.reference_file, member.in_channels)
        enc = encoder(member.projection_file)
        if name == "kandinsky3-inpaint":
            cls = ref["inpainting_pipeline"].Kandinsky3InpaintingPipeline
            return cls(devices, dtypes, u, null, processor, enc, movq)
        T2I = ref["t2i_pipeline"].Kandinsky3T2IPipeline
        return T2I(devices, dtypes, u, null, processor, enc, movq, name == "kandinsky3-flash")

    # Recorded on the way past, values unchanged: the first noise draw (p_sample_loop's
    # torch.randn, reproduced from the global generator's state at entry) and the final
    # latent (MoVQ's decode input).
    rec: dict = {}
    diffusion = ref["model.diffusion"].BaseDiffusion
    loop = diffusion.p_sample_loop

    def rec_loop(self, model_, shape, *args, **kwargs):
        g = torch.Generator().set_state(torch.get_rng_state())
        rec["noise"] = torch.randn(*shape, generator=g)
        return loop(self, model_, shape, *args, **kwargs)

    decode = movq.decode

    def rec_decode(z):
        rec["latent"] = z.clone()
        return decode(z)

    diffusion.p_sample_loop, movq.decode = rec_loop, rec_decode
    pipes, models = {}, {}
    try:
        for case in golden.K3_CASES:
            if case.member not in pipes:
                pipes[case.member] = pipeline(case.member)
                models[case.member] = Kandinsky3.from_pretrained(
                    root, member=case.member, dtype="float32", device="cpu"
                )
            inputs = golden.k3_inputs(case)
            torch.manual_seed(case.seed)
            if case.picture is None:
                kwargs = dict(negative_text=case.negative, width=case.width, height=case.height)
                if case.member != "kandinsky3-flash":  # Flash: its own four steps, unguided
                    kwargs.update(steps=case.steps, guidance_scale=case.guidance)
                image = pipes[case.member](golden.K3_PROMPT, **kwargs)[0]
            else:
                image = pipes[case.member](
                    golden.K3_PROMPT,
                    Image.fromarray(inputs["picture"]),
                    inputs["mask"].astype(int),
                    negative_text=case.negative,
                    steps=case.steps,
                    guidance_weight_text=case.guidance,
                )[0]
            theirs = {"noise": rec["noise"], "latent": rec["latent"], "image": np.asarray(image)}
            ours = golden.k3_side(models[case.member], case, inputs)
            same = np.array_equal(theirs["noise"].numpy(), ours["noise"])
            print(
                f"{case.name} {image.size}: first noise draw {'equal' if same else 'DIFFERS'}; "
                f"final latent {_max_diff(theirs['latent'], ours['latent'])}; "
                f"image {_diff(theirs['image'], ours['image'])}"
            )
            if record:
                weights = golden.file_weights(root, golden.k3_files(case))
                meta = golden.metadata(
                    "Kandinsky-3", checkout, "scripts/check_reference.py", case, weights
                )
                meta["settings"]["prompt"] = golden.K3_PROMPT
                golden.save(record, case.name, {**inputs, **theirs}, meta)
    finally:
        diffusion.p_sample_loop, movq.decode = loop, decode


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of ai-forever/Kandinsky-3")
    parser.add_argument("--record", metavar="DIR", help="write each case's golden files to DIR")
    args = parser.parse_args()
    main(args.checkout, args.record)
