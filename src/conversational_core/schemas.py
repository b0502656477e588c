"""Schema pieces shared by the conversation and message resources."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, WithJsonSchema

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what JSON encoders (orjson) and clients can hold

MetadataValue = str | int | float | bool | None


def _check_metadata(value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
    for key, item in value.items():
        if not key or len(key) > METADATA_MAX_KEY_CHARS:
            raise ValueError(f"keys must have 1-{METADATA_MAX_KEY_CHARS} characters")
        if isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
            raise ValueError("integers must fit in 64 bits")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
        if isinstance(item, str) and len(item) > METADATA_MAX_VALUE_CHARS:
            raise ValueError(
                f"string values must have at most {METADATA_MAX_VALUE_CHARS} characters"
            )
    return value


_METADATA_SCHEMA = {
    "type": "object",
    "description": f"A flat JSON object: at most {METADATA_MAX_KEYS} keys of 1-"
    f"{METADATA_MAX_KEY_CHARS} characters; values are strings (at most "
    f"{METADATA_MAX_VALUE_CHARS} characters), 64-bit integers, numbers, booleans or null.",
    "maxProperties": METADATA_MAX_KEYS,
    "propertyNames": {"minLength": 1, "maxLength": METADATA_MAX_KEY_CHARS},
    "additionalProperties": {
        "anyOf": [
            {"type": "string", "maxLength": METADATA_MAX_VALUE_CHARS},
            {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
            {"type": "number", "not": {"type": "integer"}},  # (integers: the bounds above)
            {"type": "boolean"},
            {"type": "null"},
        ]
    },
}

# A flat JSON object: up to 16 keys, values are strings (<= 512 chars), numbers, booleans or null.
Metadata = Annotated[
    dict[str, MetadataValue], AfterValidator(_check_metadata), WithJsonSchema(_METADATA_SCHEMA)
]
# As answers carry it (what was accepted: the same shape).
MetadataOut = Annotated[dict[str, MetadataValue], WithJsonSchema(_METADATA_SCHEMA)]


def omitted_when_unset(schema: dict[str, Any]) -> None:
    """`json_schema_extra` of an answer's field that is left out when it has no value (never
    sent as null): not nullable, no default (generators make a field with a default
    required, and one that may be null `T | null`)."""
    schema.pop("default", None)
    branches = schema.get("anyOf")
    if branches:
        kept = [branch for branch in branches if branch.get("type") != "null"]
        if len(kept) == 1:
            del schema["anyOf"]
            schema.update(kept[0])


def json_integer(value: Any) -> Any:
    """1.0 is an integer to JSON Schema (and to clients whose numbers are all floats): read as
    1. Bodies are validated strictly (routing.py): strings and booleans stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field of a request body.
JsonInt = Annotated[int, BeforeValidator(json_integer)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are an error (a typo must not pass silently); no NaN or
    infinity (JSON has neither)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, allow_inf_nan=False)


# A model's name as providers spell them (`gpt-4o`, `meta-llama/Llama-3-8B`, `qwen2.5:7b`):
# printable, no line breaks or other control characters (it goes into requests and logs).
MODEL_PATTERN = r"^[^\x00-\x1f\x7f]+$"

# Ids in paths: what this service issues (UUIDs); anything else cannot exist.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
