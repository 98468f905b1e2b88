"""The reference checks' cases, k3batch's side of each, and their golden files.

`scripts/check_reference*.py` run ai-forever's reference code (from a checkout: imported,
never copied) beside k3batch on tiny weights built from fixed seeds. With `--record DIR`
each script writes, per case, `DIR/<case>.npz`: the reference's inputs (pictures, masks,
latents), the noise and intermediate arrays it captures where they are small, and its
outputs; and `DIR/<case>.json`: the reference repository and commit, the script, the case's
settings, torch's version and a summary of the tiny weights the case used.
`tests/test_goldens.py` runs k3batch's side of every case against those files on every run,
with no reference checkout. Each case's settings and k3batch's side are defined here once,
for the scripts and the test alike.

The weights' summary (`weights_summary`) covers what the outputs depend on: every tensor
(name, dtype, shape, values) and the tiny tokenizer's vocabulary, not the files' bytes,
which also carry library versions (transformers writes its own into config.json) and would
change with an upgrade that leaves the weights as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable

import numpy as np

# Regenerates every golden from the reference checkouts (docs/testing.md says how to get
# them); the test's failure messages name it.
RECORD_COMMAND = "bash scripts/record_goldens.sh /tmp/refs"
REPOSITORIES = {
    "Kandinsky-3": "https://github.com/ai-forever/Kandinsky-3",
    "KandiSuperRes": "https://github.com/ai-forever/KandiSuperRes",
    "kandinsky3-diffusers": "https://github.com/ai-forever/kandinsky3-diffusers",
}


# --------------------------------------------------------------------------- golden files
def save(folder: str, case: str, arrays: dict, meta: dict) -> None:
    """Write `folder/<case>.npz` (compressed) and `folder/<case>.json`."""
    os.makedirs(folder, exist_ok=True)
    arrays = {k: np.ascontiguousarray(_numpy(v)) for k, v in arrays.items()}
    np.savez_compressed(os.path.join(folder, f"{case}.npz"), **arrays)
    meta = dict(
        meta, case=case, arrays={k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}
    )
    with open(os.path.join(folder, f"{case}.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def load(folder: str, case: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(os.path.join(folder, f"{case}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(folder, f"{case}.json")) as f:
        return arrays, json.load(f)


def cases(folder: str) -> list[str]:
    return sorted(n[: -len(".json")] for n in os.listdir(folder) if n.endswith(".json"))


def metadata(repo: str, checkout: str, script: str, settings: dict, weights: dict) -> dict:
    """The sidecar of a golden: where it came from and on what."""
    import torch

    commit = subprocess.run(
        ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return {
        "reference": {"repository": REPOSITORIES[repo], "commit": commit},
        "script": script,
        "settings": _jsonable(settings),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "weights": weights,
    }


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _jsonable(v):
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------- weights
# Tiny weights are the same on every build of one machine, but not bit for bit across CPUs:
# torch's CPU random fills (normal_, uniform_) round differently without AVX2 (its scalar
# loops: 1 ulp apart on most values), and every tiny builder draws through them. So a
# golden keeps the exact digest and a summary that tells a rebuilt set from a changed one:
# the tensors' names, dtypes and shapes (and the tokenizer's vocabulary) exactly, and four
# float64 sums over their values, which rounding moves by at most 6e-8 of their scale (one
# ulp of every value, all one way) and a changed builder (a tensor redrawn or rescaled) far
# more; a few single values moved by less than WEIGHTS_RTOL of the scale would pass.
WEIGHTS_RTOL = 1e-6


def weights_summary(named: Iterable[tuple[str, object]], extra: bytes = b"") -> dict:
    """{"sha256": of every (name, dtype, shape, bytes) and `extra`, "layout_sha256": of the
    names, dtypes, shapes and `extra`, "sums": [sum v, sum |v|, sum v^2, sum v * ramp]}
    (the ramp -1..1 over each tensor), over the tensors in name order."""
    exact, layout = hashlib.sha256(extra), hashlib.sha256(extra)
    sums = np.zeros(4)
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        head = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        exact.update(head)
        layout.update(head)
        if not t.numel():
            continue
        exact.update(t.reshape(-1).numpy().tobytes())
        v = t.reshape(-1).double().numpy()
        ramp = np.linspace(-1.0, 1.0, v.size)
        sums += [v.sum(), np.abs(v).sum(), (v * v).sum(), (v * ramp).sum()]
    return {"sha256": exact.hexdigest(), "layout_sha256": layout.hexdigest(), "sums": sums.tolist()}


def weights_differ(recorded: dict, now: dict) -> str | None:
    """Why `now` (a `weights_summary`) is not the set `recorded` was; None when it is, bit
    for bit or within float rounding."""
    if now["sha256"] == recorded["sha256"]:
        return None
    if now["layout_sha256"] != recorded["layout_sha256"]:
        return "other tensor names, dtypes or shapes, or another tokenizer vocabulary"
    _, abs_sum, sq_sum, _ = recorded["sums"]
    scales = (abs_sum, abs_sum, sq_sum, abs_sum)
    names = ("sum", "sum |v|", "sum v^2", "ramp sum")
    for what, a, b, scale in zip(names, recorded["sums"], now["sums"], scales, strict=True):
        if abs(a - b) > WEIGHTS_RTOL * scale:
            return f"other values: {what} {b!r}, recorded {a!r}"
    return None


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}/")]
    raise TypeError(f"{prefix}: not a tensor or a mapping of tensors ({type(obj).__name__})")


def file_tensors(root: str, files: Iterable[str]) -> tuple[list, bytes]:
    """(name, tensor) of every tensor in `files` (paths relative to `root`: torch.save
    files and safetensors; names prefixed by the path), and the vocabulary of a
    `tokenizer.json` among them (as bytes)."""
    import torch
    from safetensors.torch import load_file

    named, extra = [], b""
    for rel in sorted(files):
        path = os.path.join(root, rel)
        if os.path.basename(rel) == "tokenizer.json":
            with open(path) as f:
                extra += json.dumps(json.load(f)["model"]["vocab"]).encode()
            continue
        if rel.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, weights_only=True)
        named += _flatten(state, f"{rel}/")
    return named, extra


def file_weights(root: str, files: Iterable[str]) -> dict:
    return weights_summary(*file_tensors(root, files))


def rng_picture(h: int, w: int, seed: int) -> np.ndarray:
    """The checks' random pictures (uint8 HxWx3). The goldens store them: a numpy release may
    change the stream."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


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


