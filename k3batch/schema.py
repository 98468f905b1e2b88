"""Every column k3batch reads, adds or writes: its name, its Arrow type and its group.

Stages, outputs, accounting and tests import names from here instead of spelling them, so a
column is renamed or retyped in one place. The groups say where a column comes from and
whether it reaches the written metadata.
"""

from __future__ import annotations

import pyarrow as pa

# Input: read from the prompt table (the prompt and id columns may be renamed by
# `input.prompt_column` / `input.id_column`; these are the names rows carry after validation).
ID = "id"
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
SEED = "seed"
WIDTH = "width"
HEIGHT = "height"
NUM_INFERENCE_STEPS = "num_inference_steps"
GUIDANCE_SCALE = "guidance_scale"
STRENGTH = "strength"
NUM_IMAGES_PER_PROMPT = "num_images_per_prompt"
IMAGE = "image"  # image-to-image and inpainting source: a URI or raw bytes
MASK = "mask"  # inpainting mask: a URI or raw bytes
SCHEDULER = "scheduler"  # the sampler of base and inpainting rows (k3batch.model.samplers)
# Kandinsky 2.2 only: the prior's settings, a ControlNet depth hint (a URI or raw bytes, like
# `image`), and image mixing: a list of {prompt | image, weight} items.
PRIOR_NUM_INFERENCE_STEPS = "prior_num_inference_steps"
PRIOR_GUIDANCE_SCALE = "prior_guidance_scale"
HINT = "hint"
MIX = "mix"
# Kandinsky 3 ControlNet (`model.controlnet`): `hint` is an edge image, and per row the fork's
# settings: the residuals' scale and the step window (fractions of the steps) they apply in.
CONTROLNET_CONDITIONING_SCALE = "controlnet_conditioning_scale"
CONTROL_GUIDANCE_START = "control_guidance_start"
CONTROL_GUIDANCE_END = "control_guidance_end"
CONTROLNET_COLUMNS = (CONTROLNET_CONDITIONING_SCALE, CONTROL_GUIDANCE_START, CONTROL_GUIDANCE_END)
# Kandinsky 3 IP-Adapter (`model.ip_adapter`): image prompts, a list of {image, weight} items
# (image: a URI or raw bytes; weight: default 1.0), mixed by weight; the adapter's scale.
IP_IMAGES = "ip_images"
IP_ADAPTER_SCALE = "ip_adapter_scale"
IP_IMAGE = "image"  # the fields of an `ip_images` item
IP_WEIGHT = "weight"
MIX_PROMPT = "prompt"  # the fields of a `mix` item
MIX_IMAGE = "image"
MIX_WEIGHT = "weight"

# Status: every row has these from validation on; a failing stage sets them, later ones skip.
STATUS = "status"
ERROR = "error"
WARNING = "warning"
STATUS_OK = "ok"
STATUS_ERROR = "error"

# Generation results, written to the metadata.
MODEL = "model"
IMAGE_URI = "image_uri"
GENERATE_SECONDS = "generate_seconds"
UNCOND_EMBEDDING = "uncond_embedding"
# A row with num_images_per_prompt = N yields N records, k = 0 .. N-1 (the image's index);
# each record's `seed` is its image's own.
K = "k"

# Prompt beautification.
BEAUTIFIED_PROMPT = "beautified_prompt"
BEAUTIFY_ERROR = "beautify_error"
PROMPT_USED = "prompt_used"
BEAUTIFY_FALLBACK = "beautify_fallback"

# Scores (the optional `scores:` stage), written to the metadata. A classifier the config
# names adds `<name>_score` (`classifier_column`), typed as the others.
CLIP_SCORE = "clip_score"
BRIGHTNESS = "brightness"
SHARPNESS = "sharpness"
SCORE_SUFFIX = "_score"

# Upscaling (the `upscale:` stage, or `job: upscale`), written to the metadata: `width` and
# `height` become the upscaled image's, `source_*` the image's before.
UPSCALE_MODEL = "upscale_model"
UPSCALE_SECONDS = "upscale_seconds"
SOURCE_WIDTH = "source_width"
SOURCE_HEIGHT = "source_height"
SOURCE_IMAGE_URI = "source_image_uri"  # with upscale.keep_source, `files` output

