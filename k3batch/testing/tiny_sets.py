"""The tiny sets that are not a model family's: `k3batch make-tiny` offers each as an option
next to the families' own (`Family.tiny_set`, `--family`), and its help lists them from
here, so a set added here is offered and described without editing the command line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TinySet:
    option: str  # the make-tiny flag, e.g. --llm
    what: str  # what DIR holds afterwards, and which config field names it
    build: Callable[[str], str]  # DIR -> a line saying what was written where


def _superres(path: str) -> str:
    from k3batch.testing.tiny_sr import make_tiny_sr_folder

    make_tiny_sr_folder(path)
    return f"tiny random KandiSuperRes x4 and x2 checkpoints written to {path}"


def _scorers(path: str) -> str:
    import os

    from k3batch.testing.tiny_scorers import make_tiny_classifier, make_tiny_clip

    clip = make_tiny_clip(os.path.join(path, "clip"))
    nsfw = make_tiny_classifier(os.path.join(path, "nsfw"))
    return f"tiny random CLIP written to {clip}, NSFW classifier (normal/nsfw) to {nsfw}"


def _llm(path: str) -> str:
    from k3batch.testing.tiny_llm import make_tiny_llm

    make_tiny_llm(path, overwrite=True)
    return f"tiny random Mistral LLM (Hugging Face layout, for vLLM) written to {path}"


EXTRA_SETS = (
    TinySet(
        "--superres",
        "KandiSuperRes x4 and x2 checkpoints in the published file format (the `upscale.path` "
        "of an `upscale.make_tiny` job)",
        _superres,
    ),
    TinySet(
        "--scorers",
        "the scores stage's models: a CLIP in DIR/clip (`scores.clip_model`) and an NSFW "
        "image classifier in DIR/nsfw (`scores.classifiers`, labels normal/nsfw)",
        _scorers,
    ),
    TinySet(
        "--llm",
        "a Mistral LLM for prompt beautification (`beautify.model`, served by vLLM)",
        _llm,
    ),
)
