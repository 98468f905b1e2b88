"""Seeds and images per row: a row's seed (its own, derived from the job's seed and its id,
or drawn), how many images it asks for, and each image's seed."""

from __future__ import annotations

import hashlib
import secrets

from k3batch import schema
from k3batch.rows.values import RowError, as_int

MAX_SEED = 2**64 - 1


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
    seed = as_int(schema.SEED, value)
    if seed == -1:
        return pick_seed()
    if not 0 <= seed <= MAX_SEED:
        raise RowError(f"seed: must be -1 or in [0, 2**64), got {seed}")
    return seed


def images_of(value, rules) -> int:
    """A row's number of images: its `num_images_per_prompt` value, or the job's default.

    Raises RowError for a bad value. The checkpoint filter and the accounting count a row
    with a bad value as one record (its error record), as GenerateStage writes it.
    """
    if value is None:
        return rules.num_images_per_prompt
    n = as_int(schema.NUM_IMAGES_PER_PROMPT, value)
    if n < 1:
        raise RowError(f"num_images_per_prompt: must be >= 1, got {n}")
    if n > rules.max_num_images_per_prompt:
        raise RowError(
            f"num_images_per_prompt: {n} is above "
            f"limits.max_num_images_per_prompt={rules.max_num_images_per_prompt}"
        )
    return n


def records_of(value, rules) -> int:
    """How many records a row yields: its number of images, 1 when that value is bad."""
    try:
        return images_of(value, rules)
    except RowError:
        return 1


def images_and_seeds(row) -> None:
    """The row's number of images and its seed; image k's seed is seed + k, or its own draw
    for a random seed; all recorded per record."""
    out, errors = row.out, row.errors
    try:
        images = images_of(row.raw.get(schema.NUM_IMAGES_PER_PROMPT), row.rules)
    except RowError as e:
        errors.append(str(e))
        images = None
    out[schema.NUM_IMAGES_PER_PROMPT] = images

    def check(v):
        if v == -1:
            return v
        if not 0 <= v <= MAX_SEED:
            raise RowError(f"seed: must be -1 or in [0, 2**64), got {v}")
        return v

    drawn = False
    if row.raw.get(schema.SEED) is None:
        drawn = row.rules.seed == -1
        seed = pick_seed() if drawn else derive_seed(row.rules.seed, out[schema.ID])
    else:
        seed = row.field("seed", as_int, check)
        if seed == -1:
            drawn, seed = True, pick_seed()
    out[schema.SEED] = seed
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
