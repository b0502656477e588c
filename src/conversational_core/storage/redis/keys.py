"""Every Redis key of the service, in one place: the store, the job queue, the event hub, the
rate limiter and the benchmarks all name keys through :class:`Keys`.

`P` is REDIS_KEY_PREFIX. `{…}` is a Redis Cluster hash tag: every key of one conversation shares
`{cid}`, so that they live in one slot and every multi-key write is one Lua script there.

    P:{cid}:c          hash    user, data (JSON of the conversation's settings), updated_at,
                               count (messages), seq (last position given), version
    P:{cid}:m          hash    message id -> message JSON (without `id` and `conversation_id`)
    P:{cid}:i          zset    message id scored by its position (seq) in the conversation
    P:{cid}:e          stream  the conversation's events (bounded: MAXLEN ~ and a TTL)
    P:{cid}:q          list    ids of the replies still to write, oldest first
    P:{cid}:l          string  the lease of the worker writing the conversation's replies
    P:{cid}:x:<mid>    string  "stop" flag of a reply that ended or was cancelled
    P:{cid}:p:<mid>    string  the text a reply's deltas published so far
    P:{cid}:a:<mid>    string  the attempt allowed to publish deltas for the reply
    P:{cid}:k:<s>:<k>  string  idempotency record of an append (scope s: the caller)
    P:{u:uid}:convs    zset    the user's conversation ids scored by last activity (ms)
    P:{u:uid}:k:<key>  string  idempotency record of a conversation creation
    P:{jobs}:s         stream  job signals (conversation ids) for the workers (queue.py)
    P:{jobs}:s:sweep   string  who sweeps for lost signals this period (queue.py)
    P:{rl:<s>:<id>}:<n>/<w>  string  a rate-limit counter (limiter.py)
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:{{jobs}}:s"
        self.sweep_lock = f"{self.jobs}:sweep"

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

    def append_idempotency(self, cid: str, scope: str, key: str) -> str:
        return f"{self.prefix}:{{{cid}}}:k:{scope}:{key}"

    # A user's keys.

    def user_conversations(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:convs"

    def create_idempotency(self, user_id: str, key: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:k:{key}"

    # Rate limits (a counter per scope, identity and rate, in its own slot).

    def rate(self, scope: str, identity: str, amount: int, seconds: int) -> str:
        return f"{self.prefix}:{{rl:{scope}:{identity}}}:{amount}/{seconds}"


def conversation_of(key: str) -> str:
    """The conversation id in one of its keys (its hash tag)."""
    start = key.index("{") + 1
    return key[start : key.index("}", start)]