# --------------------------------------------------------------------------- KandiSuperRes
# scripts/check_reference_sr.py: ai-forever/KandiSuperRes's DPM-Solver + MultiDiffusion x4 / x2
# on the tiny checkpoints (make_tiny_sr), windows set to k3batch's tiny-test ones or the real.
@dataclasses.dataclass(frozen=True)
class SRCase:
    name: str
    scale: int
    height: int
    width: int
    window: int
    stride: int
    subsample: int = 1  # the golden keeps every n-th pixel of a large output


SR_SEED = 13
SR_STEPS = 5
# The reference's view_batch_size: both sides run the same batch shapes (other shapes may
# round differently in CPU kernels, ~1e-6).
SR_TILES_PER_CALL = 15
SR_CASES = (
    SRCase("sr_x4_windows", 4, 14, 18, 32, 24),  # 56x72 canvas: 2x3 overlapping windows
    SRCase("sr_x4_one_window", 4, 8, 8, 32, 24),
    SRCase("sr_x2_odd_sides", 2, 21, 27, 32, 24),  # even canvas 44x56, resized to 42x54
    # The real windows: 1120x1048 canvas, 2x2 windows of 1024 every 800.
    SRCase("sr_x4_real_windows", 4, 280, 262, 1024, 800, subsample=16),
)


