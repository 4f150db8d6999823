"""The Store contract (notifier/store/base.py), checked on real things:
every test runs on the SQLite store (a file in tmp_path) and on the Redis
store (a redis-server of the test's own). Tests about SQLite files only
are marked ``sqlite_only``; the Redis store's own equivalents are in
tests/store/test_redis.py."""

from __future__ import annotations

import asyncio
import re
import sqlite3

import orjson
import pytest

from notifier.messages import Draft
from notifier.store.base import Position, Receipt, SeqAboveHead, Store, StoreError
from notifier.store.redis import RedisStore
from notifier.store.sqlite import SQLiteStore

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

sqlite_only = pytest.mark.parametrize("open_store", ["sqlite"], indirect=True)


def draft(topic: str, value, key: str | None = None, event: str | None = None) -> Draft:
    return Draft(topic, orjson.dumps(value), event, key)


class Opener:
    """``await open_store(name, max_messages=..., max_age=...)``: an opened
    store; the same name reopens the same store (an SQLite file in tmp_path,
    or a database of the test's redis-server), a new name is a new one."""

    def __init__(self, backend: str, tmp_path, redis_server):
        self.backend = backend
        self.tmp_path = tmp_path
        self.redis_server = redis_server
        self.databases: dict[str, int] = {}
        self.opened: list[Store] = []

    async def __call__(self, name: str = "notifier.db", **retention) -> Store:
        if self.backend == "sqlite":
            store = SQLiteStore(self.tmp_path / name, **retention)
        else:
            database = self.databases.setdefault(name, len(self.databases))
            store = RedisStore(f"redis://127.0.0.1:{self.redis_server.port}/{database}",
                               **retention)
        await store.open()
        self.opened.append(store)
        return store

    async def age_retention(self, store: Store) -> None:
        """Whatever the backend needs before reads reflect age retention:
        SQLite applies it in a pass every 30 s (run now); Redis in every
        read and append (nothing to do)."""
        if isinstance(store, SQLiteStore):
            await store.prune_now()


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, io_loop, tmp_path):
    redis_server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    opener = Opener(request.param, tmp_path, redis_server)
    yield opener
    for store in opener.opened:
        io_loop.run_sync(store.close)


async def seqs_of(store, topic: str, since: int = 0, limit: int = 1000) -> list[int]:
    return [message.seq for message in (await store.read_since(topic, since, limit)).messages]


# Appending


async def test_append_assigns_1_to_n_per_topic_independently(open_store):
    store = await open_store()
    result = await store.append([draft("a", 1), draft("b", 1), draft("a", 2), draft("b", 2),
                                 draft("a", 3)])
    assert [(r.topic, r.seq) for r in result.receipts] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
    assert [(m.topic, m.seq) for m in result.stored] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
    assert [m.id for m in result.stored] == [r.id for r in result.receipts]
    assert (await store.append([draft("a", 4)])).receipts[0].seq == 4
    assert (await store.append([draft("c", 1)])).receipts[0].seq == 1
    assert (await store.append([draft("b", 3)])).receipts[0].seq == 3


async def test_receipts_and_messages_carry_id_and_time(open_store):
    store = await open_store()
    result = await store.append([draft("t", {"n": i}, event="e") for i in range(3)])
    assert len({r.id for r in result.receipts}) == 3
    for receipt, message in zip(result.receipts, result.stored):
        assert TIME.fullmatch(receipt.time), receipt.time
        assert (message.id, message.time, message.topic) == (receipt.id, receipt.time, "t")
        assert message.event == "e"
    assert [m.data for m in result.stored] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert result.receipts[0].as_dict() == {"id": result.receipts[0].id, "topic": "t", "seq": 1,
                                            "time": result.receipts[0].time}


async def test_read_since_order_limit_and_since(open_store):
    store = await open_store()
    receipts = []
    for i in range(1, 6):
        receipts += (await store.append([draft("t", i * 10, event=f"e{i}")])).receipts
    history = await store.read_since("t", 0, 100)
    assert [m.seq for m in history.messages] == [1, 2, 3, 4, 5]
    assert [orjson.loads(m.data) for m in history.messages] == [10, 20, 30, 40, 50]
    assert [m.event for m in history.messages] == ["e1", "e2", "e3", "e4", "e5"]
    assert [(m.id, m.time) for m in history.messages] == [(r.id, r.time) for r in receipts]
    assert all(m.topic == "t" for m in history.messages)
    assert await seqs_of(store, "t", since=2, limit=2) == [3, 4]
    assert await seqs_of(store, "t", since=0, limit=1) == [1]
    assert await seqs_of(store, "t", since=4) == [5]
    assert await seqs_of(store, "t", since=5) == []
    assert await seqs_of(store, "t", since=0, limit=0) == []
    above = await store.read_since("t", 99, 10)
    assert above.messages == [] and above.head == 5 and above.oldest == 1


