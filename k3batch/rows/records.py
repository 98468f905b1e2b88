"""Ids and keys of rows and their records (one record per image): derived ids, checkpoint
hashes, how messages name a record, and file-name-safe keys."""

from __future__ import annotations

import hashlib
import re

from k3batch import schema


def derived_id(row_hash: int) -> str:
    return f"{int(row_hash):016x}"


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
