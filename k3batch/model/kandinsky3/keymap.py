"""State-dict key mapping between the reference layout (ai-forever/Kandinsky-3 modules) and
diffusers' `Kandinsky3UNet` / `VQModel`, in both directions.

Derived from the module trees of `kandinsky3/model/unet.py`, `kandinsky3/movq.py` and
diffusers' `unet_kandinsky3.py`, `autoencoders/vae.py` (the UNet rules agree with diffusers'
`scripts/convert_kandinsky3_unet.py`). Tensors keep their values; only MoVQ attention
weights change shape (1x1 convolutions in the reference, linear layers in diffusers).
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- UNet
_UNET_TOP = [
    ("to_time_embed.1.", "time_embedding.linear_1."),
    ("to_time_embed.3.", "time_embedding.linear_2."),
    ("feature_pooling.", "add_time_condition."),
    ("in_layer.", "conv_in."),
    ("out_layer.0.", "conv_norm_out."),
    ("out_layer.2.", "conv_out."),
    ("down_samples.", "down_blocks."),
    ("up_samples.", "up_blocks."),
]
_ATTN_NAMES = [
    (".to_query.", ".to_q."),
    (".to_key.", ".to_k."),
    (".to_value.", ".to_v."),
    (".output_layer.", ".to_out.0."),
]


def _swap_prefix(key: str, pairs, reverse: bool) -> str:
    for ref, diff in pairs:
        src, dst = (diff, ref) if reverse else (ref, diff)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def unet_to_diffusers(key: str) -> str:
    """Reference UNet key -> Kandinsky3UNet key."""
    key = _swap_prefix(key, _UNET_TOP, reverse=False)
    key = key.replace(".self_attention_block.", ".attentions.0.")

    def block(m: re.Match) -> str:
        i, part = int(m.group(1)), m.group(2)
        return {"0": f".resnets_in.{i}.", "1": f".attentions.{i + 1}.", "2": f".resnets_out.{i}."}[
            part
        ]

    key = re.sub(r"\.resnet_attn_blocks\.(\d+)\.([012])\.", block, key)
    for ref, diff in _ATTN_NAMES:
        key = key.replace(ref, diff)
    return key


def unet_to_reference(key: str) -> str:
    """Kandinsky3UNet key -> reference UNet key (the inverse of `unet_to_diffusers`)."""
    if key.startswith("encoder_hid_proj."):
        raise KeyError(f"{key} is the text projection: it lives in projection*.pt")
    key = _swap_prefix(key, _UNET_TOP, reverse=True)

    def attention(m: re.Match) -> str:
        j = int(m.group(1))
        return ".self_attention_block." if j == 0 else f".resnet_attn_blocks.{j - 1}.1."

    key = re.sub(r"\.attentions\.(\d+)\.", attention, key)
    key = re.sub(r"\.resnets_in\.(\d+)\.", r".resnet_attn_blocks.\1.0.", key)
    key = re.sub(r"\.resnets_out\.(\d+)\.", r".resnet_attn_blocks.\1.2.", key)
    for ref, diff in _ATTN_NAMES:
        key = key.replace(diff, ref)
    return key


# Text projection: reference `nn.Sequential(Linear, LayerNorm)` in projection*.pt.
PROJECTION_TO_DIFFUSERS = {
    "0.weight": "encoder_hid_proj.projection_linear.weight",
    "1.weight": "encoder_hid_proj.projection_norm.weight",
    "1.bias": "encoder_hid_proj.projection_norm.bias",
}
PROJECTION_TO_REFERENCE = {v: k for k, v in PROJECTION_TO_DIFFUSERS.items()}

# ---------------------------------------------------------------- MoVQ
_MOVQ_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MOVQ_ATTN_REV = {v: k for k, v in _MOVQ_ATTN.items()}
_MID = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}
_MID_REV = {v: k for k, v in _MID.items()}


def _movq_inner(rest: str, part: str, decoder: bool, reverse: bool) -> str:
    """Names inside one resnet ('block') or attention ('attn') module."""
    if part == "attn":
        if not reverse:
            m = re.match(r"(q|k|v|proj_out)\.(.+)", rest)
            if m:
                return f"{_MOVQ_ATTN[m.group(1)]}.{m.group(2)}"
            if decoder:  # SpatialNorm: norm_layer, conv_y, conv_b
                return rest.replace("norm.", "spatial_norm.", 1)
            return rest.replace("norm.norm_layer.", "group_norm.", 1)
        m = re.match(r"(to_q|to_k|to_v|to_out\.0)\.(.+)", rest)
        if m:
            return f"{_MOVQ_ATTN_REV[m.group(1)]}.{m.group(2)}"
        if decoder:
            return rest.replace("spatial_norm.", "norm.", 1)
        return rest.replace("group_norm.", "norm.norm_layer.", 1)
    # resnet
    if not reverse:
        rest = rest.replace("nin_shortcut.", "conv_shortcut.")
        if not decoder:  # encoder resnets use plain GroupNorm in diffusers
            rest = re.sub(r"^(norm[12])\.norm_layer\.", r"\1.", rest)
        return rest
    rest = rest.replace("conv_shortcut.", "nin_shortcut.")
    if not decoder:
        rest = re.sub(r"^(norm[12])\.", r"\1.norm_layer.", rest)
    return rest


def movq_to_diffusers(key: str, num_levels: int) -> str:
    """Reference MoVQ key -> VQModel key (`num_levels` = len(ch_mult))."""
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key  # quant_conv, post_quant_conv
    side, rest = m.groups()
    dec = side == "decoder"
    if rest.startswith("norm_out."):
        tail = rest[len("norm_out.") :]
        return f"{side}.conv_norm_out.{tail if dec else tail.replace('norm_layer.', '', 1)}"
    m = re.match(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
    if m:
        part = "attn" if m.group(1) == "attn_1" else "block"
        inner = _movq_inner(m.group(2), part, dec, reverse=False)
        return f"{side}.mid_block.{_MID[m.group(1)]}.{inner}"
    m = re.match(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest)
    if m:
        kind, level, part, j, tail = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        group = "resnets" if part == "block" else "attentions"
        inner = _movq_inner(tail, part, dec, reverse=False)
        return f"{side}.{kind}_blocks.{level}.{group}.{j}.{inner}"
    m = re.match(r"down\.(\d+)\.downsample\.(.+)", rest)
    if m:
        return f"{side}.down_blocks.{m.group(1)}.downsamplers.0.{m.group(2)}"
    m = re.match(r"up\.(\d+)\.upsample\.(.+)", rest)
    if m:
        return f"{side}.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.{m.group(2)}"
    return key  # conv_in, conv_out


def movq_to_reference(key: str, num_levels: int) -> str | None:
    """VQModel key -> reference MoVQ key; None for the codebook the reference has not."""
    if key.startswith("quantize."):
        return None
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key
    side, rest = m.groups()
    dec = side == "decoder"
    if rest.startswith("conv_norm_out."):
        tail = rest[len("conv_norm_out.") :]
        return f"{side}.norm_out.{tail if dec else 'norm_layer.' + tail}"
    m = re.match(r"mid_block\.(resnets\.[01]|attentions\.0)\.(.+)", rest)
    if m:
        part = "attn" if m.group(1).startswith("attentions") else "block"
        inner = _movq_inner(m.group(2), part, dec, reverse=True)
        return f"{side}.mid.{_MID_REV[m.group(1)]}.{inner}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        kind, level, group, j, tail = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        part = "block" if group == "resnets" else "attn"
        inner = _movq_inner(tail, part, dec, reverse=True)
        return f"{side}.{kind}.{level}.{part}.{j}.{inner}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest)
    if m:
        return f"{side}.down.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    if m:
        return f"{side}.up.{num_levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    return key


def _is_movq_attention_weight(diffusers_key: str) -> bool:
    return bool(re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def movq_state_to_diffusers(state: dict, num_levels: int) -> dict:
    out = {}
    for key, value in state.items():
        new = movq_to_diffusers(key, num_levels)
        if _is_movq_attention_weight(new) and value.dim() == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    return out


def movq_state_to_reference(state: dict, num_levels: int) -> dict:
    out = {}
    for key, value in state.items():
        new = movq_to_reference(key, num_levels)
        if new is None:
            continue
        if _is_movq_attention_weight(key) and value.dim() == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv
        out[new] = value
    return out


def unet_state_to_diffusers(state: dict, projection: dict) -> dict:
    out = {unet_to_diffusers(k): v for k, v in state.items()}
    for k, v in projection.items():
        out[PROJECTION_TO_DIFFUSERS[k]] = v
    return out


def unet_state_to_reference(state: dict) -> tuple[dict, dict]:
    """(reference UNet state, reference projection state) from a Kandinsky3UNet state."""
    unet, projection = {}, {}
    for k, v in state.items():
        if k in PROJECTION_TO_REFERENCE:
            projection[PROJECTION_TO_REFERENCE[k]] = v
        else:
            unet[unet_to_reference(k)] = v
    return unet, projection
