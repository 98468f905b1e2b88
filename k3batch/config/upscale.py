"""`upscale:`: KandiSuperRes upscaling, after generation or as its own job (`job: upscale`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from k3batch.config.base import Dtype, Strict
from k3batch.config.model import _check_device
from k3batch.model.superres.checkpoints import SUPERRES

DEFAULT_PATH = "ai-forever/KandiSuperRes"


class UpscaleConfig(Strict):
    """KandiSuperRes (ai-forever/KandiSuperRes) in its own actor pool."""

    model: Literal["x4", "x2", "flash-x2"] | None = Field(
        None,
        description="`x4` (`KandiSuperRes.ckpt`) or `x2` (`KandiSuperRes_x2.ckpt`): the "
        "reference's DPM-Solver with MultiDiffusion windows; `flash-x2` "
        "(`KandiSuperRes_flash_x2.pt`): four x0 steps then a tiled Kandinsky 3 Flash refine. "
        "null: no upscaling (a `text_to_image` job writes its images as generated); "
        "`job: upscale` needs one.",
    )
    path: str = Field(
        DEFAULT_PATH,
        description="A directory holding the published checkpoint files, one checkpoint "
        "file, or a Hugging Face repo id (the files are fetched from it). Read tensors-only "
        "(`torch.load(weights_only=True)`): a pickled object in the file is refused, no code "
        "in it runs.",
    )
    kandinsky3_path: str | None = Field(
        None,
        description="`flash-x2` only: the Kandinsky 3 checkpoint whose Flash UNet and MoVQ run "
        "the refine (reference `weights/` layout or diffusers, a directory or Hugging Face "
        "repo id, e.g. `ai-forever/Kandinsky3.1`). null with `make_tiny`: the tiny one built "
        "in `path`/kandinsky3. The fixed refine context (`context.pt`, `context_mask.pt`) is "
        "read beside the Flash x2 file.",
    )
    make_tiny: bool = Field(
        False,
        description="Build tiny random-weight checkpoints in the directory `path` (demos and "
        "tests; their images mean nothing).",
    )
    num_inference_steps: int = Field(
        5,
        ge=1,
        le=100,
        description="DPM-Solver steps of `x4` / `x2` (the reference: 5). `flash-x2` runs its "
        "four fixed steps.",
    )
    window: int = Field(
        1024,
        ge=8,
        multiple_of=8,
        description="MultiDiffusion window side in output pixels (the reference: 1024); "
        "`flash-x2` uses it only above `flash_whole_canvas_side`.",
    )
    stride: int = Field(
        800, ge=1, description="Step between windows in output pixels (the reference: 800)."
    )
    max_tiles_per_call: int = Field(
        4,
        ge=1,
        description="Windows per UNet call, from any rows of a batch: bounds the UNet's "
        "activation memory whatever the image size.",
    )
    flash_whole_canvas_side: int = Field(
        4096,
        ge=64,
        description="`flash-x2`: its four SR steps run the whole canvas (2x the input, sides "
        "rounded down to 32) in one UNet call, as the reference, while the canvas has at most "
        "this side squared pixels; a larger canvas runs them in MultiDiffusion windows "
        "(`window` every `stride`, `max_tiles_per_call` per call), a deviation from the "
        "reference that bounds their memory. The whole canvas needs ~1.2 GiB of UNet "
        "activations per megapixel in float16 (~19 GiB at 4096x4096, twice in float32): lower "
        "it on GPUs with less memory.",
    )
    max_output_side: int = Field(
        4096,
        ge=8,
        description="Longest side an upscaled image may have; a row whose image would be "
        "larger is an error naming `image` (the canvas and window history grow with it).",
    )
    keep_source: bool = Field(
        False,
        description="Also write each image as it was before upscaling: `files` as "
        "`images/<key>.source.<ext>` (column `source_image_uri`), `webdataset` as the "
        "sample's `source.<ext>`.",
    )
    dtype: Dtype | None = Field(
        None,
        description="Dtype of the SR UNet (the solver and window averaging stay float32). "
        "null: float16 on a GPU, float32 on a CPU.",
    )
    device: str = Field(
        "auto",
        description="Torch device (`auto`: CUDA when the actor has a GPU, else CPU; `cpu`, "
        "`cuda` or `cuda:N`).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the SR UNet block by block (its ResNet blocks, static "
        "shapes, Inductor; `model.performance.compile.scope: regional`): each new window "
        "batch shape compiles on first use (the last call of a step may hold fewer windows). "
        "A block that cannot compile runs eager with a warning.",
    )
    batch_size: int = Field(
        2, ge=1, description="Images per upscaling call (their windows share UNet calls)."
    )
    num_actors: int = Field(1, ge=1, description="Upscaling actors (one SR model each).")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per upscaling actor.")
    num_gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="GPUs per upscaling actor (0 on CPU-only machines); a fraction shares a "
        "GPU with the generation actors.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @model_validator(mode="after")
    def _window(self) -> UpscaleConfig:
        if self.model == "flash-x2" and self.kandinsky3_path is None and not self.make_tiny:
            raise ValueError(
                "upscale.kandinsky3_path is null: upscale.model: flash-x2 needs a Kandinsky 3 "
                "checkpoint for its Flash refine (or upscale.make_tiny: true)"
            )
        if self.stride > self.window:
            raise ValueError(
                f"upscale.stride={self.stride} is above upscale.window={self.window}: windows "
                "would leave gaps"
            )
        return self

    def absolute_paths(self) -> None:
        """Local checkpoint paths made absolute: Ray workers and Serve replicas need not
        share the driver's working directory (Hub ids are left alone)."""
        import os

        if self.make_tiny or os.path.exists(self.path):
            self.path = os.path.abspath(self.path)
        if self.kandinsky3_path and os.path.exists(self.kandinsky3_path):
            self.kandinsky3_path = os.path.abspath(self.kandinsky3_path)

    @property
    def enabled(self) -> bool:
        return self.model is not None

    @property
    def scale(self) -> int:
        return SUPERRES[self.model][0] if self.model else 1

    @property
    def file_name(self) -> str:
        """The published checkpoint file of `model` (in `path` when it is a directory)."""
        return SUPERRES[self.model][1]
