"""Load the Kandinsky 3 components from either weight layout (see `family`).

diffusers layout: `from_pretrained(device_map=device)` per component. Reference layout: the
UNet and MoVQ pickles are read with `torch.load(weights_only=True, mmap=True)` (tensors only,
no code runs), renamed by `keymap`, cast tensor by tensor onto the target device and dtype,
and assigned into models built on the meta device; T5 and its tokenizer load with
`from_pretrained(device_map=device)` from `weights/flan_ul2_encoder/`.

Weights go straight to their device: `from_pretrained(...).to(device)` would first build
each model in host RAM (the 8.7B T5 alone is 17-35 GB per actor, and 8 actors share a
node's RAM); the memory-mapped pickles are read through the page cache, never copied whole.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from diffusers import Kandinsky3UNet
from diffusers.configuration_utils import register_to_config
from torch import nn

from k3batch.model import hub
from k3batch.model.kandinsky3 import keymap
from k3batch.model.kandinsky3 import layout as files
from k3batch.model.loading import DTYPES, build, load_pickle, per_component, resolve_device
from k3batch.model.member import Member

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "movq")

# The reference hard-codes its architecture (kandinsky3/__init__.py); in diffusers' terms:
REFERENCE_UNET_CONFIG = dict(
    time_embedding_dim=1536,
    groups=32,
    attention_head_dim=64,
    layers_per_block=3,
    block_out_channels=(384, 768, 1536, 3072),
    cross_attention_dim=4096,
)
REFERENCE_MOVQ_CONFIG = dict(
    block_out_channels=[256, 512, 512, 1024],
    down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    norm_type="spatial",
    num_vq_embeddings=16384,
    vq_embed_dim=4,
)


class Kandinsky3InpaintUNet(Kandinsky3UNet):
    """`Kandinsky3UNet` with 9 input and 4 output channels (the inpainting UNet).

    diffusers' class ties out_channels to in_channels; the reference's inpainting UNet reads
    noisy latent + mask + masked-image latent (9) and predicts epsilon (4).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 9,
        out_channels: int = 4,
        time_embedding_dim: int = 1536,
        groups: int = 32,
        attention_head_dim: int = 64,
        layers_per_block: int = 3,
        block_out_channels: tuple[int, ...] = (384, 768, 1536, 3072),
        cross_attention_dim: int = 4096,
        encoder_hid_dim: int = 4096,
    ):
        super().__init__(
            in_channels=in_channels,
            time_embedding_dim=time_embedding_dim,
            groups=groups,
            attention_head_dim=attention_head_dim,
            layers_per_block=layers_per_block,
            block_out_channels=block_out_channels,
            cross_attention_dim=cross_attention_dim,
            encoder_hid_dim=encoder_hid_dim,
        )
        self.conv_out = nn.Conv2d(block_out_channels[0] // 2, out_channels, 3, padding=1)


def unet_class(member: Member):
    return Kandinsky3InpaintUNet if member.in_channels != 4 else Kandinsky3UNet


@dataclass
class Components:
    tokenizer: object  # None when loaded without the text encoder
    text_encoder: nn.Module | None  # None: prompt embeddings come from the text encoder pool
    movq: nn.Module
    unets: dict  # member name -> (unet, null_embedding or None)


def load(
    path: str,
    members: list[Member],
    *,
    layout: str = "auto",
    dtype: dict | str = "float32",
    device: dict | str = "auto",
    variant: str | None = None,
    text_encoder: bool = True,
) -> Components:
    """The members' UNets, the MoVQ and (unless `text_encoder=False`) T5 and its tokenizer."""
    layout = files.detect_layout(path, layout)
    dtypes = {c: DTYPES[per_component(dtype, c)] for c in COMPONENTS}
    devices = {c: resolve_device(per_component(device, c)) for c in COMPONENTS}
    if layout == files.LAYOUT_REFERENCE:
        return _load_reference(path, members, dtypes, devices, text_encoder)
    return _load_diffusers(path, members, dtypes, devices, variant, text_encoder)


def load_text(
    path: str,
    *,
    layout: str = "auto",
    dtype: dict | str = "float32",
    device: dict | str = "auto",
    variant: str | None = None,
):
    """(tokenizer, T5 encoder) alone, for the text encoder pool."""
    layout = files.detect_layout(path, layout)
    dtype = DTYPES[per_component(dtype, "text_encoder")]
    device = resolve_device(per_component(device, "text_encoder"))
    if layout == files.LAYOUT_REFERENCE:
        if hub.is_hub_id(path):
            path = reference_download(path, [])
        return _reference_text(_reference_root(path), dtype, device)
    return _diffusers_text(path, dtype, device, variant)


# ---------------------------------------------------------------- diffusers layout
def _diffusers_text(path, dtype, device, variant):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(
        path, subfolder="text_encoder", dtype=dtype, variant=variant, device_map=device
    )
    return tokenizer, text_encoder


def _load_diffusers(path, members, dtypes, devices, variant, with_text=True) -> Components:
    from diffusers import VQModel

    tokenizer = text_encoder = None
    if with_text:
        tokenizer, text_encoder = _diffusers_text(
            path, dtypes["text_encoder"], devices["text_encoder"], variant
        )
    movq = VQModel.from_pretrained(
        path,
        subfolder="movq",
        torch_dtype=dtypes["movq"],
        variant=variant,
        device_map=devices["movq"],
    )
    unets = {}
    for m in members:
        unet = unet_class(m).from_pretrained(
            path,
            subfolder=m.unet_folder,
            torch_dtype=dtypes["unet"],
            variant=variant,
            device_map=devices["unet"],
        )
        null = _diffusers_null_embedding(path, m.unet_folder)
        unets[m.name] = (unet, null)
    return Components(tokenizer, text_encoder, movq, unets)


def _diffusers_null_embedding(path: str, folder: str) -> torch.Tensor | None:
    """The learned unconditional embedding, if the checkpoint ships one (k3batch's layout)."""
    from safetensors.torch import load_file

    name = f"{folder}/{files.NULL_EMBEDDING_FILE}"
    if os.path.isdir(path):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            file = hf_hub_download(path, name)
        except EntryNotFoundError:
            return None
    return load_file(file)["null_embedding"]


# ---------------------------------------------------------------- reference layout
def reference_download(repo_id: str, members: list[Member], text: bool = True) -> str:
    """Only the files a job needs from a reference-layout Hugging Face repo.

    `text=False` skips the T5 weights (the text encoder pool has them) but keeps the
    members' projections, which the UNet side runs.
    """
    from huggingface_hub import snapshot_download

    w, t = files.REFERENCE_WEIGHTS_DIR, files.REFERENCE_TEXT_DIR
    patterns = [f"{w}/{files.REFERENCE_MOVQ_FILE}", f"{w}/{files.REFERENCE_CONFIG_FILE}"]
    if text:
        patterns.append(f"{w}/{t}/*")
    else:
        patterns += [f"{w}/{t}/{m.projection_file}" for m in members]
    patterns += [f"{w}/{m.reference_file}" for m in members]
    return snapshot_download(repo_id, allow_patterns=patterns)


def reference_unet(
    root: str,
    member: Member,
    text_dim: int | None = None,
    dtype=torch.float32,
    device="cpu",
):
    """(Kandinsky3UNet on `device` in `dtype`, null_embedding) from a reference-layout member."""
    ckpt = load_pickle(os.path.join(root, member.reference_file))
    projection = load_pickle(os.path.join(root, files.REFERENCE_TEXT_DIR, member.projection_file))
    state = keymap.unet_state_to_diffusers(ckpt["unet"], projection)
    config = _reference_unet_config(root, member, projection)
    null = ckpt.get("null_embedding")
    unet = build(unet_class(member), config, state, dtype, device)
    return unet, (null.float().clone() if null is not None else None)


def _reference_unet_config(root: str, member: Member, projection: dict) -> dict:
    config = {**REFERENCE_UNET_CONFIG, **files.read_reference_config(root).get("unet", {})}
    config["in_channels"] = member.in_channels
    config["encoder_hid_dim"] = projection["0.weight"].shape[1]
    return config


def unet_skeleton(path: str, member: Member, layout: str = "auto") -> nn.Module:
    """A local checkpoint's member UNet on the meta device: its parameter names and shapes
    without reading its weights (pre-flight checks of a LoRA against it)."""
    cls = unet_class(member)
    if files.detect_layout(path, layout) == files.LAYOUT_REFERENCE:
        root = _reference_root(path)
        # Memory-mapped: only the projection's header is read, for the text width.
        projection = load_pickle(
            os.path.join(root, files.REFERENCE_TEXT_DIR, member.projection_file)
        )
        config = _reference_unet_config(root, member, projection)
        with torch.device("meta"):
            return cls(**config)
    config = cls.load_config(path, subfolder=member.unet_folder)
    with torch.device("meta"):
        return cls.from_config(config)


def reference_movq(root: str, dtype=torch.float32, device="cpu"):
    from diffusers import VQModel

    config = {**REFERENCE_MOVQ_CONFIG, **files.read_reference_config(root).get("movq", {})}
    state = keymap.movq_state_to_diffusers(
        load_pickle(os.path.join(root, files.REFERENCE_MOVQ_FILE)),
        len(config["block_out_channels"]),
    )
    # The reference MoVQ has no codebook: k3batch decodes with force_not_quantize=True, as the
    # reference does (it never quantizes); zeros only make the diffusers model complete.
    state.setdefault(
        "quantize.embedding.weight",
        torch.zeros(config["num_vq_embeddings"], config["vq_embed_dim"]),
    )
    return build(VQModel, config, state, dtype, device)


def _reference_root(path: str) -> str:
    root = files.reference_root(path)
    if root is None:
        raise FileNotFoundError(f"{path} is not a reference-layout checkpoint (no weights/movq.pt)")
    return root


def _reference_text(root: str, dtype, device):
    from transformers import AutoTokenizer, T5EncoderModel

    text_dir = os.path.join(root, files.REFERENCE_TEXT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    # transformers reads pytorch_model*.bin with torch.load(weights_only=True) as well.
    text_encoder = T5EncoderModel.from_pretrained(text_dir, dtype=dtype, device_map=device)
    return tokenizer, text_encoder


def _load_reference(path, members, dtypes, devices, with_text=True) -> Components:
    if hub.is_hub_id(path):
        path = reference_download(path, members, text=with_text)
    root = _reference_root(path)
    tokenizer = text_encoder = None
    if with_text:
        tokenizer, text_encoder = _reference_text(
            root, dtypes["text_encoder"], devices["text_encoder"]
        )
    movq = reference_movq(root, dtypes["movq"], devices["movq"])
    unets = {}
    for m in members:
        unets[m.name] = reference_unet(root, m, dtype=dtypes["unet"], device=devices["unet"])
    return Components(tokenizer, text_encoder, movq, unets)


# Flan-UL2's encoder (8.72B parameters with its 32128-token embedding), the text
# encoder the reference loads (the UNet and MoVQ: REFERENCE_UNET_CONFIG, REFERENCE_MOVQ_CONFIG).
FULL_T5 = dict(
    d_model=4096,
    d_kv=256,
    d_ff=16384,
    num_layers=32,
    num_heads=16,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-silu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
FULL_T5_VOCAB = 32128


def full_architecture() -> tuple[dict, dict, object]:
    """(UNet kwargs, MoVQ kwargs, T5Config) of the real family: what the memory estimate counts
    and the GPU benchmarks build with random weights."""
    unet = {**REFERENCE_UNET_CONFIG, "encoder_hid_dim": FULL_T5["d_model"]}
    return unet, REFERENCE_MOVQ_CONFIG, t5_config(FULL_T5, FULL_T5_VOCAB)


def t5_config(sizes: dict, vocab_size: int):
    """A T5 encoder config of these sizes with the T5 tokenizer's special token ids."""
    from transformers import T5Config

    return T5Config(
        **sizes, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0
    )
