"""The family's shared T5 encoder on its own (the text encoder pool)."""

from __future__ import annotations

import torch

from k3batch.model import performance
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.model.kandinsky3 import text as textmod


class PromptEncoder:
    """The family's shared T5 encoder without UNets or MoVQ: per-row prompt embeddings.

    The text encoder pool runs it; `Kandinsky3.sample` reads its output from `Request.text`
    and computes what it would have computed with the encoder in the same actor.
    """

    def __init__(self, tokenizer, text_encoder, guided: bool):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        # Without guidance (Flash) negative prompts are never encoded, as in `sample`.
        self.guided = guided
        self.dtype = next(text_encoder.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        member: str = k3_members.BASE,
        layout: str = "auto",
        dtype: dict | str = "float32",
        device: dict | str = "auto",
        variant: str | None = None,
        attention: str = "sdpa",
        tf32: bool = True,
    ) -> PromptEncoder:
        from k3batch.model.kandinsky3 import loading

        tokenizer, text_encoder = loading.load_text(
            path, layout=layout, dtype=dtype, device=device, variant=variant
        )
        performance.set_text_attention(text_encoder, attention)
        if performance.runs_float32_on_cuda(text_encoder):
            performance.set_tf32(tf32)
        return cls(tokenizer, text_encoder, k3_members.MEMBERS[member].guided)

    @torch.no_grad()
    def embed(
        self, prompts: list[str], negative_prompts: list[str | None]
    ) -> list[textmod.PromptEmbedding]:
        negatives = [n if self.guided else None for n in negative_prompts]
        tokens = textmod.tokenize(self.tokenizer, prompts, negatives)
        hidden = textmod.run_encoder(tokens, self.text_encoder, self.guided)
        return textmod.row_embeddings(hidden, tokens.lengths)
