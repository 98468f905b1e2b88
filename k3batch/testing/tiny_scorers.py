"""Tiny random-weight scoring models, built offline: a CLIP (CLIPModel with a BPE tokenizer
trained here on the tiny corpus) and a ViT image classifier, each saved with
save_pretrained so transformers' Auto classes load them as they would the real ones."""

from __future__ import annotations

import os

from k3batch.testing.build_once import build_dir
from k3batch.testing.tiny_parts import TINY_SEED, corpus

IMAGE_SIZE = 32
CLASSIFIER_LABELS = ("normal", "nsfw")


def build_clip_tokenizer():
    """A CLIP BPE tokenizer (byte-level, `</w>` word ends, CLIP's normaliser and pre-tokeniser)
    trained on the tiny corpus; unknown text maps to `<|endoftext|>` as CLIP's does."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    # An empty CLIPTokenizer carries CLIP's text pipeline: train the BPE behind the same one.
    template = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = template.normalizer
    tok.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    # As CLIP's vocabulary: every byte both inside and at the end of a word, so no text is
    # unknown (an unknown piece would read as <|endoftext|>, where CLIP pools).
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (char, f"{char}</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_tiny_clip(path: str) -> str:
    """A tiny random CLIPModel with its processor (tokenizer + CLIPImageProcessor) at `path`,
    built once however many processes ask at the same time (`testing.build_once`)."""
    return build_dir(path, _write_clip, _is_saved)


def _is_saved(path: str) -> bool:
    # The folder only ever appears whole (`build_dir`), so its config means a complete model.
    return os.path.exists(os.path.join(path, "config.json"))


def _write_clip(path: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            **ids,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(TINY_SEED)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def make_tiny_classifier(path: str, labels: tuple[str, ...] = CLASSIFIER_LABELS) -> str:
    """A tiny random ViTForImageClassification over `labels` with its image processor, built
    once however many processes ask at the same time (`testing.build_once`)."""
    return build_dir(path, lambda tmp: _write_classifier(tmp, labels), _is_saved)


def _write_classifier(path: str, labels: tuple[str, ...]) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(TINY_SEED)
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def make_tiny_scorers(scores) -> None:
    """The tiny models a `scores:` config with `make_tiny` names: CLIP at `clip_model`, a
    classifier at each classifier's path whose labels include its `label`."""
    if scores.clip_model:
        make_tiny_clip(scores.clip_model)
    for c in scores.classifiers:
        labels = CLASSIFIER_LABELS if c.label in CLASSIFIER_LABELS else ("other", c.label)
        make_tiny_classifier(c.path, labels)
