"""What every section model of the configuration shares (`auth`, `federation`...): no
unknown keys, values frozen once read, and the spelling of a provider's name."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ProviderName = Annotated[str, Field(pattern=NAME_PATTERN)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