async def test_read_since_keeps_arbitrary_json_bytes(open_store):
    store = await open_store()
    values = [None, 0, "", [], {}, "\u00e9\u2603", {"nested": [1, {"x": None}]}]
    await store.append([draft("t", value) for value in values])
    history = await store.read_since("t", 0, 100)
    assert [m.data for m in history.messages] == [orjson.dumps(v) for v in values]
    assert all(isinstance(m.data, bytes) for m in history.messages)


async def test_head_oldest_epoch_of_an_unknown_topic(open_store):
    store = await open_store()
    history = await store.read_since("never.published", 0, 100)
    assert history.messages == [] and history.head == 0 and history.oldest == 1
    assert isinstance(history.epoch, str) and history.epoch


async def test_head_oldest_epoch_after_appends(open_store):
    store = await open_store()
    await store.append([draft("t", i) for i in range(3)])
    history = await store.read_since("t", 1, 100)
    assert (history.head, history.oldest) == (3, 1)
    assert [m.seq for m in history.messages] == [2, 3]


async def test_the_epoch_read_before_the_first_append_is_the_one_it_keeps(open_store):
    store = await open_store()
    before = await store.read_since("u", 0, 100)
    assert (await store.positions(["u"]))["u"] == Position(0, before.epoch)
    result = await store.append([draft("u", 1)])
    assert result.stored[0].epoch == before.epoch
    assert (await store.read_since("u", 0, 100)).epoch == before.epoch


async def test_epoch_is_stable_across_reopen_and_differs_for_a_new_log(open_store):
    store = await open_store("a.db")
    await store.append([draft("t", 1)])
    epoch = (await store.read_since("t", 0, 10)).epoch
    await store.close()
    reopened = await open_store("a.db")
    assert (await reopened.read_since("t", 0, 10)).epoch == epoch
    fresh = await open_store("b.db")
    assert (await fresh.read_since("t", 0, 10)).epoch != epoch


# Retention


async def test_retention_by_max_messages_prunes_the_oldest(open_store):
    store = await open_store(max_messages=3)
    for i in range(5):
        await store.append([draft("t", i)])
    history = await store.read_since("t", 0, 100)
    assert [m.seq for m in history.messages] == [3, 4, 5]
    assert (history.head, history.oldest) == (5, 3)
    result = await store.append([draft("t", i) for i in range(4)])
    assert [r.seq for r in result.receipts] == [6, 7, 8, 9]
    history = await store.read_since("t", 0, 100)
    assert [m.seq for m in history.messages] == [7, 8, 9]
    assert (history.head, history.oldest) == (9, 7)
    await store.append([draft("other", 1)])
    assert await seqs_of(store, "other") == [1]
    assert await seqs_of(store, "t") == [7, 8, 9]


async def test_retention_by_max_age(open_store):
    # Wide enough margins that a busy machine cannot age "t" 3 before the prune.
    store = await open_store(max_age=0.5)
    await store.append([draft("t", 1), draft("t", 2)])
    await store.append([draft("u", 1)])
    await asyncio.sleep(0.6)
    await store.append([draft("t", 3)])
    await open_store.age_retention(store)
    history = await store.read_since("t", 0, 100)
    assert [m.seq for m in history.messages] == [3]
    assert (history.head, history.oldest) == (3, 3)
    emptied = await store.read_since("u", 0, 100)
    assert emptied.messages == [] and (emptied.head, emptied.oldest) == (1, 2)
    assert (await store.append([draft("t", 4)])).receipts[0].seq == 4
    assert (await store.append([draft("u", 2)])).receipts[0].seq == 2


# Idempotency


async def test_repeated_key_returns_the_first_receipt_and_stores_nothing(open_store):
    store = await open_store()
    first = await store.append([draft("t", "original", key="k1")])
    again = await store.append([draft("t", "different data", key="k1")])
    assert again.receipts == first.receipts
    assert again.stored == []
    history = await store.read_since("t", 0, 100)
    assert [m.data for m in history.messages] == [b'"original"'] and history.head == 1
    assert (await store.append([draft("t", "next")])).receipts[0].seq == 2


