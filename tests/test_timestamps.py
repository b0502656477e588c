"""Timestamps: what utcnow writes and rfc3339_to_ms reads back (scores of the user's list)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from conversational_core.storage.models import rfc3339_to_ms, utcnow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _exact_ms(value: str) -> int:
    """Milliseconds by integer arithmetic on the parsed moment (truncated)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment - EPOCH) // timedelta(milliseconds=1)


def test_utcnow_timestamps_read_back_to_the_exact_millisecond() -> None:
    rng = random.Random(7)
    values = [utcnow()]
    # Many seconds, and microseconds where a float product errs (…:47.001000 read as …:47.000).
    for _ in range(3000):
        second = rng.randrange(0, 4_000_000_000)
        micros = rng.choice([0, 999, 1000, 123000, 999999, rng.randrange(1_000_000)])
        at = EPOCH + timedelta(seconds=second, microseconds=micros)
        values.append(at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{micros:06d}Z")
    for value in values:
        assert rfc3339_to_ms(value) == _exact_ms(value), value
    # The same second again, after others: not a stale cached second.
    assert rfc3339_to_ms("2026-01-01T00:00:00.001000Z") == _exact_ms("2026-01-01T00:00:00.001000Z")
    assert rfc3339_to_ms("2026-01-01T00:00:01.000000Z") == _exact_ms("2026-01-01T00:00:01.000000Z")


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-24T13:29:52Z",
        "2026-11-24T13:29:52.5Z",
        "2026-11-24T13:29:52.123456+00:00",
        "2026-11-24T14:29:52.123456+01:00",
        "2026-11-24T13:29:52.123",  # no zone: UTC
    ],
)
def test_other_forms_are_read_exactly(value: str) -> None:
    expected = _exact_ms(value if value[-1] == "Z" or "+" in value[19:] else value + "Z")
    assert rfc3339_to_ms(value) == expected


@pytest.mark.parametrize("value", ["not a time", "2026-11-24T13:29:5x.123456Z", ""])
def test_garbage_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        rfc3339_to_ms(value)