def sr_picture(case: SRCase) -> np.ndarray:
    return rng_picture(case.height, case.width, case.height * case.width)


def sr_side(path: str, case: SRCase, picture: np.ndarray) -> dict[str, np.ndarray]:
    """k3batch's `KandiSuperRes` on the case: the float canvas before the conversion to
    pixels (channels first) and the image, every `subsample`-th pixel."""
    from k3batch.model.superres.pipeline import KandiSuperRes
    from k3batch.model.superres.sr_unet import TINY_SR_UNET

    model = KandiSuperRes.from_pretrained(
        path,
        case.scale,
        "cpu",
        config=TINY_SR_UNET,
        window=case.window,
        stride=case.stride,
        max_tiles_per_call=SR_TILES_PER_CALL,
    )
    with canvas_recorded() as canvases:
        (image,) = model.upscale([picture], [SR_SEED], num_inference_steps=SR_STEPS)
    return {"canvas": canvases[0], "image": image}


class canvas_recorded:
    """Records the float canvases `superres.pipeline._to_uint8` turns into pixels (both SR
    models end there), passing them through unchanged."""

    def __enter__(self) -> list:
        from k3batch.model.superres import pipeline

        self.module, self.original, canvases = pipeline, pipeline._to_uint8, []

        def recorded(x, size):
            canvases.append(x.detach().cpu().numpy())
            return self.original(x, size)

        pipeline._to_uint8 = recorded
        return canvases

    def __exit__(self, *exc) -> None:
        self.module._to_uint8 = self.original