async def test_key_repeated_inside_one_batch_counts_as_a_repeat(open_store):
    store = await open_store()
    result = await store.append([draft("t", "a", key="k"), draft("t", "plain"),
                                 draft("t", "b", key="k"), draft("t", "c", key="other")])
    assert [r.seq for r in result.receipts] == [1, 2, 1, 3]
    assert result.receipts[2] == result.receipts[0]
    assert [m.seq for m in result.stored] == [1, 2, 3]
    history = await store.read_since("t", 0, 100)
    assert [m.data for m in history.messages] == [b'"a"', b'"plain"', b'"c"']


async def test_drafts_without_key_are_never_deduplicated(open_store):
    store = await open_store()
    result = await store.append([draft("t", "same"), draft("t", "same")])
    assert [r.seq for r in result.receipts] == [1, 2]
    assert [r.seq for r in (await store.append([draft("t", "same")])).receipts] == [3]


async def test_same_key_on_another_topic_is_new(open_store):
    store = await open_store()
    first = await store.append([draft("t", 1, key="k")])
    other = await store.append([draft("u", 1, key="k")])
    assert other.receipts[0].topic == "u" and other.receipts[0].seq == 1
    assert other.receipts[0].id != first.receipts[0].id
    assert len(other.stored) == 1


async def test_idempotency_survives_close_and_reopen(open_store):
    store = await open_store("idem.db")
    first = await store.append([draft("t", 1, key="k")])
    await store.close()
    reopened = await open_store("idem.db")
    again = await reopened.append([draft("t", 2, key="k")])
    assert again.receipts == first.receipts and again.stored == []
    assert (await reopened.read_since("t", 0, 10)).head == 1


# Atomicity


async def test_failing_batch_stores_nothing_and_consumes_no_seq(open_store):
    store = await open_store()
    await store.append([draft("t", "before")])
    bad = [draft("t", "a", key="k"), Draft("t", {"not": "bytes"}), draft("u", "c")]
    with pytest.raises(StoreError) as caught:
        await store.append(bad)
    assert "\n" not in str(caught.value)
    assert await seqs_of(store, "t") == [1]
    assert (await store.read_since("u", 0, 10)).head == 0
    after = await store.append([draft("t", "after", key="k"), draft("u", "first")])
    assert [(r.topic, r.seq) for r in after.receipts] == [("t", 2), ("u", 1)]
    assert len(after.stored) == 2  # the failed batch's key was not consumed
    history = await store.read_since("t", 0, 10)
    assert [m.data for m in history.messages] == [b'"before"', b'"after"']


async def test_failing_batch_does_not_harm_concurrent_ones(open_store):
    store = await open_store()
    results = await asyncio.gather(
        store.append([draft("t", 1)]),
        store.append([draft("t", 2), Draft("t", object())]),
        store.append([draft("t", 3)]),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreError)
    assert [results[0].receipts[0].seq, results[2].receipts[0].seq] == [1, 2]
    history = await store.read_since("t", 0, 10)
    assert [m.data for m in history.messages] == [b"1", b"3"]



async def test_on_durable_runs_in_commit_order_before_the_callers_resume(open_store):
    store = await open_store()
    events: list[str] = []

    async def publish(value) -> None:
        drafts = [draft("t", value)] if value != "bad" else [Draft("t", object())]
        try:
            await store.append(drafts, lambda result: events.append(
                f"durable {result.receipts[0].seq}"))
        except StoreError:
            events.append("failed")
        else:
            events.append(f"resumed {value}")

    await asyncio.gather(*(publish(value) for value in ("a", "b", "bad", "c")))
    durable = [e for e in events if e.startswith("durable")]
    assert durable == ["durable 1", "durable 2", "durable 3"]  # commit order; none for the failure
    assert "failed" in events
    # Each hand-off happened before its own caller (and any later one) resumed.
    for seq, value in ((1, "a"), (2, "b"), (3, "c")):
        assert events.index(f"durable {seq}") < events.index(f"resumed {value}")


async def test_on_durable_runs_even_when_the_caller_gave_up(open_store):
    store = await open_store()
    handed: list[int] = []
    task = asyncio.ensure_future(store.append([draft("t", 1)], lambda r: handed.append(r.receipts[0].seq)))
    await asyncio.sleep(0)
    task.cancel()
    await store.append([draft("t", 2)])  # committed after the first: its callback ran by now
    assert handed == [1]
    assert await seqs_of(store, "t") == [1, 2]


