"""What a model family declares: its members (`Member`) and the family itself (`Family`).

Torch-free: the config and the pre-flight checks read these before any model loads. Each
family's package (`k3batch/model/<family>/`) declares its members and one `Family` object in
its `family.py`; `k3batch.model.family` registers them. Code outside a family asks these
objects what a member or a family can do; it never compares family names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    """One model of a family, declared once: its weights, the reference's settings for it,
    and what it can do. Config validation, row normalisation, loading, sampling and Serve
    read these fields instead of testing member names, so a new member is one entry in its
    family's `members.py`."""

    name: str
    family: str  # the `Family.name` that declares it
    in_channels: int
    num_inference_steps: int | None  # default; None: fixed timesteps
    guidance_scale: float | None  # default; None: no classifier-free guidance
    threshold_percentile: float | None = None  # dynamic thresholding of x0; None: none
    summary: str = ""  # one line for the config reference (`model.name`)
    # "none": text-to-image only; "optional": an `image` row is image-to-image (with
    # `strength`); "required": every row brings an image (and a mask, with `needs_mask`).
    image_input: str = "none"
    needs_mask: bool = False
    fixed_timesteps: tuple[int, ...] | None = None  # sampled at exactly these timesteps
    refinable: bool = False  # `model.refine`: a final Flash step (Kandinsky 3 base)
    # Takes the Kandinsky 3 conditioning models (`model.controlnet`, `model.ip_adapter`).
    conditioning: bool = False
    text_encoder: str = "flan-ul2 encoder"
    max_prompt_tokens: int = 128  # the text encoder's context; longer prompts are cut
    guidance_formula: str = ""  # how guidance_scale w combines the two branches
    # Kandinsky 3 weight files: the diffusers layout's UNet folder, the reference layout's
    # UNet pickle and text projection (both under weights/).
    unet_folder: str = "unet"
    reference_file: str = ""
    projection_file: str = ""
    # A prior (Kandinsky 2.2): its default steps and guidance; None: the member has none.
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None
    needs_hint: bool = False  # every row is conditioned on a `hint` (or one estimated)
    mixes: bool = False  # rows may bring `mix` items (images and prompts, weighted)
    default_path: str | None = None  # `model.path` when the config names none

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    @property
    def takes_image(self) -> bool:
        return self.image_input != "none"

    @property
    def has_prior(self) -> bool:
        return self.prior_num_inference_steps is not None

    @property
    def steps(self) -> int | None:
        """Steps every row runs when they are fixed, else None (the row's own)."""
        return len(self.fixed_timesteps) if self.fixed_timesteps else None


@dataclass(frozen=True)
class WeightCheck:
    """One place a job's weights load from, checked at pre-flight: a local folder lacking
    `missing`, or a Hugging Face repo id."""

    field: str  # the config field that names it, e.g. `model.path`
    path: str
    missing: tuple[str, ...] = ()
    what: str = "local folder"  # how the error names a local path
    note: str = ""  # said after the member in the error, e.g. " with model.refine"


class Family:
    """A model family: its members and everything the rest of k3batch asks of it.

    Subclasses live in `k3batch/model/<family>/family.py`; their methods import the family's
    heavy modules (torch, diffusers) lazily, so declaring a family stays light. `model` is
    always the job's `ModelConfig` (duck-typed: a family never imports the config).
    """

    name: str = ""
    title: str = ""  # how docs and messages name it, e.g. "Kandinsky 3.1"
    members: tuple[Member, ...] = ()
    # Per-component dtype/device keys (`model.dtype.*`, `model.device.*`) its actors load.
    components: tuple[str, ...] = ("unet", "text_encoder", "movq")
    # `model.*` and `generation.*` fields only this family reads: set on another family's
    # member, they are refused at config time, and they stay out of its resume fingerprint.
    model_fields: tuple[str, ...] = ()
    generation_fields: tuple[str, ...] = ()
    # Non-empty: the family samples with schedulers of its own (said in errors), and
    # `generation.scheduler` cannot choose one of `k3batch.model.samplers`.
    own_schedulers: str = ""
    # Non-empty: why the text encoder cannot run in its own pool (`resources.text_encoder_pool`),
    # said after the member's name.
    no_text_encoder_pool: str = ""
    # A 2.2 member is asked for by its own name on Serve; None: the Serve config's default.
    served_by_member_name: bool = False
    tiny_set: str = ""  # what `k3batch make-tiny --family NAME` writes, for --help

    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def check_model(self, model) -> None:
        """Refuse (ValueError naming the field) what this family's members cannot do, and
        fill defaults that depend on the member (e.g. `model.path`)."""

    def weight_checks(self, model) -> list[WeightCheck]:
        """Where the job's weights load from, with what a local folder lacks (pre-flight)."""
        raise NotImplementedError

    def ensure_tiny(self, model) -> None:
        """Build the tiny random-weight set at `model.path` when `model.make_tiny` asks."""
        raise NotImplementedError

    def make_tiny(self, path: str, **options) -> str:
        """Build the tiny set at `path` (the CLI's `make-tiny`); a line saying what it wrote."""
        raise NotImplementedError

    def load(self, model, decode_batch_size: int = 1, text_encoder: bool = True):
        """The member's pipeline (`generate(requests)`), built once per actor."""
        raise NotImplementedError

    def loaded_components(self, pipe) -> dict:
        """The loaded modules by component name (the device record)."""
        return pipe.components()

    def label(self, model) -> str:
        """The `model` column: which weights and conditioning made the images."""
        raise NotImplementedError

    def load_text_encoder(self, model):
        """The text encoder alone, for its own pool (families with `no_text_encoder_pool`
        empty)."""
        raise NotImplementedError

    def memory_estimate(self, model, **settings):
        """GPU memory of a generation actor (`k3batch.model.memory.MemoryEstimate`)."""
        raise NotImplementedError

    def text_encoder_estimate(self, model, **settings):
        """GPU memory of a text encoder pool actor."""
        raise NotImplementedError

    def tokenizer_path(self, model) -> str:
        """The folder whose `tokenizer/` reads the prompts (beautification cuts to it)."""
        return model.path

    def conditioning(self, model) -> dict:
        """What conditions a row beyond its prompt and image, from the job's model config:
        `hint` ("depth", "edge" or None: which hint image a row may bring), `hint_estimator`
        (a missing hint is estimated from the row's image), `ip_images` (image prompts).
        `k3batch.model.family.row_capabilities` makes the rows' capabilities of it."""
        return {}
