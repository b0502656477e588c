"""What a subscription hands over instead of events that are no longer retained (both hubs)."""

from __future__ import annotations

from conversational_core.storage import events
from conversational_core.storage.base import Event


def resync_event(conversation_id: str, after: str, newest: Event | None, at: str) -> Event:
    """For a client whose events after `after` are gone (EventHub.subscribe): the
    conversation's deletion when that is its newest event (it says more, and ends the stream:
    deleting empties the stream but for it), else `conversation.resync` with the id `at` (the
    newest event's, or `after` when none is retained)."""
    if newest is not None and newest.type == events.CONVERSATION_DELETED:
        return newest
    return Event(at, events.CONVERSATION_RESYNC, events.resync_data(conversation_id, after))