async def test_a_failing_on_durable_harms_no_one(open_store):
    store = await open_store()

    def fail(result) -> None:
        raise RuntimeError("a broken hand-off")

    first, second = await asyncio.wait_for(asyncio.gather(
        store.append([draft("t", 1)], fail), store.append([draft("t", 2)])), 10)
    assert [first.receipts[0].seq, second.receipts[0].seq] == [1, 2]
    assert await seqs_of(store, "t") == [1, 2]


# Cursors



async def test_read_from_cursor_resumes_after_the_cursor_else_the_default(open_store):
    store = await open_store()
    await store.append([draft("t", i) for i in range(5)])
    epoch = (await store.read_since("t", 0, 0)).epoch
    # Both the store's own one-snapshot version and the base class's two-read
    # one (what a store without its own gets) must agree.
    for read in (store.read_from_cursor, lambda *a: Store.read_from_cursor(store, *a)):
        resume = await read("alice", "t", None, 100)
        assert resume.since is None and resume.cursor is None
        assert resume.history.messages == [] and resume.history.head == 5
        resume = await read("alice", "t", 0, 100)
        assert resume.since == 0 and [m.seq for m in resume.history.messages] == [1, 2, 3, 4, 5]
        resume = await read("alice", "t", 0, 2)
        assert [m.seq for m in resume.history.messages] == [1, 2]
    await store.set_cursor("alice", "t", 3)
    for read in (store.read_from_cursor, lambda *a: Store.read_from_cursor(store, *a)):
        resume = await read("alice", "t", None, 100)
        assert resume.since == 3 and resume.cursor == Position(3, epoch)
        page = resume.history
        assert [m.seq for m in page.messages] == [4, 5]
        assert (page.head, page.oldest, page.epoch) == (5, 1, epoch)
        resume = await read("bob", "t", None, 100)  # cursors are per user
        assert resume.since is None and resume.history.messages == []


async def test_messages_carry_their_topics_epoch(open_store):
    store = await open_store()
    result = await store.append([draft("t", 1), draft("u", 1), draft("t", 2)])
    epochs = {topic: (await store.read_since(topic, 0, 10)).epoch for topic in ("t", "u")}
    assert [m.epoch for m in result.stored] == [epochs["t"], epochs["u"], epochs["t"]]
    for topic in ("t", "u"):
        history = await store.read_since(topic, 0, 10)
        assert {m.epoch for m in history.messages} == {history.epoch}


async def test_a_cursor_remembers_its_epoch(open_store):
    store = await open_store()
    await store.append([draft("t", i) for i in range(3)])
    await store.set_cursor("alice", "t", 2)
    assert await store.get_cursor("alice", "t") == Position(2, (await store.read_since("t", 0, 0)).epoch)


async def test_positions_give_each_topics_head_and_epoch(open_store):
    store = await open_store()
    await store.append([draft("a", 1), draft("a", 2), draft("b", 1)])
    many = [f"never.{i}" for i in range(1200)]  # more than one query's worth
    positions = await store.positions(["a", "b", *many])
    assert set(positions) == {"a", "b", *many}
    for topic, position in positions.items():
        history = await store.read_since(topic, 0, 0)
        assert position == Position(history.head, history.epoch)
    assert positions["a"].seq == 2 and positions["b"].seq == 1 and positions["never.7"].seq == 0
    assert await store.positions([]) == {}


async def test_cursor_unset_is_none(open_store):
    store = await open_store()
    assert await store.get_cursor("alice", "t") is None


async def test_cursor_moves_forward_only(open_store):
    store = await open_store()
    await store.append([draft("t", i) for i in range(5)])
    await store.set_cursor("alice", "t", 3)
    assert (await store.get_cursor("alice", "t")).seq == 3
    await store.set_cursor("alice", "t", 2)
    assert (await store.get_cursor("alice", "t")).seq == 3
    await store.set_cursor("alice", "t", 5)
    assert (await store.get_cursor("alice", "t")).seq == 5
    assert await store.get_cursor("bob", "t") is None
    assert await store.get_cursor("alice", "u") is None


async def test_cursor_above_head_is_refused(open_store):
    store = await open_store()
    with pytest.raises(SeqAboveHead):
        await store.set_cursor("alice", "t", 1)
    await store.append([draft("t", 1), draft("t", 2)])
    await store.set_cursor("alice", "t", 1)
    with pytest.raises(SeqAboveHead) as caught:
        await store.set_cursor("alice", "t", 3)
    assert isinstance(caught.value, StoreError)
    assert (await store.get_cursor("alice", "t")).seq == 1
    await store.set_cursor("alice", "t", 2)
    assert (await store.get_cursor("alice", "t")).seq == 2