def subsampled(arrays: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """Every `step`-th pixel of images (HxWx3) and canvases (...xHxW)."""
    if step == 1:
        return arrays
    out = dict(arrays)
    out["image"] = arrays["image"][::step, ::step]
    out["canvas"] = arrays["canvas"][..., ::step, ::step]
    return out


# --------------------------------------------------------------------------- Flash x2
# scripts/check_reference_sr_flash.py: KandiSuperRes's Flash x2 (its four x0 steps, and with
# refine=True its tiled MoVQ and the Kandinsky 3 Flash refine) on make_tiny_sr_flash and the
# tiny Kandinsky 3 of make_tiny(layout="reference").
@dataclasses.dataclass(frozen=True)
class FlashCase:
    name: str
    height: int
    width: int
    refine: bool
    store_noise: bool = False  # the SR steps' draws are pixel-sized: the smallest case only
    subsample: int = 1  # the golden keeps every n-th pixel of a large image


FLASH_SEED = 21
FLASH_CASES = (
    FlashCase("sr_flash_32x32", 32, 32, False),
    FlashCase("sr_flash_40x70", 40, 70, False),  # sides rounded down to 32x64, resized back
    FlashCase("sr_flash_64x96", 64, 96, False),
    # Refine: one latent tile (32x32, 40x70); two of the real 352-every-264 tiles down
    # (1088x64: a 272x16 latent, tiles 272 and 8 latents tall, blended over 8) with the tiled
    # MoVQ (3 encode tiles, 3 decode tiles).
    FlashCase("sr_flash_refine_32x32", 32, 32, True, store_noise=True),
    FlashCase("sr_flash_refine_40x70", 40, 70, True),
    FlashCase("sr_flash_refine_1088x64", 1088, 64, True, subsample=4),
    FlashCase("sr_flash_refine_64x1088", 64, 1088, True, subsample=4),
)


def flash_picture(case: FlashCase) -> np.ndarray:
    return rng_picture(case.height, case.width, case.height * case.width)


def flash_files(case: FlashCase) -> dict[str, list[str]]:
    """{"sr": files of the make_tiny_sr_flash folder, "k3": of the reference-layout tiny set}
    the case reads."""
    from k3batch.model.kandinsky3 import layout, members
    from k3batch.model.superres.flash import CONTEXT_FILE, CONTEXT_MASK_FILE, SR_FILE

    if not case.refine:
        return {"sr": [SR_FILE], "k3": []}
    w = layout.REFERENCE_WEIGHTS_DIR
    flash = members.MEMBERS["kandinsky3-flash"].reference_file
    return {
        "sr": [SR_FILE, CONTEXT_FILE, CONTEXT_MASK_FILE],
        "k3": [f"{w}/{flash}", f"{w}/{layout.REFERENCE_MOVQ_FILE}"],
    }


def flash_weights(sr_folder: str, k3_root: str, case: FlashCase) -> dict:
    files = flash_files(case)
    sr, sr_extra = file_tensors(sr_folder, files["sr"])
    k3, k3_extra = file_tensors(k3_root, files["k3"])
    return weights_summary(sr + k3, sr_extra + k3_extra)


def flash_side(model, case: FlashCase, picture: np.ndarray, latent=None, eps=None) -> dict:
    """k3batch's `KandiSuperResFlash` on the case (`model`'s parts, `refine` the case's),
    recording on the way past (values unchanged): every noise draw, the MoVQ latent, each
    refine tile's UNet input x_t and epsilon, the refined latent; and the image.

    `latent`: start the refine from this MoVQ latent instead of k3batch's own encode.
    `eps(x, t, k3batch_eps)`: the epsilon the refine uses in place of the Flash UNet's."""
    from k3batch.model.superres.flash import KandiSuperResFlash

    m = KandiSuperResFlash(
        model.unet,
        model.refiner,
        model.movq,
        model.context,
        model.context_mask,
        refine=case.refine,
    )
    rec: dict = {"noise": [], "eps": []}
    noise, encode, refine_tiles, own_eps = m._noise, m.encode, m.refine_tiles, m._eps

    def rec_noise(row, shape):
        x = noise(row, shape)
        rec["noise"].append(x.clone())
        return x

    def rec_encode(x):
        rec["latent"] = z = encode(x) if latent is None else latent.clone()
        return z.clone()

    def rec_refine_tiles(rows, latents):
        rec["refined"] = out = refine_tiles(rows, latents)
        return [z.clone() for z in out]

    def rec_eps(x, t):
        e = own_eps(x, t) if eps is None else eps(x, t, own_eps)
        rec["eps"] += [(x[k : k + 1].clone(), e[k : k + 1].clone()) for k in range(len(x))]
        return e

    m._noise, m.encode, m.refine_tiles, m._eps = rec_noise, rec_encode, rec_refine_tiles, rec_eps
    (rec["image"],) = m.upscale([picture], [FLASH_SEED])
    return rec


def flash_arrays(rec: dict, case: FlashCase) -> dict[str, np.ndarray]:
    """What a Flash golden keeps of `flash_side`'s (or the reference's) record."""
    out = {"image": _numpy(rec["image"])[:: case.subsample, :: case.subsample]}
    if case.refine:
        out["latent"] = _numpy(rec["latent"])
        out["refined"] = _numpy(
            rec["refined"][0] if isinstance(rec["refined"], list) else rec["refined"]
        )
        if case.store_noise:
            out.update({f"noise_{i}": _numpy(x) for i, x in enumerate(rec["noise"])})
    return out


# --------------------------------------------------------------------------- ControlNet
# scripts/check_reference_controlnet.py: the fork's UNetKandi3Controlnet (ai-forever/
# kandinsky3-diffusers) loaded with a tiny random k3batch ControlNet's published-layout file.
CONTROLNET_CASE = "controlnet_residuals"


def controlnet_config() -> dict:
    """A tiny ControlNet of four levels and three skips, like the real one."""
    from k3batch.testing.tiny_parts import TINY_UNET

    config = dict(TINY_UNET, block_out_channels=(32, 32, 64, 64))
    config.pop("encoder_hid_dim")
    return config


def controlnet_model():
    """The tiny ControlNet: every parameter random (seed 0, x0.2), its zero convs too, so
    the residuals are not zero."""
    import torch

    from k3batch.model.adapters import controlnet as cn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cn.Kandinsky3ControlNet(**controlnet_config())
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval()


def controlnet_inputs() -> dict[str, np.ndarray]:
    """Latents, timestep, context, its 0/1 mask and a uint8 hint picture (the golden keeps
    them all)."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, controlnet_config()["cross_attention_dim"], generator=g)
    hint = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    t = np.array([500.0, 500.0], dtype=np.float32)
    return {"x": x.numpy(), "t": t, "context": ctx.numpy(), "mask": mask, "hint": hint.numpy()}


def controlnet_hint(inputs: dict):
    import torch

    return torch.from_numpy(inputs["hint"]).float() / 127.5 - 1


def controlnet_side(model, inputs: dict) -> dict[str, np.ndarray]:
    """k3batch's ControlNet residuals, one per skip."""
    import torch

    mask = torch.from_numpy(inputs["mask"]).float()
    additive = ((1 - mask) * -10000.0).unsqueeze(1)
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["t"])[:1],
            torch.from_numpy(inputs["context"]),
            additive,
            controlnet_hint(inputs),
        )
    return {f"residual_{i}": r.numpy() for i, r in enumerate(out)}


