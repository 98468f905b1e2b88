"""A tiny random-weight Mistral (the neural-chat-7b architecture) built offline.

For tests and demos of prompt beautification on CPU: the real vLLM engine loads it like any
Hugging Face checkpoint. Weights are random but seeded, so every machine builds the same
model; its answers are gibberish, which is all the mechanics need. head_dim is 32: vLLM's
CPU attention fails at generate time with 16.
"""

from __future__ import annotations

import json
import os

from k3batch.beautify.prompt import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, format_prompt
from k3batch.testing import tiny_parts
from k3batch.testing.build_once import build_dir

TINY_LLM_SEED = 20231123
MARKER = "k3batch_tiny_llm.json"
TINY_LLM_FORMAT = 1


def build_llm_tokenizer():
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens) with the special
    tokens of Mistral (<unk>, <s>, </s> as ids 0, 1, 2), BOS added like Mistral's, and the
    Kandinsky 3.1 chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*tiny_parts.corpus(), DEFAULT_SYSTEM_PROMPT, format_prompt("a red cat")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def build_llm(vocab_size: int):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(TINY_LLM_SEED)
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    return MistralForCausalLM(config).eval()


def is_tiny_llm(path: str) -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("format") == TINY_LLM_FORMAT


def make_tiny_llm(path: str, overwrite: bool = False) -> str:
    """Write the tiny Mistral checkpoint and tokenizer to `path`, once however many processes
    ask at the same time (`testing.build_once`)."""

    def write(tmp: str) -> None:
        tokenizer = build_llm_tokenizer()
        tokenizer.save_pretrained(tmp)
        build_llm(len(tokenizer)).save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:  # last: the set is complete
            json.dump({"format": TINY_LLM_FORMAT, "seed": TINY_LLM_SEED}, f)

    return build_dir(path, write, is_tiny_llm, overwrite=overwrite)
