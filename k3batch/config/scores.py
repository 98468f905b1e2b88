"""`scores:`: per-image score columns (CLIP score, image statistics, named classifiers)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from k3batch.config.base import Dtype, Strict
from k3batch.config.model import _check_device


class ClassifierConfig(Strict):
    """An image-classification model whose probability of one label becomes a column."""

    name: str = Field(
        description="Column prefix: the probability is written as `<name>_score` (a Python "
        "identifier, e.g. `nsfw` or `watermark`).",
    )
    path: str = Field(
        description="A transformers image-classification model (a local directory or a Hugging "
        "Face repo id) loadable with AutoModelForImageClassification and AutoImageProcessor.",
    )
    label: str = Field(
        description="The label (one of the model's `id2label` values) whose probability is "
        "the score: softmax over the labels, or sigmoid for a multi-label model.",
    )

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError(f"must be an identifier (letters, digits, _), got {v!r}")
        return v


class ScoresConfig(Strict):
    """Score columns added after generation, so a dataset can be filtered without its images."""

    enabled: bool = Field(
        False,
        description="Add `brightness` and `sharpness` to every generated image's row, and "
        "`clip_score` / `<name>_score` when `clip_model` / `classifiers` are set. A row that "
        "cannot be scored keeps its image: its scores stay null and `warning` names `scores`.",
    )
    clip_model: str | None = Field(
        None,
        description="A transformers CLIP model (directory or repo id: CLIPModel with its "
        "processor) for `clip_score`: 100 * max(cosine(image, prompt), 0) as torchmetrics "
        "defines CLIPScore, with the prompt generation used cut to CLIP's 77 tokens. null: no "
        "clip_score column.",
    )
    classifiers: list[ClassifierConfig] = Field(
        default_factory=list,
        description="Image classifiers (NSFW, watermark, ... detectors the user names), each "
        "adding `<name>_score`.",
    )
    make_tiny: bool = Field(
        False,
        description="Build tiny random-weight scoring models at `clip_model` and each "
        "classifier's `path` (its `label` among the labels) when missing, before the job "
        "starts: the demos and tests; scores from random weights mean nothing.",
    )
    batch_size: int = Field(16, ge=1, description="Images per scoring call.")
    device: str = Field(
        "auto",
        description="Torch device of the scoring models (`auto`: CUDA when the actor has a "
        "GPU, else CPU; `cpu`, `cuda` or `cuda:N`).",
    )
    dtype: Dtype = Field("float32", description="Dtype of the scoring models.")
    num_actors: int = Field(
        1,
        ge=1,
        description="Scoring actors (one copy of the models each); used only when a model is "
        "configured: brightness and sharpness alone run as plain CPU tasks.",
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per scoring actor.")
    num_gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="GPUs per scoring actor; a fraction shares a GPU with the generation actors.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @model_validator(mode="after")
    def _unique_columns(self) -> ScoresConfig:
        names = [c.name for c in self.classifiers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"classifiers: name {name!r} is given twice")
            if name == "clip":
                raise ValueError("classifiers: name 'clip' would overwrite clip_score")
        return self

    @property
    def uses_models(self) -> bool:
        """Whether scoring loads a model (and so runs on an actor pool)."""
        return self.enabled and bool(self.clip_model or self.classifiers)
