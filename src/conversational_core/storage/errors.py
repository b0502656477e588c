"""What a store raises. Nothing here knows HTTP: the web layer maps these to statuses in one
table (`conversational_core.errors`), the worker and the event readers decide for themselves.

Messages are written so that they can be shown to a client as they are ("Message not found.").
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """Every error a store raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(StoreError):
    """The object does not exist, or belongs to someone else (never said which)."""


class AlreadyExists(StoreError):
    """An object with this id exists already (a caller bug: ids are generated fresh)."""


class StaleVersion(StoreError):
    """The object changed since the version the caller based its change on."""

    def __init__(
        self, message: str = "The resource changed since the ETag given in If-Match."
    ) -> None:
        super().__init__(message)


class IdempotencyMismatch(StoreError):
    """An Idempotency-Key used again with a different request."""

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different request body.")


class UnknownAnchor(StoreError):
    """The message a page is anchored at (`after`/`before`) is not on the listed branch."""

    def __init__(self) -> None:
        super().__init__(
            "The message given in after/before is not on the listed branch (or not in this "
            "conversation)."
        )


class UnknownMessage(StoreError):
    """A message id given in a request (`field`, e.g. a body's `parent_id`) is not a message
    of the conversation."""

    def __init__(self, field: str, location: str = "body") -> None:
        super().__init__(f"{field} is not a message of this conversation.")
        self.field = field
        self.location = location


class Busy(StoreError):
    """A reply of the conversation is pending or being written, and its `on_busy` setting is
    "reject"."""

    def __init__(self) -> None:
        super().__init__(
            "A reply is being written in this conversation, which refuses new messages until"
            " it ends (on_busy is reject)."
        )


class BranchChanged(StoreError):
    """A branch being copied (a fork) lost a message meanwhile: a conflict, to try again."""

    def __init__(self) -> None:
        super().__init__("The branch changed while it was copied; fork it again.")


class Changed(StoreError):
    """A compare-and-set found the message changed since it was read."""

    def __init__(self) -> None:
        super().__init__("The message changed meanwhile.")


class ReplyStopped(StoreError):
    """A reply was stopped (stop_reply) and not yet cancelled: it must not start again. `parts`
    are what its deltas published before the stop (models.Part dicts)."""

    def __init__(self, parts: list[dict[str, Any]] | None) -> None:
        super().__init__("The reply was stopped.")
        self.parts = parts


class Unavailable(StoreError):
    """The store cannot serve right now (down, restarting, failing over, out of memory…);
    retry after `retry_after` seconds. Never a bug of the caller."""

    def __init__(self, retry_after: int = 2, reason: str = "") -> None:
        super().__init__("The store is unavailable; retry shortly.")
        self.retry_after = retry_after
        self.reason = reason  # for operators' logs: e.g. the store's error code (WRONGPASS)


def describe(exc: BaseException) -> str:
    """An exception as a log line names it: its type, and an outage's reason."""
    reason = getattr(exc, "reason", "") if isinstance(exc, Unavailable) else ""
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
