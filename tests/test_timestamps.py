"""Timestamps of stored records (storage/models.py): utcnow writes RFC 3339 in UTC with
microseconds, now, whatever second it is (the date and time are rendered once a second), and
rfc3339_to_ms reads them back to the exact millisecond (scores of the user's list)."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta

import pytest

from conversational_core.storage.models import rfc3339_to_ms, utcnow

_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    monkeypatch.setattr("conversational_core.storage.models.time.time_ns", lambda: nanos)
    assert utcnow() == expected
    assert rfc3339_to_ms(expected) == nanos // 1_000_000


def test_utcnow_timestamps_read_back_to_the_exact_millisecond() -> None:
    rng = random.Random(7)
    # Many seconds, and microseconds where a float product errs (…:47.001000 read as …:47.000):
    # each read back as the whole milliseconds it was written from.
    for _ in range(3000):
        second = rng.randrange(0, 4_000_000_000)
        micros = rng.choice([0, 999, 1000, 123000, 999999, rng.randrange(1_000_000)])
        at = EPOCH + timedelta(seconds=second, microseconds=micros)
        value = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{micros:06d}Z"
        assert rfc3339_to_ms(value) == second * 1000 + micros // 1000, value


_NOV_24 = 1_795_526_992_000  # 2026-11-24T13:29:52Z in milliseconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-24T13:29:52Z", _NOV_24),
        ("2026-11-24T13:29:52.5Z", _NOV_24 + 500),
        ("2026-11-24T13:29:52.123456+00:00", _NOV_24 + 123),
        ("2026-11-24T14:29:52.123456+01:00", _NOV_24 + 123),
        ("2026-11-24T13:29:52.123", _NOV_24 + 123),  # no zone: UTC
    ],
)
def test_other_forms_are_read_exactly(value: str, expected: int) -> None:
    assert rfc3339_to_ms(value) == expected


@pytest.mark.parametrize("value", ["not a time", "2026-11-24T13:29:5x.123456Z", ""])
def test_garbage_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        rfc3339_to_ms(value)
