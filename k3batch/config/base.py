"""What every config section shares: the strict base model and the one-line error."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Dtype = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field and the value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