# Text embeddings handed from the text-encoder pool to the generators (never written).
PROMPT_EMBEDS = "prompt_embeds"
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"
PROMPT_EMBEDS_LENGTH = "prompt_embeds_length"

# Internal: between stages only, or the resume id.
# Added by ray.data.read_parquet(include_row_hash=True) and kept to the end: it is the id
# Ray's checkpoint records for resume (see k3batch.resume).
ROW_HASH = "row_hash"
# The checkpoint id of one record (one image): the row's `row_hash` for k = 0, a hash of
# (row_hash, k) for the others (`rows.record_hashes`).
RECORD_HASH = "record_hash"
IMAGE_SEEDS = "image_seeds"  # the seeds of a row's images, k = 0 .. N-1
# On resume: the k of a row's images an earlier run committed (set by the checkpoint filter,
# `resume.ImageCheckpointFilter`; a name no user table has).
IMAGES_DONE = "_k3batch_images_done"
IMAGE_RGB = "image_rgb"  # the decoded image, raw RGB bytes
SOURCE_RGB = "source_rgb"  # the prepared image-to-image / inpainting source
KEEP_MASK = "keep_mask"  # the prepared inpainting mask
HINT_RGB = "hint_rgb"  # the prepared depth hint, raw RGB at the row's size
# The prepared mix: per item its prompt, or its image as raw RGB with its own size.
MIX_PREPARED = "mix_prepared"
# The prepared image prompts: per item its image as raw RGB with its own size, and its weight.
IP_IMAGES_PREPARED = "ip_images_prepared"
# upscale.keep_source: the image before upscaling, raw RGB; then its encoded bytes (shards).
SOURCE_IMAGE_RGB = "source_image_rgb"
SOURCE_IMAGE_BYTES = "source_image_bytes"
KEY = "key"  # a WebDataset sample's key
IMAGE_BYTES = "image_bytes"  # the encoded image of a WebDataset sample
FILE_NAME = "file_name"  # the Hugging Face image-folder metadata's link to the image

TYPES: dict[str, pa.DataType] = {
    ID: pa.string(),
    PROMPT: pa.string(),
    NEGATIVE_PROMPT: pa.string(),
    SEED: pa.uint64(),
    WIDTH: pa.int64(),
    HEIGHT: pa.int64(),
    NUM_INFERENCE_STEPS: pa.int64(),
    GUIDANCE_SCALE: pa.float64(),
    STRENGTH: pa.float64(),
    NUM_IMAGES_PER_PROMPT: pa.int64(),
    SCHEDULER: pa.string(),
    PRIOR_NUM_INFERENCE_STEPS: pa.int64(),
    PRIOR_GUIDANCE_SCALE: pa.float64(),
    CONTROLNET_CONDITIONING_SCALE: pa.float64(),
    CONTROL_GUIDANCE_START: pa.float64(),
    CONTROL_GUIDANCE_END: pa.float64(),
    IP_ADAPTER_SCALE: pa.float64(),
    STATUS: pa.string(),
    ERROR: pa.string(),
    WARNING: pa.string(),
    MODEL: pa.string(),
    IMAGE_URI: pa.string(),
    GENERATE_SECONDS: pa.float64(),
    UNCOND_EMBEDDING: pa.string(),
    K: pa.int64(),
    BEAUTIFIED_PROMPT: pa.string(),
    BEAUTIFY_ERROR: pa.string(),
    PROMPT_USED: pa.string(),
    BEAUTIFY_FALLBACK: pa.string(),
    PROMPT_EMBEDS: pa.binary(),
    NEGATIVE_PROMPT_EMBEDS: pa.binary(),
    PROMPT_EMBEDS_LENGTH: pa.int32(),
    ROW_HASH: pa.uint64(),
    RECORD_HASH: pa.uint64(),
    IMAGE_SEEDS: pa.list_(pa.uint64()),
    IMAGES_DONE: pa.list_(pa.int64()),
    IMAGE_RGB: pa.binary(),
    SOURCE_RGB: pa.binary(),
    KEEP_MASK: pa.binary(),
    HINT_RGB: pa.binary(),
    MIX_PREPARED: pa.list_(
        pa.struct(
            [
                ("prompt", pa.string()),
                ("rgb", pa.binary()),
                ("width", pa.int64()),
                ("height", pa.int64()),
                ("weight", pa.float64()),
            ]
        )
    ),
    IP_IMAGES_PREPARED: pa.list_(
        pa.struct(
            [
                ("rgb", pa.binary()),
                ("width", pa.int64()),
                ("height", pa.int64()),
                ("weight", pa.float64()),
            ]
        )
    ),
    KEY: pa.string(),
    IMAGE_BYTES: pa.binary(),
    FILE_NAME: pa.string(),
    CLIP_SCORE: pa.float64(),
    BRIGHTNESS: pa.float64(),
    SHARPNESS: pa.float64(),
    UPSCALE_MODEL: pa.string(),
    UPSCALE_SECONDS: pa.float64(),
    SOURCE_WIDTH: pa.int64(),
    SOURCE_HEIGHT: pa.int64(),
    SOURCE_IMAGE_URI: pa.string(),
    SOURCE_IMAGE_RGB: pa.binary(),
    SOURCE_IMAGE_BYTES: pa.binary(),
}
SCORE_TYPE = pa.float64()

