"""routing.Operation shares a validated query between requests only when no endpoint could
change it: frozen models, or fields of immutable values."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from conversational_core.routing import _immutable


@pytest.mark.parametrize(
    ("annotation", "immutable"),
    [
        (str, True),
        (int | None, True),
        (Literal["asc", "desc"], True),
        (bool | float | None, True),
        (list[str], False),
        (list[str] | None, False),
        (dict[str, Any], False),
        (Literal["a"] | set[int], False),
    ],
)
def test_only_immutable_query_fields_are_shared(annotation: Any, immutable: bool) -> None:
    assert _immutable(annotation) is immutable
