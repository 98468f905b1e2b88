"""Row normalisation and validation: plain Python, no Ray, no torch.

A bad row is never dropped and never raises: it comes back with `status="error"` and an
`error` naming each bad field and its value.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import secrets
import unicodedata
from dataclasses import dataclass

from k3batch import schema
from k3batch.model import samplers
from k3batch.model.family import BASE, K22, KANDINSKY22, MEMBERS, members_with
from k3batch.schema import IMAGE_COLUMNS, STATUS_ERROR, STATUS_OK

MAX_SEED = 2**64 - 1
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class RowRules:
    """Defaults and limits a row is checked against (from the job config)."""

    negative_prompt: str | None = None
    seed: int = 0
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float | None = 3.0
    strength: float = 0.3
    num_images_per_prompt: int = 1
    scheduler: str = samplers.REFERENCE
    model: str = BASE
    # Kandinsky 2.2: the prior's defaults, and whether a depth estimator can make the hint.
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None
    depth_estimator: bool = False
    # Kandinsky 3 base with model.controlnet: rows may bring a `hint`; the fork's defaults.
    controlnet: bool = False
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    # Kandinsky 3 base with model.ip_adapter: rows may bring `ip_images`; the fork's scale.
    ip_adapter: bool = False
    ip_adapter_scale: float = 1.0
    max_side: int = 2048
    max_num_inference_steps: int = 1000
    max_prompt_chars: int = 20000
    max_num_images_per_prompt: int = 64
    # The column giving a row's number of images; None: one image per row whatever the
    # input holds (`job: upscale`, whose input may be an earlier job's metadata).
    images_column: str | None = schema.NUM_IMAGES_PER_PROMPT

    @classmethod
    def from_config(
        cls,
        generation,
        limits,
        model_name: str = BASE,
        depth_estimator: bool = False,
        controlnet: bool = False,
        ip_adapter: bool = False,
    ) -> RowRules:
        return cls(
            model=model_name,
            controlnet=controlnet,
            ip_adapter=ip_adapter,
            prior_num_inference_steps=generation.prior_num_inference_steps,
            prior_guidance_scale=generation.prior_guidance_scale,
            depth_estimator=depth_estimator,
            strength=generation.strength,
            scheduler=generation.scheduler,
            negative_prompt=generation.negative_prompt,
            seed=generation.seed,
            width=generation.width,
            height=generation.height,
            num_inference_steps=generation.num_inference_steps,
            guidance_scale=generation.guidance_scale,
            num_images_per_prompt=generation.num_images_per_prompt,
            max_side=limits.max_side,
            max_num_images_per_prompt=limits.max_num_images_per_prompt,
            max_num_inference_steps=limits.max_num_inference_steps,
            max_prompt_chars=limits.max_prompt_chars,
        )


def show(value) -> str:
    """A value quoted for an error message, shortened."""
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..." + f" ({len(str(value))} chars)"
    return text


class RowError(ValueError):
    pass


def _as_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(f"{field}: expected an integer, got {show(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or value != int(value):
        raise RowError(f"{field}: expected an integer, got {show(value)}")
    return int(value)


def _as_float(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(f"{field}: expected a number, got {show(value)}")
    return float(value)


def _as_text(field: str, value) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field}: expected text, got {show(value)}")
    return value


def _visible(text: str) -> bool:
    """Whether `text` has a character that is not a control, format, unassigned or
    separator character (Unicode categories C* and Z*): a letter, digit, mark, symbol..."""
    return any(unicodedata.category(c)[0] not in "CZ" for c in text)


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row's seed from the job's base seed and its id: stable across reruns and batches."""
    digest = hashlib.blake2b(f"{base_seed}/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: fits int64 consumers too


def pick_seed() -> int:
    return secrets.randbits(63)


def row_seed(value, base_seed: int, row_id: str) -> int:
    """A row's `seed` column value resolved as generation resolves it: null derives one from
    `base_seed` and the id, -1 (or a base seed of -1) draws one. Raises RowError."""
    if value is None:
        return pick_seed() if base_seed == -1 else derive_seed(base_seed, row_id)
    seed = _as_int(schema.SEED, value)
    if seed == -1:
        return pick_seed()
    if not 0 <= seed <= MAX_SEED:
        raise RowError(f"seed: must be -1 or in [0, 2**64), got {seed}")
    return seed


def derived_id(row_hash: int) -> str:
    return f"{int(row_hash):016x}"


def images_of(value, rules: RowRules) -> int:
    """A row's number of images: its `num_images_per_prompt` value, or the job's default.

    Raises RowError for a bad value. The checkpoint filter and the accounting count a row
    with a bad value as one record (its error record), as GenerateStage writes it.
    """
    if value is None:
        return rules.num_images_per_prompt
    n = _as_int(schema.NUM_IMAGES_PER_PROMPT, value)
    if n < 1:
        raise RowError(f"num_images_per_prompt: must be >= 1, got {n}")
    if n > rules.max_num_images_per_prompt:
        raise RowError(
            f"num_images_per_prompt: {n} is above "
            f"limits.max_num_images_per_prompt={rules.max_num_images_per_prompt}"
        )
    return n


def records_of(value, rules: RowRules) -> int:
    """How many records a row yields: its number of images, 1 when that value is bad."""
    try:
        return images_of(value, rules)
    except RowError:
        return 1


_GOLDEN = 0x9E3779B97F4A7C15


def record_hashes(row_hashes, ks):
    """Checkpoint ids of records (numpy uint64 arrays in and out): image 0 keeps its row's
    `row_hash`, so a one-image job's ids are its rows' ids; image k > 0 gets a splitmix64
    hash of (row_hash, k), as unlikely as any row hash to meet another id."""
    import numpy as np

    h = np.asarray(row_hashes, dtype=np.uint64)
    k = np.asarray(ks, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = h + k * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where(k == 0, h, z)


def image_index(counts):
    """(row, k) of every image of rows asking for `counts` images each, as two numpy arrays
    in row order: rows [2, 1] -> rows [0, 0, 1], ks [0, 1, 0]."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(counts.size), counts)
    return owner, np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)


def record_name(row_id, k) -> str:
    """How messages name a record: its row's id, `id/k` for the images after a row's first."""
    return f"{row_id}/{k}" if k else str(row_id)


def several_images(generation_default: int, input_columns) -> bool:
    """Whether a job may give a row more than one image: then every record's key carries
    its `k` (`<key>_<k>`), which keeps keys unique; otherwise keys are the rows' as before."""
    return generation_default > 1 or schema.NUM_IMAGES_PER_PROMPT in input_columns


def record_key(row_id: str, k: int | None, several: bool, dots: bool = True) -> str:
    """The file-name key of a record: `object_key(id)`, plus `_<k>` in a several-image job
    (injective: `k` is the last `_`-separated part and `object_key` is injective)."""
    key = object_key(row_id, dots=dots)
    return f"{key}_{k or 0}" if several else key


def normalise_row(raw: dict, prompt_column: str, rules: RowRules) -> dict:
    """The row's normalised generation fields plus `status` and `error`.

    `raw` holds the input columns (override columns optional). `raw[schema.ID]` must already be
    the row's id (a string).
    """
    errors: list[str] = []
    out: dict = {schema.ID: raw[schema.ID]}

    prompt = raw.get(prompt_column)
    if prompt is None:
        errors.append(f"{prompt_column}: missing (null)")
    elif not isinstance(prompt, str):
        errors.append(f"{prompt_column}: expected text, got {show(prompt)}")
        prompt = None
    elif not prompt.strip():
        errors.append(f"{prompt_column}: empty or whitespace only, got {show(prompt)}")
    elif not _visible(prompt):
        errors.append(
            f"{prompt_column}: no visible characters (only control, format or space "
            f"characters), got {show(prompt)}"
        )
    elif len(prompt) > rules.max_prompt_chars:
        errors.append(
            f"{prompt_column}: {len(prompt)} characters, above limits.max_prompt_chars={rules.max_prompt_chars}"
        )
    out[schema.PROMPT] = prompt

    def field(name, parse, check):
        value = raw.get(name)
        if value is None:
            value = getattr(rules, name)
        else:
            try:
                value = check(parse(name, value))
            except RowError as e:
                errors.append(str(e))
                return None
        return value

    negative = raw.get(schema.NEGATIVE_PROMPT)
    if negative is None:
        negative = rules.negative_prompt
    elif not isinstance(negative, str):
        errors.append(f"negative_prompt: expected text, got {show(negative)}")
        negative = None
    elif len(negative) > rules.max_prompt_chars:
        errors.append(
            f"negative_prompt: {len(negative)} characters, above limits.max_prompt_chars={rules.max_prompt_chars}"
        )
        negative = None
    out[schema.NEGATIVE_PROMPT] = negative if negative and negative.strip() else None

    def side(name):
        def check(v):
            if v <= 0 or v % 64:
                raise RowError(f"{name}: must be a positive multiple of 64, got {v}")
            if v > rules.max_side:
                raise RowError(f"{name}: {v} is above limits.max_side={rules.max_side}")
            return v

        return check

    def steps(v):
        if v < 1:
            raise RowError(f"num_inference_steps: must be >= 1, got {v}")
        if v > rules.max_num_inference_steps:
            raise RowError(
                f"num_inference_steps: {v} is above limits.max_num_inference_steps={rules.max_num_inference_steps}"
            )
        return v

    def guidance(v):
        if not math.isfinite(v):
            raise RowError(f"guidance_scale: must be finite, got {v}")
        if v < 0:
            raise RowError(f"guidance_scale: must be >= 0, got {v}")
        return v

    def strength_check(v):
        if not (math.isfinite(v) and 0 < v <= 1):
            raise RowError(f"strength: must be in (0, 1], got {v}")
        return v

    def scheduler_check(v):
        if v not in samplers.NAMES:
            raise RowError(f"scheduler: unknown {show(v)}, one of {', '.join(samplers.NAMES)}")
        return v

    def seed_check(v):
        if v == -1:
            return v
        if not 0 <= v <= MAX_SEED:
            raise RowError(f"seed: must be -1 or in [0, 2**64), got {v}")
        return v

    warnings: list[str] = []
    image = _source(raw, "image", errors)
    _source(raw, "mask", errors)
    member = MEMBERS[rules.model]
    if not member.takes_image:
        for name in IMAGE_COLUMNS:
            if raw.get(name) is not None:
                errors.append(
                    f"{name}: {member.name} is text-to-image only, got {show(raw.get(name))}"
                )
    elif member.needs_mask:
        for name in IMAGE_COLUMNS:
            if raw.get(name) is None:
                errors.append(f"{name}: missing (null), {member.name} needs image and mask")
    elif raw.get(schema.MASK) is not None:
        # The mask-taking member of this row's own family (Kandinsky 3 or 2.2).
        masked = ", ".join(members_with(needs_mask=True, family=member.family))
        errors.append(f"mask: only {masked} takes a mask, got {show(raw.get('mask'))}")
    has_image = image is not None and member.takes_image

    if has_image:
        # The size follows the input image (the reference's resize); an explicit size is
        # checked against it once the image is read (PrepareImagesStage).
        out[schema.WIDTH] = (
            None if raw.get(schema.WIDTH) is None else field("width", _as_int, side("width"))
        )
        out[schema.HEIGHT] = (
            None if raw.get(schema.HEIGHT) is None else field("height", _as_int, side("height"))
        )
    else:
        out[schema.WIDTH] = field("width", _as_int, side("width"))
        out[schema.HEIGHT] = field("height", _as_int, side("height"))

    # A member without guidance or with fixed timesteps: per-row values are reported, not used.
    unused = []
    if not member.guided:
        unused += [("negative_prompt", None), ("guidance_scale", 0.0)]
    if member.fixed_timesteps:
        unused += [("num_inference_steps", member.steps), ("scheduler", samplers.REFERENCE)]
    why = ", ".join(
        ([] if member.guided else ["no guidance"])
        + ([f"{member.steps} fixed steps"] if member.fixed_timesteps else [])
    )
    for name, used in unused:
        value = raw.get(name)
        if value is not None and value != used and not (name == "negative_prompt" and not value):
            warnings.append(f"{name}: ignored by {member.name} ({why}), got {show(value)}")
    if member.fixed_timesteps:
        out[schema.NUM_INFERENCE_STEPS] = member.steps
    else:
        out[schema.NUM_INFERENCE_STEPS] = field("num_inference_steps", _as_int, steps)
    if not member.guided:
        out[schema.NEGATIVE_PROMPT] = None
        out[schema.GUIDANCE_SCALE] = None
    else:
        out[schema.GUIDANCE_SCALE] = field("guidance_scale", _as_float, guidance)

    # Flash rows record "reference": they run the reference's Flash steps.
    out[schema.SCHEDULER] = samplers.REFERENCE
    if member.family == KANDINSKY22:
        value = raw.get(schema.SCHEDULER)
        if value is not None and value != samplers.REFERENCE:
            warnings.append(
                f"scheduler: ignored by {member.name} (its own diffusers schedulers), "
                f"got {show(value)}"
            )
    elif not member.fixed_timesteps:
        out[schema.SCHEDULER] = field("scheduler", _as_text, scheduler_check)

    out[schema.STRENGTH] = None
    image_to_image = has_image and member.image_input == "optional"
    if raw.get(schema.STRENGTH) is not None and not image_to_image:
        takers = ", ".join(
            members_with(image_input="optional", needs_hint=False, family=member.family)
        )
        warnings.append(
            f"strength: ignored, only image-to-image rows ({takers} with an image) use it, got {show(raw.get('strength'))}"
        )
    elif image_to_image:
        out[schema.STRENGTH] = field("strength", _as_float, strength_check)

    _kandinsky22_fields(raw, member, rules, has_image, field, out, errors, warnings)
    _controlnet_fields(raw, rules, field, out, errors, warnings)
    _ip_adapter_fields(raw, rules, field, out, errors, warnings)

    try:
        images = images_of(raw.get(schema.NUM_IMAGES_PER_PROMPT), rules)
    except RowError as e:
        errors.append(str(e))
        images = None
    out[schema.NUM_IMAGES_PER_PROMPT] = images

    drawn = False
    if raw.get(schema.SEED) is None:
        drawn = rules.seed == -1
        seed = pick_seed() if drawn else derive_seed(rules.seed, out[schema.ID])
    else:
        seed = field("seed", _as_int, seed_check)
        if seed == -1:
            drawn, seed = True, pick_seed()
    out[schema.SEED] = seed
    # Image k's seed: seed + k, or its own draw for a random seed; all recorded per record.
    seeds = None
    if seed is not None and images is not None:
        if drawn:
            seeds = [seed] + [pick_seed() for _ in range(images - 1)]
        elif seed + images - 1 > MAX_SEED:
            errors.append(
                f"seed: {seed} + num_images_per_prompt - 1 is above 2**64 - 1, got {seed}"
            )
        else:
            seeds = [seed + k for k in range(images)]
    out[schema.IMAGE_SEEDS] = seeds

    out[schema.STATUS] = STATUS_ERROR if errors else STATUS_OK
    out[schema.ERROR] = "; ".join(errors) if errors else None
    out[schema.WARNING] = "; ".join(warnings) if warnings else None
    return out


def _controlnet_fields(raw, rules, field, out, errors, warnings) -> None:
    """The Kandinsky 3 ControlNet settings of a hinted row: scale >= 0, 0 <= start < end <= 1;
    a warning (ignored) on a row without a hint or a job without model.controlnet."""
    names = schema.CONTROLNET_COLUMNS
    # Recorded only on rows the ControlNet conditions: a plain row's record shows no scale.
    hinted = raw.get(schema.HINT) is not None
    if not (rules.controlnet and hinted):
        why = "without model.controlnet" if not rules.controlnet else "the row has no hint"
        for name in names:
            out[name] = None
            if raw.get(name) is not None:
                warnings.append(f"{name}: ignored, {why}, got {show(raw.get(name))}")
        return

    def unit(name):
        def check(v):
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise RowError(f"{name}: must be in [0, 1], got {v}")
            return v

        return check

    def scale_check(v):
        if not (math.isfinite(v) and v >= 0):
            raise RowError(
                f"{schema.CONTROLNET_CONDITIONING_SCALE}: must be finite and >= 0, got {v}"
            )
        return v

    scale, start, end = names
    out[scale] = field(scale, _as_float, scale_check)
    out[start] = field(start, _as_float, unit(start))
    out[end] = field(end, _as_float, unit(end))
    if out[start] is not None and out[end] is not None and not out[start] < out[end]:
        errors.append(f"{start}: must be < {end} ({out[end]}), got {out[start]}")
        out[start] = None


def _ip_adapter_fields(raw, rules, field, out, errors, warnings) -> None:
    """A row's image prompts (`ip_images`: a non-empty list of {image, weight}) and the
    adapter's scale (finite, >= 0; recorded only on rows with images); without
    model.ip_adapter, images are an error and a scale is ignored with a warning."""
    items = raw.get(schema.IP_IMAGES)
    scale_given = raw.get(schema.IP_ADAPTER_SCALE)
    out[schema.IP_ADAPTER_SCALE] = None
    if not rules.ip_adapter:
        if items is not None:
            errors.append(
                f"{schema.IP_IMAGES}: image prompts need model.ip_adapter ({BASE} with the "
                f"IP-Adapter), got {show(items)}"
            )
        if scale_given is not None:
            warnings.append(
                f"{schema.IP_ADAPTER_SCALE}: ignored without model.ip_adapter, got "
                f"{show(scale_given)}"
            )
        return
    if items is None:
        if scale_given is not None:
            warnings.append(
                f"{schema.IP_ADAPTER_SCALE}: ignored, the row has no {schema.IP_IMAGES}, got "
                f"{show(scale_given)}"
            )
        return
    for where, item in _items(items, schema.IP_IMAGES, "{image, weight}", errors):
        if item.get(schema.IP_IMAGE) is None:
            errors.append(f"{where}.image: missing (null), got {show(item)}")
        else:
            _source(item, schema.IP_IMAGE, errors, where=f"{where}.image")
        # A missing weight is 1.0, as the fork weighs a single image.
        _weight(item.get(schema.IP_WEIGHT), where, errors, optional=True)

    def scale_check(v):
        if not (math.isfinite(v) and v >= 0):
            raise RowError(f"{schema.IP_ADAPTER_SCALE}: must be finite and >= 0, got {v}")
        return v

    out[schema.IP_ADAPTER_SCALE] = field(schema.IP_ADAPTER_SCALE, _as_float, scale_check)


def _kandinsky22_fields(raw, member, rules, has_image, field, out, errors, warnings) -> None:
    """The prior's settings, the depth `hint` and the image `mix` of a row (Kandinsky 2.2);
    on a member that has no use for them, a warning (settings) or an error (inputs)."""
    k22 = member.family == KANDINSKY22
    for name, parse in (
        (schema.PRIOR_NUM_INFERENCE_STEPS, _as_int),
        (schema.PRIOR_GUIDANCE_SCALE, _as_float),
    ):
        out[name] = None
        if not k22:
            if raw.get(name) is not None:
                warnings.append(
                    f"{name}: ignored by {member.name} (no prior), got {show(raw.get(name))}"
                )
            continue

        def check(v, name=name):
            if name == schema.PRIOR_NUM_INFERENCE_STEPS:
                # diffusers' UnCLIPScheduler divides by (steps - 1).
                if not 2 <= v <= rules.max_num_inference_steps:
                    raise RowError(
                        f"{name}: must be in [2, limits.max_num_inference_steps="
                        f"{rules.max_num_inference_steps}], got {v}"
                    )
            elif not (math.isfinite(v) and v >= 0):
                raise RowError(f"{name}: must be finite and >= 0, got {v}")
            return v

        out[name] = field(name, parse, check)

    hint = _source(raw, schema.HINT, errors)
    hinted = ", ".join(members_with(needs_hint=True))
    if raw.get(schema.HINT) is not None and not (member.needs_hint or rules.controlnet):
        errors.append(
            f"hint: only {hinted} takes a depth hint, or {BASE} with model.controlnet an "
            f"edge hint; got {show(raw.get(schema.HINT))}"
        )
    elif member.needs_hint and hint is None and raw.get(schema.HINT) is None:
        if not has_image:
            errors.append(
                f"hint: missing (null), {member.name} needs a `hint` depth image, or an `image` "
                "to estimate it from"
            )
        elif not rules.depth_estimator:
            errors.append(
                f"hint: missing (null), and no model.depth_estimator to estimate it from "
                f"`image`; {member.name} needs one of them"
            )

    mix = raw.get(schema.MIX)
    if mix is None:
        return
    if member.name != K22:
        errors.append(f"mix: only {K22} mixes images and prompts, got {show(mix)}")
        return
    for where, item in _items(mix, schema.MIX, "{prompt | image, weight}", errors):
        prompt, image = item.get(schema.MIX_PROMPT), item.get(schema.MIX_IMAGE)
        if (prompt is None) == (image is None):
            which = "both prompt and image" if prompt is not None else "neither prompt nor image"
            errors.append(f"{where}: {which}, give one, got {show(item)}")
        elif prompt is not None and not (isinstance(prompt, str) and _visible(prompt)):
            errors.append(f"{where}.prompt: expected visible text, got {show(prompt)}")
        elif image is not None:
            _source(item, schema.MIX_IMAGE, errors, where=f"{where}.image")
        _weight(item.get(schema.MIX_WEIGHT), where, errors)


def _items(value, name: str, shape: str, errors: list[str]):
    """(`name[j]`, item) of a non-empty list of dicts (`mix`, `ip_images`); the list's or an
    item's error, naming it, otherwise."""
    if not isinstance(value, (list, tuple)) or not value:
        errors.append(f"{name}: expected a non-empty list of {shape}, got {show(value)}")
        return
    for j, item in enumerate(value):
        if isinstance(item, dict):
            yield f"{name}[{j}]", item
        else:
            errors.append(f"{name}[{j}]: expected {shape}, got {show(item)}")


def _weight(weight, where: str, errors: list[str], optional: bool = False) -> None:
    """An item's `weight`: a finite number (or null when `optional`)."""
    if weight is None and optional:
        return
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        errors.append(f"{where}.weight: expected a number, got {show(weight)}")
    elif not math.isfinite(weight):
        errors.append(f"{where}.weight: must be finite, got {show(weight)}")


def _source(raw: dict, name: str, errors: list[str], where: str | None = None):
    """An image or mask column's value: a non-empty URI string or non-empty raw bytes.
    `where`: how errors name it (default `name`)."""
    value = raw.get(name)
    name = where or name
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if not value:
            errors.append(f"{name}: empty bytes")
            return None
        return value
    if isinstance(value, str):
        if not value.strip():
            errors.append(f"{name}: empty URI, got {show(value)}")
            return None
        return value
    errors.append(f"{name}: expected a URI or raw bytes, got {show(value)}")
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_UNSAFE_NO_DOTS = re.compile(r"[^A-Za-z0-9_-]")
_HASHED = re.compile(r"-h[0-9a-f]{16}$")
MAX_KEY_CHARS = 120


def object_key(row_id: str, dots: bool = True) -> str:
    """A file-name-safe key for an id: never escapes the output prefix, and injective.

    Ids made only of [A-Za-z0-9._-] (not starting with '.') are kept as they are. Others are
    sanitised, cut, and suffixed with a hash of the original id, so two ids never share a key.
    `dots=False` also treats '.' as unsafe: webdataset splits a tar member name at its first
    dot into sample key and field, so a key there must not hold one.
    """
    safe = (_UNSAFE if dots else _UNSAFE_NO_DOTS).sub("_", row_id)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == row_id and len(safe) <= MAX_KEY_CHARS and safe and not _HASHED.search(safe):
        return safe
    digest = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{safe[: MAX_KEY_CHARS - 18]}-h{digest}"