async def test_cursor_at_a_pruned_seq_is_still_accepted(open_store):
    store = await open_store(max_messages=2)
    await store.append([draft("t", i) for i in range(5)])
    await store.set_cursor("alice", "t", 1)
    assert (await store.get_cursor("alice", "t")).seq == 1


# Concurrency


async def test_concurrent_appends_get_unique_consecutive_seqs(open_store):
    store = await open_store()
    resolved = []

    async def one(i: int) -> int:
        result = await store.append([draft("t", i)])
        resolved.append(result.receipts[0].seq)
        return result.receipts[0].seq

    seqs = await asyncio.gather(*(one(i) for i in range(200)))
    assert sorted(seqs) == list(range(1, 201))
    assert resolved == sorted(resolved), "appends resolve in commit order"
    history = await store.read_since("t", 0, 1000)
    assert history.head == 200
    data_by_seq = {m.seq: m.data for m in history.messages}
    assert all(data_by_seq[seq] == orjson.dumps(i) for i, seq in enumerate(seqs))


async def test_concurrent_appends_and_cursors(open_store):
    store = await open_store()
    await store.append([draft("t", 0)])
    await asyncio.gather(*(store.append([draft("t", i)]) for i in range(50)),
                         *(store.set_cursor(f"user{i}", "t", 1) for i in range(50)))
    assert (await store.read_since("t", 0, 100)).head == 51
    assert [(await store.get_cursor(f"user{i}", "t")).seq for i in range(50)] == [1] * 50


# Opening and reopening


async def test_reopening_keeps_heads_cursors_and_messages(open_store):
    store = await open_store("keep.db")
    first = await store.append([draft("t", "x"), draft("t", "y"), draft("u", "z")])
    await store.set_cursor("alice", "t", 2)
    await store.set_cursor("bob", "u", 1)
    await store.close()
    store = await open_store("keep.db")
    history = await store.read_since("t", 0, 10)
    assert history.head == 2
    assert [(m.seq, m.id, m.data) for m in history.messages] == \
        [(1, first.receipts[0].id, b'"x"'), (2, first.receipts[1].id, b'"y"')]
    assert (await store.get_cursor("alice", "t")).seq == 2
    assert (await store.get_cursor("bob", "u")).seq == 1
    assert (await store.append([draft("t", "w")])).receipts[0].seq == 3
    assert (await store.append([draft("u", "w")])).receipts[0].seq == 2


async def test_reopening_after_retention_keeps_the_head(open_store):
    store = await open_store("pruned.db", max_messages=1)
    await store.append([draft("t", i) for i in range(4)])
    await store.close()
    store = await open_store("pruned.db", max_messages=1)
    history = await store.read_since("t", 0, 10)
    assert (history.head, history.oldest, [m.seq for m in history.messages]) == (4, 4, [4])
    assert (await store.append([draft("t", 9)])).receipts[0].seq == 5


@sqlite_only
async def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(open_store, tmp_path):
    path = tmp_path / "junk.db"
    content = b"this is not a database, it is a text file\n" * 200
    path.write_bytes(content)
    with pytest.raises(StoreError) as caught:
        await open_store("junk.db")
    message = str(caught.value)
    assert message and "\n" not in message
    assert path.read_bytes() == content


@sqlite_only
async def test_a_newer_schema_is_refused_and_left_untouched(open_store, tmp_path):
    path = tmp_path / "future.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE later (x)")
    db.execute("INSERT INTO later VALUES (1)")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    content = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        await open_store("future.db")
    message = str(caught.value)
    assert "99" in message and "\n" not in message
    assert path.read_bytes() == content, "opening must not modify a store it refuses"


async def test_closed_store_refuses_work(open_store):
    store = await open_store()
    await store.append([draft("t", 1)])
    await store.ping()
    await store.close()
    with pytest.raises(StoreError):
        await store.append([draft("t", 2)])
    with pytest.raises(StoreError):
        await store.read_since("t", 0, 10)
    with pytest.raises(StoreError):
        await store.ping()


async def test_receipt_type(open_store):
    store = await open_store()
    receipt = (await store.append([draft("t", 1)])).receipts[0]
    assert isinstance(receipt, Receipt)
