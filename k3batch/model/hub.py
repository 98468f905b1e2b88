"""Hugging Face Hub repo ids: how a model path that is not a local folder or file is told
apart from a typo. Torch-free."""

from __future__ import annotations

import os
import re

# `owner/name`, as the Hub spells them.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(path: str) -> bool:
    """Whether `path` has the shape of a Hub repo id (whether or not a local path too)."""
    return bool(REPO_ID.match(path))


def is_hub_id(path: str) -> bool:
    """A Hub repo id that is not also a local path."""
    return looks_like_repo_id(path) and not os.path.exists(path)
