"""Prompt tokenisation and text conditioning with the reference's semantics.

Kandinsky 3 (kandinsky3/condition_processors.py, condition_encoders.py) tokenises each prompt
to at most 128 tokens, right-pads, runs the T5 encoder with the attention mask, projects,
zeroes padded positions and cuts the context to the longest prompt + 1 (k3batch keeps
the full 128 positions; see `encode`). A negative prompt is
cut to the positive prompt's token count, ends with `</s>`, and reuses the positive prompt's
attention mask. The unconditional branch without a negative prompt is the learned
`null_embedding` at token 0.

This module does that for a batch of rows with different prompts. Each row keeps its own
token count `n`: the UNet's attention pooling divides by `n + 1` per row (see
`denoiser.RowLengthPooling`), so a row's result does not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKENS_LENGTH = 128

# How the unconditional branch is built when a row has no negative prompt.
UNCOND_NULL_EMBEDDING = "null_embedding"  # the reference: learned vector at token 0
UNCOND_ZEROS = "zeros"  # diffusers' Kandinsky3Pipeline: projected zero embeddings
UNCOND_NONE = "none"  # no guidance (Flash): the unconditional branch is not run


@dataclass
class Tokens:
    input_ids: torch.Tensor  # [B, 128] long
    attention_mask: torch.Tensor  # [B, 128] long
    negative_input_ids: torch.Tensor  # [B, 128] long (rows without negative prompt: unused)
    has_negative: list[bool]
    lengths: torch.Tensor  # [B] long: real tokens of the positive prompt (with </s>)


def tokenize(tokenizer, prompts: list[str], negative_prompts: list[str | None]) -> Tokens:
    """Tokenise rows exactly as the reference processor does, one row at a time."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, masks, neg_ids, has_neg, lengths = [], [], [], [], []
    for prompt, negative in zip(prompts, negative_prompts, strict=True):
        enc = tokenizer(prompt, max_length=TOKENS_LENGTH, truncation=True)["input_ids"]
        n = len(enc)
        ids.append(enc + [pad] * (TOKENS_LENGTH - n))
        masks.append([1] * n + [0] * (TOKENS_LENGTH - n))
        lengths.append(n)
        if negative:
            neg = tokenizer(negative, max_length=TOKENS_LENGTH, truncation=True)["input_ids"][:n]
            neg[-1] = eos
            neg_ids.append(neg + [pad] * (TOKENS_LENGTH - len(neg)))
            has_neg.append(True)
        else:
            neg_ids.append([pad] * TOKENS_LENGTH)
            has_neg.append(False)
    return Tokens(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(masks, dtype=torch.long),
        negative_input_ids=torch.tensor(neg_ids, dtype=torch.long),
        has_negative=has_neg,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )


@dataclass
class Conditioning:
    """Cond and uncond contexts for a batch, 128 positions each."""

    context: torch.Tensor  # [B, L, C]
    context_mask: torch.Tensor  # [B, L] long
    uncond_context: torch.Tensor | None  # [B, L, C]; None without guidance (Flash)
    uncond_mask: torch.Tensor | None  # [B, L] long
    pool_lengths: torch.Tensor  # [B] float: n + 1, the reference's context length per row


@dataclass
class Hidden:
    """T5 outputs for a batch: positive rows first, then the rows' negative prompts."""

    states: torch.Tensor  # [B + negatives, 128, d_model]
    mask: torch.Tensor  # [B + negatives, 128] long
    neg_rows: list[int]  # row index of each negative prompt, in order


@torch.no_grad()
def run_encoder(tokens: Tokens, text_encoder, with_negatives: bool = True) -> Hidden:
    """T5 on positive and negative prompts in one pass (negatives only when guided)."""
    device = text_encoder.device
    neg_rows = [i for i, has in enumerate(tokens.has_negative) if has] if with_negatives else []
    ids = torch.cat([tokens.input_ids, tokens.negative_input_ids[neg_rows]])
    # The reference encodes a negative prompt with the positive prompt's mask.
    mask = torch.cat([tokens.attention_mask, tokens.attention_mask[neg_rows]])
    states = text_encoder(
        input_ids=ids.to(device), attention_mask=mask.to(device)
    ).last_hidden_state
    return Hidden(states=states, mask=mask, neg_rows=neg_rows)


