"""Score columns for each generated image, so a dataset can be filtered in Parquet without
reading its images: `brightness` and `sharpness` (numpy, every row), `clip_score` (a CLIP
model) and `<name>_score` per classifier the config names (`scores:`).

A row that failed earlier keeps its status and gets null scores. A score that cannot be
computed for a row leaves that score null and adds a `scores: ...` warning: the image is
fine, so the row stays `ok`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from k3batch import schema
from k3batch.stages.base import Stage, ok_rows, start_output

if TYPE_CHECKING:
    from k3batch.config import ScoresConfig

# Rec. 601 luma, as Pillow's convert("L") weighs R, G and B.
LUMA = (0.299, 0.587, 0.114)


def image_statistics(rgb) -> tuple[float, float]:
    """(brightness, sharpness) of an HxWx3 uint8 image.

    brightness: mean Rec. 601 luma scaled to 0..1. sharpness: the variance of the 4-neighbour
    Laplacian ([[0,1,0],[1,-4,1],[0,1,0]]) of the luma on the 0..255 scale over the interior
    pixels, the usual blur measure (OpenCV's `Laplacian(gray, CV_64F).var()` up to the border):
    0 for a flat image, larger for more edges and noise.
    """
    import numpy as np

    luma = rgb.astype(np.float64) @ np.asarray(LUMA)
    brightness = float(luma.mean()) / 255.0
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return brightness, 0.0
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    return brightness, float(lap.var())


def score_columns(cfg: ScoresConfig) -> dict:
    """The columns scoring adds for `cfg` ({name: Arrow type}); the classifier columns are the
    config's."""
    names = [schema.BRIGHTNESS, schema.SHARPNESS]
    if cfg.clip_model:
        names.append(schema.CLIP_SCORE)
    types = schema.types(*names)
    for c in cfg.classifiers:
        types[schema.classifier_column(c.name)] = schema.SCORE_TYPE
    return types


def _torch_setup(device: str, dtype: str):
    import torch

    from k3batch.model.loading import DTYPES, resolve_device

    return resolve_device(device), DTYPES[dtype], torch


class ClipScorer:
    """`clip_score` as torchmetrics' CLIPScore defines it: 100 * max(cos(image, text), 0) of the
    projected CLIP embeddings. The text is cut to CLIP's context (77 tokens for the released
    models): CLIP cannot read further."""

    column = schema.CLIP_SCORE

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        self.device, self.dtype, self.torch = _torch_setup(device, dtype)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        # PIL image processors by name (here and below): CLIP's reference preprocessing, and
        # the default class without torchvision warns that it falls back to them.
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(path)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __call__(self, images: list, prompts: list[str]) -> list[float]:
        torch = self.torch
        text = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        pixels = self.image_processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            image_emb = self.model.get_image_features(
                pixel_values=pixels["pixel_values"].to(self.device, self.dtype)
            ).pooler_output
            text_emb = self.model.get_text_features(**text).pooler_output
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float())
        return (100 * cos.clamp(min=0)).tolist()


