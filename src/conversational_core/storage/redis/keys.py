"""Every Redis key of the service, in one place: the store, the job queue, the event hub, the
rate limiter and the benchmarks all name keys through :class:`Keys`.

`P` is REDIS_KEY_PREFIX. `{…}` is a Redis Cluster hash tag: every key of one conversation shares
`{cid}`, so that they live in one slot and every multi-key write is one Lua script there.

    P:{cid}:c          hash    user, data (JSON of the conversation's settings), updated_at,
                               count (messages), seq (last position given), version, leaf
                               (the active leaf), lin and cut (the tree, below), pv (the
                               page version: a new one with every change of its pages)
    P:{cid}:m          hash    message id -> {"parent_id":…, then the message's JSON from `role`
                               to `context`} (ids and sibling positions are not stored)
    P:{cid}:i          zset    message id scored by its position (seq): creation order
    P:{cid}:b          zset    the active branch past the first chain, scored by position
    P:{cid}:t          hash    message id (or "-" for the roots) -> its children created after
                               the first branch, comma-separated, oldest first
    P:{cid}:f          zset    messages of the first chain that have such children (forks)
    P:{cid}:e          stream  the conversation's events (bounded: MAXLEN ~ and a TTL)
    P:{cid}:q          list    ids of the replies still to write, oldest first
    P:{cid}:l          string  the lease of the worker writing the conversation's replies
    P:{cid}:x:<mid>    string  "stop" flag of a reply that ended or was cancelled
    P:{cid}:p:<mid>    string  the deltas a reply published so far (their event data, a line each)
    P:{cid}:a:<mid>    string  the attempt allowed to publish deltas for the reply
    P:{cid}:k:<s>:<k>  string  idempotency record of an append (scope s: the caller)
    P:{cid}:r          set     the names of those records (deleted with the conversation)
    P:{u:uid}:convs    zset    the user's conversation ids scored by last activity (ms)
    P:{u:uid}:k:<key>  string  idempotency record of a conversation creation
    P:{jobs}:s         stream  job signals (conversation ids) for the workers (queue.py)
    P:{jobs}:s:sweep   string  who sweeps for lost signals this period (queue.py)
    P:{jobs}:due       zset    "<cid> <mid>" scored by when to look at the message again
                               (a reply waiting for tool results: queue.py)
    P:{rl:<s>:<id>}:<n>/<w>  string  a rate-limit counter (limiter.py)

Parts of a key that callers choose (a user id: a token's `sub` or `X-On-Behalf-Of`; the caller
scope of an append's idempotency record) have `%` and `}` percent-encoded (and `:` in a scope):
otherwise a user named `alice}:k:x` would have keys of alice's (her idempotency records, or
her conversation list) and replay or break them. Ids without those characters, which are
nearly all, are written as they are: the keys of existing data are unchanged.

The tree costs nothing until a conversation branches: its messages form one chain in creation
order (the parent of each is the one before it), which `i` already is. At the first branch
(an edit, a regenerate, a new root) `lin` records the chain's last position; from then on a
message's children are the next one on that chain (for chain messages) and those listed in
`t`. The active branch is the chain's messages up to position `cut`, then `b`. So a branch page
is two range reads, an append is a few O(log N) writes, and a switch rewrites only the part of
`b` that changes (lua/tree.lua has the algorithms). Documents written before trees existed have
no `parent_id`: they are all on the first chain.
"""

from __future__ import annotations

_ESCAPE = str.maketrans({"%": "%25", "}": "%7D"})
_ESCAPE_SCOPE = str.maketrans({"%": "%25", "}": "%7D", ":": "%3A"})


def _part(text: str) -> str:
    """A key part chosen by a caller, unable to end a hash tag or stand for another's."""
    return text.translate(_ESCAPE) if "%" in text or "}" in text else text


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:{{jobs}}:s"
        self.sweep_lock = f"{self.jobs}:sweep"
        self.deadlines = f"{prefix}:{{jobs}}:due"

    # A conversation's keys.

    def of(self, cid: str) -> str:
        """What every key of the conversation starts with."""
        return f"{self.prefix}:{{{cid}}}:"

    def conversation(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:c"

    def messages(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:m"

    def index(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:i"

    def branch(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:b"

    def tree(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:t"

    def forks(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:f"

    def tree_keys(self, cid: str) -> list[str]:
        """The first keys of every script of lua/: c, m, i, b, t, f."""
        tag = f"{self.prefix}:{{{cid}}}:"
        return [tag + "c", tag + "m", tag + "i", tag + "b", tag + "t", tag + "f"]

    def events(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:e"

    def replies(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:q"

    def lease(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:l"

    def stopped(self, cid: str, mid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:x:{mid}"

    def published(self, cid: str, mid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:p:{mid}"

    def attempt(self, cid: str, mid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:a:{mid}"

    def records(self, cid: str) -> str:
        return f"{self.prefix}:{{{cid}}}:r"

    def append_idempotency(self, cid: str, scope: str, key: str) -> str:
        return f"{self.prefix}:{{{cid}}}:k:{scope.translate(_ESCAPE_SCOPE)}:{key}"

    # A user's keys.

    def user_conversations(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{_part(user_id)}}}:convs"

    def create_idempotency(self, user_id: str, key: str) -> str:
        return f"{self.prefix}:{{u:{_part(user_id)}}}:k:{key}"

    # Rate limits (a counter per scope, identity and rate, in its own slot).

    def rate(self, scope: str, identity: str, amount: int, seconds: int) -> str:
        return f"{self.prefix}:{{rl:{scope}:{_part(identity)}}}:{amount}/{seconds}"


def conversation_of(key: str) -> str:
    """The conversation id in one of its keys (its hash tag)."""
    start = key.index("{") + 1
    return key[start : key.index("}", start)]
