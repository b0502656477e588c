"""Which Redis failures mean "not now": the one table every Redis path consults.

A deployment meets these conditions as a matter of course: a restart (connection refused, then
`LOADING` while the dataset is read back), a frozen or overloaded server (timeouts, `BUSY` while
a script runs long), a failover (`READONLY` and `MASTERDOWN` from a demoted primary, `MOVED`,
`ASK`, `TRYAGAIN` and `CLUSTERDOWN` on a cluster), memory or disk trouble (`OOM`, `MISCONF`),
too few replicas (`NOREPLICAS`) or too many clients. None of them is a bug of the request: each
is raised as `storage.errors.Unavailable` (a 503 with `Retry-After` over HTTP), the worker and
the event readers back off and carry on, and the service recovers by itself once Redis does.

Every other error is a bug (a script error, a wrong type) and surfaces as one.

Redis rejects a command with one of these replies before running it, with one exception: a
script can meet `OOM` or `READONLY` on a write after earlier writes of its own. Our scripts check
everything before their first write, so that case needs the server to change state during one
script, which Redis does not do (scripts are atomic). Nothing here retries a write by itself: a
client retries with its Idempotency-Key. redis-py's own retries (a lost connection or `LOADING`
on a single server; a failover on a cluster) happen before a command has run.
"""

from __future__ import annotations

import re
import traceback

from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conversational_core.storage.errors import Unavailable


class ReplyError(Exception):
    """An error reply from Redis read by the fast client (e.g. `NOSCRIPT …`, `LOADING …`)."""


# Error replies, by their first word, and how long a client should wait before trying again
# (seconds, the `Retry-After` of the 503).
TRANSIENT_REPLIES: dict[str, int] = {
    "LOADING": 2,  # reading its dataset back after a restart
    "BUSY": 2,  # a script runs past lua-time-limit
    "MASTERDOWN": 2,  # a replica that lost its primary (replica-serve-stale-data no)
    "READONLY": 2,  # a demoted primary, or a replica: a failover under way
    "OOM": 5,  # maxmemory reached with noeviction: wait for memory to be freed
    "MISCONF": 5,  # RDB snapshots failing with stop-writes-on-bgsave-error
    "NOREPLICAS": 2,  # min-replicas-to-write not met
    "TRYAGAIN": 1,  # a cluster slot being migrated
    "CLUSTERDOWN": 2,  # a cluster without a primary for a slot
    "MOVED": 1,  # redirections that did not settle (slot map changing)
    "ASK": 1,
    # The deployment's credentials do not open the server (a password missing, wrong, or
    # changed under a running service; an ACL that denies a command): nothing a request can
    # fix, and nothing it did wrong. The service cannot serve: 503, /health unavailable.
    "NOAUTH": 5,
    "WRONGPASS": 5,
    "NOPERM": 5,
}
# "ERR max number of clients reached" is the one transient `ERR`; and an `AUTH` sent to a server
# that has no password ("ERR AUTH <password> called without any password configured…").
_TOO_MANY_CLIENTS = "max number of clients reached"
_NO_PASSWORD_SET = "without any password configured"

# What the network and redis-py raise for the same conditions (no reply at all, a timeout,
# a failover redis-py could not ride out, no node to learn a cluster's slot map from).
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError (LOADING) and MaxConnectionsError
    RedisTimeoutError,
    OSError,  # includes the builtin ConnectionError and TimeoutError (the fast client)
    ClusterError,  # CLUSTERDOWN, MASTERDOWN
    TryAgainError,
    RedisClusterException,  # slot not covered, no node reachable
)

DEFAULT_RETRY_AFTER = 2


def _write_on_closed_connection(exc: BaseException) -> bool:
    """redis-py 8.1 lets a write on a connection closed under it (a failover tearing down a
    node's connections, a peer reset) escape as asyncio's AttributeError or TypeError instead
    of its ConnectionError (redis/redis-py#4287, #3546; fixed after the pinned version): a lost
    connection, recognised by where it was raised."""
    if not isinstance(exc, (AttributeError, TypeError)):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return any(frame.filename.endswith("redis/asyncio/connection.py") for frame in frames)


# redis-py's pipelines prefix the error of a command with its place: "Command # 1 (EVALSHA …)
# of pipeline caused error: ('NOREPLICAS Not enough …',)".
_IN_PIPELINE = re.compile(r"^Command # \d+ .* of pipeline caused error: \(?['\"]?(\S+)", re.S)


def reply_code(exc: BaseException) -> str:
    """The first word of an error reply (`LOADING`, `OOM`, …). redis-py strips it from the
    message of the errors it maps to classes and keeps it as `status_code`."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    message = str(exc)
    found = _IN_PIPELINE.match(message)
    return found.group(1) if found else message.split(" ", 1)[0]


def retry_after(exc: BaseException) -> int | None:
    """Seconds to wait when `exc` means Redis cannot serve right now; None when it is a bug."""
    if isinstance(exc, BusyLoadingError):
        return TRANSIENT_REPLIES["LOADING"]
    if isinstance(exc, TRANSIENT_EXCEPTIONS) or _write_on_closed_connection(exc):
        return DEFAULT_RETRY_AFTER
    if not isinstance(exc, (ResponseError, ReplyError)):
        return None
    code = reply_code(exc)
    if code in TRANSIENT_REPLIES:
        return TRANSIENT_REPLIES[code]
    if code == "ERR" and _TOO_MANY_CLIENTS in str(exc):
        return DEFAULT_RETRY_AFTER
    if code == "ERR" and _NO_PASSWORD_SET in str(exc):
        return TRANSIENT_REPLIES["WRONGPASS"]
    return None


def unavailable(exc: BaseException) -> None:
    """Raise Unavailable (from `exc`) when `exc` means Redis cannot serve right now."""
    wait = retry_after(exc)
    if wait is not None:
        # The reason names the condition (a reply's code, or the exception's type), never its
        # message (which may hold addresses).
        reason = (
            reply_code(exc) if isinstance(exc, (ResponseError, ReplyError)) else type(exc).__name__
        )
        raise Unavailable(retry_after=wait, reason=reason) from exc
