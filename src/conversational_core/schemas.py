"""Schema pieces shared by the conversation and message resources."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512

MetadataValue = str | int | float | bool | None


def _check_metadata(value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
    for key, item in value.items():
        if not key or len(key) > METADATA_MAX_KEY_CHARS:
            raise ValueError(f"keys must have 1-{METADATA_MAX_KEY_CHARS} characters")
        if isinstance(item, str) and len(item) > METADATA_MAX_VALUE_CHARS:
            raise ValueError(
                f"string values must have at most {METADATA_MAX_VALUE_CHARS} characters"
            )
    return value


# A flat JSON object: up to 16 keys, values are strings (<= 512 chars), numbers, booleans or null.
Metadata = Annotated[dict[str, MetadataValue], AfterValidator(_check_metadata)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are an error (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# Ids in paths: what this service issues (UUIDs); anything else cannot exist.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
