"""The conversation tree, as every store backend must keep it (Redis, Redis Cluster, embedded).

Besides the cases one by one, a random walk of tree operations is checked step by step against a
model of the tree written in plain Python (`TreeModel`): appends under any parent, new roots,
switches, deletes of subtrees, pages of any branch. A tree that starts as a long single branch and
is then edited is the case the stores keep cheaply, so the walk starts that way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import orjson
import pytest

from conversational_core.storage import events as ev
from conversational_core.storage.base import ACTIVE_LEAF, ActiveLeaf, MessageQuery, Store
from conversational_core.storage.errors import (
    Busy,
    NotFound,
    ReplyStopped,
    StaleVersion,
    UnknownAnchor,
    UnknownMessage,
)
from conversational_core.storage.models import Message, MessageStatus, Role, new_id, utcnow
from tests.test_store_contract import conversation, message


def _reply(conversation_id: str) -> Message:
    return message(conversation_id, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)


async def add(
    store: Store,
    cid: str,
    parent: str | ActiveLeaf | None = ACTIVE_LEAF,
    content: str = "m",
    owner: str | None = "alice",
) -> Message:
    [stored] = (
        await store.append_messages(cid, owner, [message(cid, content)], utcnow(), parent=parent)
    ).messages
    return stored


async def chain(
    store: Store, cid: str, n: int, parent: str | ActiveLeaf | None = ACTIVE_LEAF
) -> list[Message]:
    made = [await add(store, cid, parent, "c0")]
    for i in range(1, n):
        made.append(await add(store, cid, made[-1].id, f"c{i}"))
    return made


async def ids(store: Store, cid: str, query: MessageQuery | None = None) -> list[str]:
    page = await store.list_messages(cid, "alice", query or MessageQuery(200))
    return [m.id for m in page.items]


async def active_leaf(store: Store, cid: str) -> str | None:
    return (await store.get_conversation(cid, "alice")).active_leaf_id


# --- One case at a time --------------------------------------------------------------------------


async def test_messages_appended_in_turn_form_one_branch(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    assert conv.active_leaf_id is None
    a = await add(store, conv.id)
    b = await add(store, conv.id)
    appended = await store.append_messages(
        conv.id, "alice", [message(conv.id), _reply(conv.id)], utcnow()
    )
    c, r = appended.messages
    assert (a.parent_id, b.parent_id, c.parent_id, r.parent_id) == (None, a.id, b.id, c.id)
    assert all((m.sibling_count, m.sibling_index) == (1, 0) for m in (a, b, c, r))
    assert await ids(store, conv.id) == [a.id, b.id, c.id, r.id]
    assert await active_leaf(store, conv.id) == r.id
    page = await store.list_messages(conv.id, "alice", MessageQuery(10))
    assert [m.parent_id for m in page.items] == [None, a.id, b.id, c.id]
    assert await store.get_message(conv.id, "alice", c.id) == c
    created = [
        e for e in await store.read_events(conv.id, None, 10) if e.type == ev.MESSAGE_CREATED
    ]
    assert [orjson.loads(e.data)["message"]["parent_id"] for e in created] == [
        None,
        a.id,
        b.id,
        c.id,
    ]


async def test_an_edit_is_a_sibling_and_moves_the_active_branch(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    m1, m2, m3, m4 = await chain(store, conv.id, 4)
    edit = await add(store, conv.id, m2.id, "edited")
    assert edit.parent_id == m2.id
    assert (edit.sibling_count, edit.sibling_index) == (2, 1)
    assert await ids(store, conv.id) == [m1.id, m2.id, edit.id]
    assert await active_leaf(store, conv.id) == edit.id
    old = await store.get_message(conv.id, "alice", m3.id)
    assert (old.sibling_count, old.sibling_index) == (2, 0)
    # The old branch is still there, by its leaf.
    assert await ids(store, conv.id, MessageQuery(10, leaf=m4.id)) == [m1.id, m2.id, m3.id, m4.id]
    siblings = await store.list_siblings(conv.id, "alice", m3.id, 10, -1)
    assert [m.id for m in siblings.items] == [m3.id, edit.id]
    assert [(m.sibling_count, m.sibling_index) for m in siblings.items] == [(2, 0), (2, 1)]
    # Appending now follows the new branch.
    after = await add(store, conv.id)
    assert after.parent_id == edit.id
    event = [e for e in await store.read_events(conv.id, None, 100) if e.type == ev.MESSAGE_CREATED]
    last_edit = orjson.loads(event[-2].data)["message"]
    assert (last_edit["id"], last_edit["sibling_count"], last_edit["sibling_index"]) == (
        edit.id,
        2,
        1,
    )


async def test_a_new_root_is_a_sibling_of_the_first_message(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    m1, _m2 = await chain(store, conv.id, 2)
    root = await add(store, conv.id, None, "again")
    assert root.parent_id is None and (root.sibling_count, root.sibling_index) == (2, 1)
    assert await ids(store, conv.id) == [root.id]
    siblings = await store.list_siblings(conv.id, "alice", root.id, 10, -1)
    assert [m.id for m in siblings.items] == [m1.id, root.id]


async def test_an_unknown_parent_stores_nothing(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    await chain(store, conv.id, 2)
    other, _ = await store.create_conversation(conversation())
    foreign = await add(store, other.id)
    for parent in (new_id(), foreign.id):
        with pytest.raises(UnknownMessage) as raised:
            await add(store, conv.id, parent)
        assert raised.value.field == "parent_id"
    assert (await store.get_conversation(conv.id, "alice")).message_count == 2
    with pytest.raises(NotFound):
        await add(store, conv.id, owner="bob")


async def test_switching_follows_the_newest_child(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    m1, m2, m3, m4 = await chain(store, conv.id, 4)
    x = await add(store, conv.id, m2.id)
    y = await add(store, conv.id, x.id)
    mark = await store.last_event_id(conv.id)

    switched = await store.set_active_leaf(conv.id, "alice", m3.id, conv.version, utcnow())
    assert switched.active_leaf_id == m4.id and switched.version == conv.version + 1
    assert await ids(store, conv.id) == [m1.id, m2.id, m3.id, m4.id]
    [updated] = await store.read_events(conv.id, mark, 10)
    assert updated.type == ev.CONVERSATION_UPDATED
    assert orjson.loads(updated.data)["conversation"]["active_leaf_id"] == m4.id
    assert orjson.loads(updated.data)["conversation"] == orjson.loads(switched.to_json())

    # From m1 the newest child of m2 is x.
    again = await store.set_active_leaf(conv.id, "alice", m1.id, None, utcnow())
    assert again.active_leaf_id == y.id
    assert await ids(store, conv.id) == [m1.id, m2.id, x.id, y.id]
    assert (await store.get_conversation(conv.id, "alice")).active_leaf_id == y.id

    with pytest.raises(StaleVersion):
        await store.set_active_leaf(conv.id, "alice", m4.id, conv.version, utcnow())
    with pytest.raises(UnknownMessage) as raised:
        await store.set_active_leaf(conv.id, "alice", new_id(), None, utcnow())
    assert raised.value.field == "active_leaf_id"
    with pytest.raises(NotFound):
        await store.set_active_leaf(conv.id, "bob", m4.id, None, utcnow())
    assert await ids(store, conv.id) == [m1.id, m2.id, x.id, y.id]


async def test_a_branch_is_paged_like_a_list(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    trunk = await chain(store, conv.id, 6)
    side = await chain(store, conv.id, 7, trunk[2].id)  # trunk[:3] + side: the active branch
    branch = [m.id for m in trunk[:3] + side]
    assert await ids(store, conv.id) == branch

    async def walk(query: MessageQuery) -> list[str]:
        seen: list[str] = []
        page = await store.list_messages(conv.id, "alice", query)
        while True:
            seen.extend(m.id for m in page.items)
            if not page.has_more:
                return seen
            edge = page.seqs[0] if query.backward else page.seqs[-1]
            page = await store.list_messages(
                conv.id,
                "alice",
                MessageQuery(
                    query.limit,
                    query.descending,
                    anchor_seq=edge,
                    backward=query.backward,
                    leaf=query.leaf,
                    everything=query.everything,
                ),
            )

    for limit in (1, 3, 4, 50):
        assert await walk(MessageQuery(limit)) == branch
        assert await walk(MessageQuery(limit, descending=True)) == branch[::-1]
        old = [m.id for m in trunk]
        assert await walk(MessageQuery(limit, leaf=trunk[-1].id)) == old
        assert await walk(MessageQuery(limit, descending=True, leaf=trunk[-1].id)) == old[::-1]
        all_ids = [m.id for m in trunk + side]
        assert await walk(MessageQuery(limit, everything=True)) == all_ids
        assert await walk(MessageQuery(limit, descending=True, everything=True)) == all_ids[::-1]

    after = await store.list_messages(conv.id, "alice", MessageQuery(2, anchor_id=trunk[1].id))
    assert [m.id for m in after.items] == branch[2:4] and after.has_more
    before = await store.list_messages(
        conv.id, "alice", MessageQuery(2, anchor_id=side[1].id, backward=True)
    )
    assert [m.id for m in before.items] == branch[2:4]
    # An anchor that is not on the listed branch.
    with pytest.raises(UnknownAnchor):
        await store.list_messages(conv.id, "alice", MessageQuery(2, anchor_id=trunk[4].id))
    with pytest.raises(UnknownMessage) as raised:
        await store.list_messages(conv.id, "alice", MessageQuery(2, leaf=new_id()))
    assert raised.value.field == "leaf"
    # A branch that ends in the middle: the messages up to its leaf.
    middle = await ids(store, conv.id, MessageQuery(50, leaf=trunk[3].id))
    assert middle == [m.id for m in trunk[:4]]
    everything = await store.list_messages(conv.id, "alice", MessageQuery(50, everything=True))
    assert [m.parent_id for m in everything.items] == [None] + [m.id for m in trunk[:5]] + [
        trunk[2].id
    ] + [m.id for m in side[:6]]
    fork_point = [m for m in everything.items if m.id in (trunk[3].id, side[0].id)]
    assert [(m.sibling_count, m.sibling_index) for m in fork_point] == [(2, 0), (2, 1)]


async def test_siblings_are_paged_by_index(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    root = await add(store, conv.id)
    kids = [await add(store, conv.id, root.id, str(i)) for i in range(5)]
    first = await store.list_siblings(conv.id, "alice", kids[2].id, 2, -1)
    assert [m.id for m in first.items] == [k.id for k in kids[:2]] and first.has_more
    assert first.seqs == [0, 1]
    rest = await store.list_siblings(conv.id, "alice", kids[2].id, 10, 1)
    assert [m.id for m in rest.items] == [k.id for k in kids[2:]] and not rest.has_more
    assert [m.sibling_index for m in rest.items] == [2, 3, 4]
    assert {m.sibling_count for m in rest.items} == {5}
    alone = await store.list_siblings(conv.id, "alice", root.id, 10, -1)
    assert [m.id for m in alone.items] == [root.id]
    with pytest.raises(NotFound):
        await store.list_siblings(conv.id, "alice", new_id(), 10, -1)
    with pytest.raises(NotFound):
        await store.list_siblings(conv.id, "bob", root.id, 10, -1)


async def test_deleting_takes_the_subtree_and_moves_the_active_branch(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    m1, m2, m3, m4 = await chain(store, conv.id, 4)
    x = await add(store, conv.id, m2.id)
    y = await add(store, conv.id, x.id)
    await store.set_active_leaf(conv.id, "alice", m3.id, None, utcnow())  # back to m1..m4
    mark = await store.last_event_id(conv.id)

    # Off the active branch: nothing moves.
    deleted = await store.delete_message(conv.id, "alice", x.id)
    assert deleted.message.id == x.id and deleted.deleted_ids == [x.id, y.id]
    assert deleted.conversation is None
    [gone] = await store.read_events(conv.id, mark, 10)
    assert gone.type == ev.MESSAGE_DELETED
    assert orjson.loads(gone.data) == {"message_id": x.id, "deleted_message_ids": [x.id, y.id]}
    assert (await store.get_conversation(conv.id, "alice")).message_count == 4
    with pytest.raises(NotFound):
        await store.get_message(conv.id, "alice", y.id)
    assert (await store.get_message(conv.id, "alice", m3.id)).sibling_count == 1

    # On it: the branch moves to the parent, then down its newest child.
    z = await add(store, conv.id, m2.id)
    await store.set_active_leaf(conv.id, "alice", m4.id, None, utcnow())
    mark = await store.last_event_id(conv.id)
    deleted = await store.delete_message(conv.id, "alice", m3.id)
    assert deleted.deleted_ids == [m3.id, m4.id]
    assert deleted.conversation is not None and deleted.conversation.active_leaf_id == z.id
    assert [e.type for e in await store.read_events(conv.id, mark, 10)] == [
        ev.MESSAGE_DELETED,
        ev.CONVERSATION_UPDATED,
    ]
    assert await ids(store, conv.id) == [m1.id, m2.id, z.id]
    assert (await store.get_conversation(conv.id, "alice")).message_count == 3

    with pytest.raises(NotFound):
        await store.delete_message(conv.id, "bob", m1.id)
    everything = await store.delete_message(conv.id, "alice", m1.id)
    assert everything.deleted_ids == [m1.id, m2.id, z.id]
    emptied = await store.get_conversation(conv.id, "alice")
    assert emptied.message_count == 0 and emptied.active_leaf_id is None
    assert await ids(store, conv.id) == []
    again = await add(store, conv.id)
    assert again.parent_id is None and await ids(store, conv.id) == [again.id]


async def test_deleting_in_a_single_branch_takes_everything_after(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    made = await chain(store, conv.id, 5)
    deleted = await store.delete_message(conv.id, "alice", made[2].id)
    assert deleted.deleted_ids == [m.id for m in made[2:]]
    assert deleted.conversation is not None and deleted.conversation.active_leaf_id == made[1].id
    assert await ids(store, conv.id) == [m.id for m in made[:2]]
    follow = await add(store, conv.id)
    assert follow.parent_id == made[1].id and follow.sibling_count == 1


async def test_deleting_stops_the_replies_of_the_subtree(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), _reply(conv.id)
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    other = _reply(conv.id)
    await store.append_messages(conv.id, None, [other], utcnow(), reply_id=other.id, parent=ask.id)
    assert await store.publish_delta(conv.id, reply.id, "a")
    await store.delete_message(conv.id, "alice", reply.id)
    assert not await store.publish_delta(conv.id, reply.id, "b")
    assert await store.reply_queue_head(conv.id) == other.id
    await store.delete_message(conv.id, "alice", ask.id)
    assert await store.reply_queue_head(conv.id) is None
    assert not await store.publish_delta(conv.id, other.id, "c")


async def test_regenerating_queues_a_sibling_reply(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    ask, first = message(conv.id), _reply(conv.id)
    await store.append_messages(conv.id, "alice", [ask, first], utcnow(), reply_id=first.id)
    again = _reply(conv.id)
    [second] = (
        await store.append_messages(
            conv.id, "alice", [again], utcnow(), reply_id=again.id, parent=ask.id
        )
    ).messages
    assert second.parent_id == ask.id and (second.sibling_count, second.sibling_index) == (2, 1)
    assert await store.reply_queue_head(conv.id) == first.id
    done = first.replace(status=MessageStatus.FAILED, version=2)
    assert await store.finish_reply(conv.id, done, first)
    assert await store.reply_queue_head(conv.id) == second.id
    assert await ids(store, conv.id) == [ask.id, second.id]


async def test_busy_conversations_follow_on_busy(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), _reply(conv.id)
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    with pytest.raises(Busy):
        await store.append_messages(
            conv.id, "alice", [message(conv.id)], utcnow(), on_busy="reject"
        )
    assert (await store.get_conversation(conv.id, "alice")).message_count == 2
    interrupting, answer = message(conv.id), _reply(conv.id)
    appended = await store.append_messages(
        conv.id,
        "alice",
        [interrupting, answer],
        utcnow(),
        reply_id=answer.id,
        on_busy="interrupt",
    )
    assert appended.interrupted == [reply.id]
    assert interrupting.parent_id == reply.id  # the running reply is the active leaf
    queued = await store.append_messages(
        conv.id, "alice", [message(conv.id)], utcnow(), on_busy="queue"
    )
    assert queued.interrupted == [] and not queued.replayed
    # Nothing is busy once the replies ended.
    for r in (reply, answer):
        current = await store.get_message(conv.id, None, r.id)
        assert await store.finish_reply(
            conv.id, current.replace(status=MessageStatus.FAILED, version=2), current
        )
    calm = await store.append_messages(
        conv.id, "alice", [message(conv.id)], utcnow(), on_busy="reject"
    )
    assert not calm.replayed


async def test_a_stopped_reply_does_not_start_again(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), _reply(conv.id)
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    await store.stop_reply(conv.id, reply.id)
    with pytest.raises(ReplyStopped):
        await store.start_attempt(
            conv.id, reply.replace(status=MessageStatus.STREAMING, version=2), reply, 1
        )
    assert (await store.get_message(conv.id, None, reply.id)).status is MessageStatus.PENDING


async def test_a_fork_copies_the_branch(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation(system_prompt="be kind", model="m"))
    m1, m2 = await chain(store, conv.id, 2)
    ask, reply = message(conv.id, "q"), _reply(conv.id)
    ask.reply_message_id = reply.id
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    assert await store.publish_delta(conv.id, reply.id, "partial")
    await add(store, conv.id, m1.id)  # another branch, not copied

    new = conversation(
        system_prompt="be kind",
        model="m",
        forked_from={"conversation_id": conv.id, "message_id": reply.id},
    )
    forked = await store.fork(conv.id, "alice", reply.id, new)
    assert forked.id == new.id and forked.message_count == 4
    copies = (await store.list_messages(forked.id, "alice", MessageQuery(10))).items
    # The reply that had not ended keeps the text its deltas published.
    assert [m.content for m in copies] == ["c0", "c1", "q", "partial"]
    assert {m.conversation_id for m in copies} == {forked.id}
    assert not {m.id for m in copies} & {m1.id, m2.id, ask.id, reply.id}
    assert [m.parent_id for m in copies] == [None, copies[0].id, copies[1].id, copies[2].id]
    assert copies[2].reply_message_id == copies[3].id
    assert copies[3].status is MessageStatus.CANCELLED  # it had not ended
    assert forked.active_leaf_id == copies[3].id
    got = await store.get_conversation(forked.id, "alice")
    assert got.forked_from == {"conversation_id": conv.id, "message_id": reply.id}
    assert got.system_prompt == "be kind" and got.active_leaf_id == copies[3].id
    assert await store.reply_queue_head(forked.id) is None
    following = await add(store, forked.id)
    assert following.parent_id == copies[3].id

    with pytest.raises(NotFound):
        await store.fork(conv.id, "bob", reply.id, conversation(user="bob"))
    with pytest.raises(UnknownMessage):
        await store.fork(conv.id, "alice", new_id(), conversation())
    empty = await store.fork(conv.id, "alice", None, conversation())
    assert empty.message_count == 0 and empty.active_leaf_id is None
    # The original is untouched.
    assert (await store.get_conversation(conv.id, "alice")).message_count == 5


# --- A random walk against a model ---------------------------------------------------------------


@dataclass
class TreeModel:
    parent: dict[str, str | None] = field(default_factory=dict)
    children: dict[str | None, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # creation order
    leaf: str | None = None

    def add(self, mid: str, parent: str | None) -> None:
        self.parent[mid] = parent
        self.children.setdefault(parent, []).append(mid)
        self.order.append(mid)
        self.leaf = mid

    def descend(self, mid: str | None) -> str | None:
        while self.children.get(mid):
            mid = self.children[mid][-1]
        return mid

    def branch(self, leaf: str | None) -> list[str]:
        path: list[str] = []
        while leaf is not None:
            path.append(leaf)
            leaf = self.parent[leaf]
        return path[::-1]

    def subtree(self, mid: str) -> list[str]:
        found = {mid}
        for other in self.order:  # creation order: parents come first
            if self.parent[other] in found:
                found.add(other)
        return [m for m in self.order if m in found]

    def delete(self, mid: str) -> list[str]:
        gone = self.subtree(mid)
        parent = self.parent[mid]
        self.children[parent].remove(mid)
        for m in gone:
            del self.parent[m]
            self.children.pop(m, None)
        self.order = [m for m in self.order if m not in gone]
        if self.leaf in gone:
            self.leaf = self.descend(parent)
        return gone

    def siblings(self, mid: str) -> tuple[int, int]:
        kids = self.children[self.parent[mid]]
        return len(kids), kids.index(mid)


async def _check(store: Store, cid: str, model: TreeModel, rng: random.Random) -> None:
    branch = model.branch(model.leaf)
    got = await store.list_messages(cid, "alice", MessageQuery(500))
    assert [m.id for m in got.items] == branch
    for m in got.items:
        assert m.parent_id == model.parent[m.id]
        assert (m.sibling_count, m.sibling_index) == model.siblings(m.id)
    conv = await store.get_conversation(cid, "alice")
    assert conv.active_leaf_id == model.leaf
    assert conv.message_count == len(model.order)
    if model.order:
        some = rng.choice(model.order)
        one = await store.get_message(cid, "alice", some)
        assert one.parent_id == model.parent[some]
        assert (one.sibling_count, one.sibling_index) == model.siblings(some)
        assert await ids(store, cid, MessageQuery(500, leaf=some)) == model.branch(some)
        siblings = await store.list_siblings(cid, "alice", some, 500, -1)
        assert [m.id for m in siblings.items] == model.children[model.parent[some]]
        # A page in the middle of the branch, both ways.
        if len(branch) > 2:
            at = rng.randrange(1, len(branch) - 1)
            after = await ids(store, cid, MessageQuery(3, anchor_id=branch[at]))
            assert after == branch[at + 1 : at + 4]
            before = await ids(store, cid, MessageQuery(3, anchor_id=branch[at], backward=True))
            assert before == branch[max(0, at - 3) : at]
    everything = await store.list_messages(cid, "alice", MessageQuery(500, everything=True))
    assert [m.id for m in everything.items] == model.order
    assert [m.parent_id for m in everything.items] == [model.parent[m] for m in model.order]


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_random_walk_of_tree_operations_matches_the_model(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    conv, _ = await store.create_conversation(conversation())
    model = TreeModel()
    for m in await chain(store, conv.id, 12):
        model.add(m.id, m.parent_id)
    await _check(store, conv.id, model, rng)
    for step in range(70):
        roll = rng.random()
        if roll < 0.35 or not model.order:  # append under the active leaf (most common)
            expected = model.leaf
            m = await add(store, conv.id)
            model.add(m.id, expected)
            assert m.parent_id == expected
        elif roll < 0.55:  # an edit or regenerate: under any message, or a new root
            parent = rng.choice([*model.order, None])
            m = await add(store, conv.id, parent)
            model.add(m.id, parent)
            assert (m.sibling_count, m.sibling_index) == model.siblings(m.id)
        elif roll < 0.75:  # switch
            target = rng.choice(model.order)
            conv = await store.set_active_leaf(conv.id, "alice", target, None, utcnow())
            model.leaf = model.descend(target)
            assert conv.active_leaf_id == model.leaf
        elif roll < 0.85:  # delete a subtree (rarely a big one)
            target = rng.choice(model.order)
            deleted = await store.delete_message(conv.id, "alice", target)
            assert deleted.deleted_ids == model.delete(target)
        else:  # a few appends in a row
            for _ in range(rng.randrange(1, 4)):
                expected = model.leaf
                m = await add(store, conv.id)
                model.add(m.id, expected)
                assert m.parent_id == expected
        if step % 5 == 0 or step == 69:
            await _check(store, conv.id, model, rng)