@torch.no_grad()
def project(
    hidden: Hidden,
    lengths: torch.Tensor,
    projection: torch.nn.Module,
    uncond: str | None,
    null_embedding: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> Conditioning:
    """One UNet's context from shared T5 outputs: project, zero padding, build both branches.

    `lengths`: each row's token count n (`Tokens.lengths`). `uncond=None` builds the
    conditional branch only (Flash: no guidance).
    """
    b = lengths.shape[0]
    proj_param = next(projection.parameters())
    states = hidden.states if uncond is not None else hidden.states[:b]
    context = projection(states.to(proj_param.device, proj_param.dtype))
    mask = hidden.mask[: context.shape[0]].to(context.device)
    # Zero padded positions. The reference then cuts the context to the longest prompt + 1;
    # k3batch keeps all 128 positions: masked keys add exactly nothing, and a fixed length
    # keeps a row's floating-point result independent of its batch-mates' prompt lengths.
    context = context * mask.unsqueeze(-1).to(context.dtype)

    cond, cond_mask = context[:b], mask[:b]
    pool_lengths = (lengths + 1).to(device=cond.device, dtype=torch.float32)
    if uncond is None:
        return Conditioning(cond.to(out_dtype), cond_mask, None, None, pool_lengths)
    uncond_ctx, uncond_mask = _uncond_branch(
        cond, cond_mask, lengths, uncond, null_embedding, projection
    )
    for j, i in enumerate(hidden.neg_rows):
        uncond_ctx[i] = context[b + j]
        uncond_mask[i] = mask[b + j]
    return Conditioning(
        context=cond.to(out_dtype),
        context_mask=cond_mask,
        uncond_context=uncond_ctx.to(out_dtype),
        uncond_mask=uncond_mask,
        pool_lengths=pool_lengths,
    )


@torch.no_grad()
def encode(
    tokens: Tokens,
    text_encoder,
    projection: torch.nn.Module,
    uncond: str | None,
    null_embedding: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> Conditioning:
    """`run_encoder` then `project`, for one UNet."""
    hidden = run_encoder(tokens, text_encoder, with_negatives=uncond is not None)
    return project(hidden, tokens.lengths, projection, uncond, null_embedding, out_dtype)


@dataclass
class PromptEmbedding:
    """One row's T5 output at its n real token positions: all the UNet side needs of it.

    Padded positions never reach the UNet (the projected context is zeroed there), so the n
    positions rebuild the row's context exactly. A negative prompt is encoded with the
    positive prompt's mask, so it has n positions too. This is what the text encoder pool
    hands to the generation actors (`to_bytes` / `from_bytes`).
    """

    states: torch.Tensor  # [n, d_model], the encoder's dtype, CPU
    negative: torch.Tensor | None = None  # [n, d_model]; None without a negative prompt

    @property
    def length(self) -> int:
        return self.states.shape[0]


def row_embeddings(hidden: Hidden, lengths: torch.Tensor) -> list[PromptEmbedding]:
    """Split a batch's T5 outputs into per-row embeddings (on CPU)."""
    b = lengths.shape[0]
    states = hidden.states.cpu()
    ns = lengths.tolist()
    rows = [PromptEmbedding(states[i, : ns[i]].clone()) for i in range(b)]
    for j, i in enumerate(hidden.neg_rows):
        rows[i].negative = states[b + j, : ns[i]].clone()
    return rows


def from_embeddings(
    rows: list[PromptEmbedding], with_negatives: bool = True
) -> tuple[torch.Tensor, Hidden]:
    """(lengths, Hidden) of per-row embeddings, as `run_encoder` would give for the batch.

    Positions past a row's n are zeros instead of T5's padding outputs; `project` zeroes
    them either way.
    """
    neg_rows = [i for i, r in enumerate(rows) if r.negative is not None] if with_negatives else []
    parts = [r.states for r in rows] + [rows[i].negative for i in neg_rows]
    first = rows[0].states
    states = torch.zeros(len(parts), TOKENS_LENGTH, first.shape[1], dtype=first.dtype)
    mask = torch.zeros(len(parts), TOKENS_LENGTH, dtype=torch.long)
    for k, part in enumerate(parts):
        states[k, : part.shape[0]] = part
        mask[k, : part.shape[0]] = 1
    lengths = torch.tensor([r.length for r in rows], dtype=torch.long)
    return lengths, Hidden(states=states, mask=mask, neg_rows=neg_rows)


def to_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any dtype, bfloat16 included: numpy has none)."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[length, d] tensor of `dtype` from `to_bytes` output."""
    return torch.frombuffer(bytearray(data), dtype=dtype).view(length, -1)


def _uncond_branch(cond, cond_mask, lengths, uncond, null_embedding, projection):
    ctx = torch.zeros_like(cond)
    mask = torch.zeros_like(cond_mask)
    if uncond == UNCOND_NULL_EMBEDDING:
        ctx[:, 0] = null_embedding.to(ctx.device, ctx.dtype)
        mask[:, 0] = 1
    elif uncond == UNCOND_ZEROS:
        # diffusers feeds zero encoder states with an all-zero mask: every position becomes
        # projection(0) and attention is uniform over them. Filling each row's own n + 1
        # positions and attending to exactly those gives the same values, independent of
        # the context length.
        weight = projection.projection_linear.weight
        zeros = torch.zeros(1, 1, weight.shape[1], device=weight.device, dtype=weight.dtype)
        filler = projection(zeros)
        for i, n in enumerate(lengths.tolist()):
            ctx[i, : n + 1] = filler[0, 0].to(ctx.dtype)
            mask[i, : n + 1] = 1
    else:
        raise ValueError(f"unknown unconditional branch {uncond!r}")
    return ctx, mask