# Optional input columns that override the job's generation defaults per row.
OVERRIDE_COLUMNS = (
    NEGATIVE_PROMPT,
    SEED,
    WIDTH,
    HEIGHT,
    NUM_INFERENCE_STEPS,
    GUIDANCE_SCALE,
    STRENGTH,
    NUM_IMAGES_PER_PROMPT,
    SCHEDULER,
)
# Optional input columns of Kandinsky 2.2 rows: settings (validated like the ones above, kept
# out of Kandinsky 3 outputs) and inputs read by the prepare stage.
K22_OVERRIDE_COLUMNS = (PRIOR_NUM_INFERENCE_STEPS, PRIOR_GUIDANCE_SCALE)
K22_INPUT_COLUMNS = (HINT, MIX)
# Optional columns of Kandinsky 3 base rows with `model.ip_adapter`: the image prompts (read by
# the prepare stage) and the adapter's scale (validated, then written per record).
IP_ADAPTER_COLUMNS = (IP_IMAGES, IP_ADAPTER_SCALE)
# Optional input columns of image-to-image and inpainting rows.
IMAGE_COLUMNS = (IMAGE, MASK)
STATUS_COLUMNS = (STATUS, ERROR)
# What a validated row carries (the generation settings resolved per row).
VALIDATED_COLUMNS = (ID, PROMPT, *OVERRIDE_COLUMNS, IMAGE_SEEDS, STATUS, ERROR, WARNING)
# What GenerateStage sets per record (image) rather than copying from its row.
RECORD_COLUMNS = (K, SEED, RECORD_HASH)
# Resume keys: never in the Hugging Face image-folder metadata.
RESUME_COLUMNS = (ROW_HASH, RECORD_HASH)
BEAUTIFY_COLUMNS = (BEAUTIFIED_PROMPT, BEAUTIFY_ERROR, BEAUTIFY_FALLBACK)
EMBEDDING_COLUMNS = (PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS, PROMPT_EMBEDS_LENGTH)

# Columns k3batch writes that are not read from the input. An input column with one of these
# names is kept as `input_<name>` rather than overwritten.
OUTPUT_ONLY_COLUMNS = (
    STATUS,
    ERROR,
    MODEL,
    IMAGE_URI,
    GENERATE_SECONDS,
    UNCOND_EMBEDDING,
    K,
    RECORD_HASH,
    IMAGE_SEEDS,
    IMAGE_RGB,
    PROMPT_USED,
    BEAUTIFY_FALLBACK,
    WARNING,
    SOURCE_RGB,
    KEEP_MASK,
    HINT_RGB,
    MIX_PREPARED,
    IP_IMAGES_PREPARED,
    CLIP_SCORE,
    BRIGHTNESS,
    SHARPNESS,
    UPSCALE_MODEL,
    UPSCALE_SECONDS,
    SOURCE_WIDTH,
    SOURCE_HEIGHT,
    SOURCE_IMAGE_URI,
    SOURCE_IMAGE_RGB,
)


def types(*names: str) -> dict[str, pa.DataType]:
    """`{name: Arrow type}` for a stage's `adds`, in the order given."""
    return {name: TYPES[name] for name in names}


def classifier_column(name: str) -> str:
    """The column of the classifier the config names `name` (`scores.classifiers`)."""
    return f"{name}{SCORE_SUFFIX}"