class ClassifierScorer:
    """The probability a transformers image classifier gives one label: softmax over its
    labels, or the label's sigmoid for a multi-label model."""

    def __init__(self, name: str, path: str, label: str, device="cpu", dtype="float32"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.column = schema.classifier_column(name)
        self.device, self.dtype, self.torch = _torch_setup(device, dtype)
        model = AutoModelForImageClassification.from_pretrained(path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        self.index = label_index(model.config, label)
        self.multi_label = model.config.problem_type == "multi_label_classification"

    def __call__(self, images: list, prompts: list[str]) -> list[float]:
        torch = self.torch
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits.float()
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return probs[:, self.index].tolist()


def label_index(config, label: str) -> int:
    """The class index of `label` in a model config's `id2label`."""
    for index, name in config.id2label.items():
        if name == label:
            return int(index)
    raise ValueError(
        f"{label!r} is not one of the model's labels {sorted(config.id2label.values())}"
    )


def check_scores(cfg: ScoresConfig) -> None:
    """Fail at start, naming the field, when a scoring model cannot be found or a classifier
    has no such label (reads the models' config.json, not their weights)."""
    if not cfg.enabled:
        return
    from transformers import AutoConfig

    from k3batch.config import ConfigError

    def config_of(field: str, path: str):
        try:
            return AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any load failure is this field's error
            raise ConfigError(
                f"{field}: cannot load a model config from {path!r}: {type(e).__name__}: {e}"
            ) from None

    if cfg.clip_model:
        config = config_of("scores.clip_model", cfg.clip_model)
        if config.model_type != "clip":
            raise ConfigError(
                f"scores.clip_model: {cfg.clip_model!r} is a {config.model_type!r} model, not CLIP"
            )
    for i, c in enumerate(cfg.classifiers):
        config = config_of(f"scores.classifiers[{i}].path", c.path)
        try:
            label_index(config, c.label)
        except ValueError as e:
            raise ConfigError(f"scores.classifiers[{i}].label: {e} (model {c.path})") from None


class ScoresStage(Stage):
    """Adds the score columns to rows with an image; `warning` gains `scores: ...` for a row a
    scorer failed on."""

    needs = (
        schema.IMAGE_RGB,
        schema.WIDTH,
        schema.HEIGHT,
        schema.PROMPT,
        *schema.STATUS_COLUMNS,
        schema.WARNING,
    )

    def __init__(self, scores: ScoresConfig, prompt_column: str = schema.PROMPT):
        # `prompt_used` when beautification chose the text the image was generated from.
        self.prompt_column = prompt_column
        self.needs = tuple(prompt_column if c == schema.PROMPT else c for c in type(self).needs)
        self.adds = {**score_columns(scores), schema.WARNING: schema.TYPES[schema.WARNING]}
        self.scorers = []
        if scores.uses_models:
            from k3batch import gpus

            gpus.check_cuda("scores", scores.device)
        if scores.clip_model:
            self.scorers.append(ClipScorer(scores.clip_model, scores.device, scores.dtype))
        for c in scores.classifiers:
            self.scorers.append(
                ClassifierScorer(c.name, c.path, c.label, scores.device, scores.dtype)
            )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        import numpy as np

        out = start_output(batch, self.adds, carry=(schema.WARNING,))
        images = {}
        for i in ok_rows(batch):
            data = batch[schema.IMAGE_RGB][i]
            if data is None:
                continue  # the encode stage makes this row's error
            try:
                w, h = batch[schema.WIDTH][i], batch[schema.HEIGHT][i]
                rgb = np.frombuffer(data, np.uint8).reshape(h, w, 3)
                out[schema.BRIGHTNESS][i], out[schema.SHARPNESS][i] = image_statistics(rgb)
            except Exception as e:  # noqa: BLE001 - a bad image is this row's warning
                _warn(out, i, "image", e)
                continue
            images[i] = rgb
        prompts = batch[self.prompt_column]
        for scorer in self.scorers:
            self._score(scorer, list(images), images, prompts, out)
        return out

    def _score(self, scorer, rows: list[int], images: dict, prompts: list, out) -> None:
        """Score `rows` in one call; when the call fails, each row alone, so one bad row
        costs only its own score."""
        if not rows:
            return
        try:
            values = scorer([images[i] for i in rows], [prompts[i] or "" for i in rows])
        except Exception as e:  # noqa: BLE001 - a failed score is a warning, never a lost image
            if len(rows) > 1:
                for i in rows:
                    self._score(scorer, [i], images, prompts, out)
                return
            _warn(out, rows[0], scorer.column, e)
            return
        for i, value in zip(rows, values, strict=True):
            out[scorer.column][i] = value


def _warn(out: dict, i: int, what: str, error: Exception) -> None:
    text = f"scores: {what}: {type(error).__name__}: {error}"
    out[schema.WARNING][i] = f"{out[schema.WARNING][i]}; {text}" if out[schema.WARNING][i] else text