# --------------------------------------------------------------------------- IP-Adapter
# scripts/check_reference_ip_adapter.py: the fork's UNetKandi3IpAdapter at the tiny sizes with
# the tiny base UNet and the tiny adapter file, one UNet call at several image weights.
IP_ADAPTER_CASE = "ip_adapter_unet"
IP_SCALES = (0.0, 0.5, 1.0, 2.0)


def ip_base_unet():
    """The tiny base UNet the check loads both adapters onto (seed 0, zero weights woken)."""
    import torch
    from diffusers import Kandinsky3UNet

    from k3batch.testing.tiny_parts import TINY_UNET, _wake_zero_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = Kandinsky3UNet(in_channels=4, **TINY_UNET).eval()
    _wake_zero_weights(base, 1)
    return base


def ip_adapter_file(folder: str, base) -> str:
    import torch

    from k3batch.testing.tiny_ip_adapter import make_tiny_ip_adapter

    with torch.random.fork_rng(devices=[]):
        return make_tiny_ip_adapter(folder, base)


def ip_weights(base, adapter_file: str) -> dict:
    from safetensors.torch import load_file

    named = [(f"unet/{k}", v) for k, v in base.state_dict().items()]
    return weights_summary(
        named + [(f"adapter/{k}", v) for k, v in load_file(adapter_file).items()]
    )


def ip_inputs() -> dict[str, np.ndarray]:
    import torch

    from k3batch.testing.tiny_ip_adapter import TINY_IMAGE_EMBED_DIM
    from k3batch.testing.tiny_parts import TINY_UNET

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 6, TINY_UNET["encoder_hid_dim"], generator=g)
    emb = torch.randn(2, TINY_IMAGE_EMBED_DIM, generator=g)
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, 4:] = 0
    t = np.array([999, 421], dtype=np.int64)
    return {
        "x": x.numpy(),
        "t": t,
        "context": ctx.numpy(),
        "mask": mask,
        "image_embeds": emb.numpy(),
    }


def ip_side(base, adapter_file: str, inputs: dict) -> dict[str, np.ndarray]:
    """The base UNet with k3batch's adapter (`ip_adapter.load`) at each of `IP_SCALES`, and
    without it ("plain")."""
    import torch

    from k3batch.model.adapters import ip_adapter

    adapter = ip_adapter.load(base, adapter_file)
    x, t, ctx, mask, emb = (
        torch.from_numpy(inputs[k]) for k in ("x", "t", "context", "mask", "image_embeds")
    )
    out = {}
    with torch.no_grad():
        out["plain"] = base(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        for i, scale in enumerate(IP_SCALES):
            with adapter.conditioned(emb, torch.full((2,), scale)):
                out[f"scale_{i}"] = base(
                    x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask
                ).sample
    return {k: v.numpy() for k, v in out.items()}
