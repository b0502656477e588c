"""Timestamps of stored records (storage/models.py:utcnow): RFC 3339 in UTC with microseconds,
now, whatever second it is (the date and time are rendered once a second)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from conversational_core.storage import models
from conversational_core.storage.models import rfc3339_to_ms, utcnow

_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_utcnow_is_now_in_rfc3339_with_microseconds() -> None:
    before = datetime.now(UTC)
    stamp = utcnow()
    after = datetime.now(UTC)
    assert _FORMAT.fullmatch(stamp), stamp
    assert before <= datetime.fromisoformat(stamp) <= after
    assert utcnow() >= stamp  # (same length: text order is time order)


@pytest.mark.parametrize(
    ("nanos", "expected"),
    [
        (1_764_547_199_999_999_000, "2025-11-30T23:59:59.999999Z"),
        (1_764_547_200_000_000_000, "2025-12-01T00:00:00.000000Z"),  # the next second, day
        (1_764_547_200_000_042_999, "2025-12-01T00:00:00.000042Z"),  # (truncated, not rounded)
        (951_782_400_500_000_000, "2000-02-29T00:00:00.500000Z"),  # back in time: re-rendered
    ],
)
def test_utcnow_renders_each_second_and_its_microseconds(
    monkeypatch: pytest.MonkeyPatch, nanos: int, expected: str
) -> None:
    monkeypatch.setattr(models.time, "time_ns", lambda: nanos)
    assert utcnow() == expected
    assert rfc3339_to_ms(expected) == nanos // 1_000_000
