"""What a row of a job may bring, declared once from the job's model config.

`k3batch.model.family.row_capabilities(model)` derives a `RowCapabilities` from the member
and its conditioning models (`model.controlnet`, `model.ip_adapter`, `model.depth_estimator`);
validation (`check.normalise_row`), the image-preparing stage, Serve's request checks and the
config reference read it instead of asking which family or flags a job has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k3batch import schema
from k3batch.model.member import Member


@dataclass(frozen=True)
class RowCapabilities:
    member: Member
    # Which hint image a row may bring: "depth" (every row of a depth member has one, or one
    # is estimated), "edge" (the Kandinsky 3 ControlNet; rows without one are plain), None.
    hint: str | None = None
    hint_estimator: bool = False  # a depth hint missing from a row with an image is estimated
    ip_images: bool = False  # image prompts (the Kandinsky 3 IP-Adapter)
    # Non-empty: the member samples with schedulers of its own (a row's `scheduler` is ignored).
    own_schedulers: str = ""
    # For errors on rows that bring what this job cannot take: who takes it. Keys: `mask`,
    # `strength` (the member's family), `depth_hint`, `conditioning` (the members that take
    # the Kandinsky 3 conditioning models), `mix`.
    takers: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def prior(self) -> bool:
        """Rows may set the prior's steps and guidance."""
        return self.member.has_prior

    @property
    def mix(self) -> bool:
        return self.member.mixes

    @property
    def control_settings(self) -> bool:
        """A hinted row's ControlNet settings (scale, start, end) apply."""
        return self.hint == "edge"

    def validated_columns(self) -> tuple[str, ...]:
        """Columns validation adds beyond every job's: the settings this job resolves per row."""
        cols: tuple[str, ...] = ()
        if self.prior:
            cols += schema.K22_OVERRIDE_COLUMNS
        if self.control_settings:
            cols += schema.CONTROLNET_COLUMNS
        if self.ip_images:
            cols += (schema.IP_ADAPTER_SCALE,)
        return cols

    def prepared_columns(self) -> tuple[str, ...]:
        """Columns the image-preparing stage adds beyond every job's (decoded inputs)."""
        cols: tuple[str, ...] = ()
        if self.hint:
            cols += (schema.HINT_RGB,)
        if self.mix:
            cols += (schema.MIX_PREPARED,)
        if self.ip_images:
            cols += (schema.IP_IMAGES_PREPARED,)
        return cols

    def input_columns(self) -> tuple[str, ...]:
        """The optional input columns a row of this job may bring and have used (beyond
        prompt and id); others are ignored with a warning or refused as the row's error."""
        m = self.member
        cols = [schema.SEED, schema.WIDTH, schema.HEIGHT, schema.NUM_IMAGES_PER_PROMPT]
        if m.guided:
            cols += [schema.NEGATIVE_PROMPT, schema.GUIDANCE_SCALE]
        if not m.fixed_timesteps:
            cols.append(schema.NUM_INFERENCE_STEPS)
            if not self.own_schedulers:
                cols.append(schema.SCHEDULER)
        if m.takes_image:
            cols.append(schema.IMAGE)
        if m.image_input == "optional":
            cols.append(schema.STRENGTH)
        if m.needs_mask:
            cols.append(schema.MASK)
        if self.hint:
            cols.append(schema.HINT)
        cols += self.validated_columns()
        if self.mix:
            cols.append(schema.MIX)
        if self.ip_images:
            cols.append(schema.IP_IMAGES)
        return tuple(cols)
