"""What the Redis store promises beyond the Store contract (which
tests/store/test_contract.py runs on it too): per-topic epochs when a log is
lost, the bus carrying exactly what is stored, what an acknowledged append
survives, failing fast while Redis is away and recovering by itself, batch
atomicity across topics, age retention on reads. Each test on a
redis-server of its own."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
import redis.asyncio as aioredis

from notifier import redis_format
from notifier.messages import Draft
from notifier.store.base import Position, StoreError
from notifier.store.redis import TIMEOUT, RedisStore
from procs import free_port
from redis_server import RedisServer
from support import events


def draft(topic: str, value, key: str | None = None, event: str | None = None) -> Draft:
    return Draft(topic, orjson.dumps(value), event, key)


@pytest.fixture
def open_store(io_loop, redis_server):
    """``await open_store(**retention)``: a RedisStore on the test's redis-server."""
    opened = []

    async def open_store(**options) -> RedisStore:
        store = RedisStore(redis_server.url, **options)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        io_loop.run_sync(store.close)


@pytest.fixture
def raw(io_loop, redis_server):
    """A plain redis.asyncio client on the same server, to look behind the store."""
    client = aioredis.from_url(redis_server.url)
    yield client
    io_loop.run_sync(client.aclose)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def seqs_of(store, topic: str) -> list[int]:
    return [m.seq for m in (await store.read_since(topic, 0, 100000)).messages]


# Epochs


async def test_a_lost_log_gets_a_new_epoch_and_seqs_from_1(open_store, raw):
    store = await open_store()
    await store.append([draft("t", 1, key="k"), draft("t", 2), draft("t", 3)])
    await store.set_cursor("alice", "t", 2)
    old = (await store.read_since("t", 0, 0)).epoch
    # What a Redis without persistence restarting does to the topic.
    await raw.delete(redis_format.meta_key("t"), redis_format.log_key("t"))

    history = await store.read_since("t", 0, 100)
    assert history.epoch != old
    assert (history.messages, history.head, history.oldest) == ([], 0, 1)
    assert await store.positions(["t"]) == {"t": Position(0, history.epoch)}
    result = await store.append([draft("t", "new", key="k")])  # the key belonged to the old log
    assert [(m.seq, m.epoch) for m in result.stored] == [(1, history.epoch)]
    assert await store.get_cursor("alice", "t") == Position(2, old)  # stale: acked under old
    resume = await store.read_from_cursor("alice", "t", None, 100)
    assert resume.since == 0 and resume.cursor == Position(2, old)
    assert [(m.seq, m.data) for m in resume.history.messages] == [(1, b'"new"')]
    await store.set_cursor("alice", "t", 1)  # a cursor from another epoch is replaced
    assert await store.get_cursor("alice", "t") == Position(1, history.epoch)


async def test_a_log_left_without_its_meta_is_not_taken_for_the_new_one(open_store, raw):
    store = await open_store()
    await store.append([draft("t", i) for i in range(5)])
    await raw.delete(redis_format.meta_key("t"))  # e.g. evicted on its own
    result = await store.append([draft("t", "after")])
    assert [m.seq for m in result.stored] == [1]
    history = await store.read_since("t", 0, 100)
    assert [(m.seq, m.data) for m in history.messages] == [(1, b'"after"')]
    assert (history.head, history.oldest) == (1, 1)


# The bus


async def test_the_bus_carries_exactly_what_is_stored_in_seq_order(open_store, raw):
    store = await open_store()
    pubsub = raw.pubsub()
    await pubsub.subscribe(redis_format.channel("t"), redis_format.channel("u"))
    try:
        results = await asyncio.gather(*(
            store.append([draft("t", i, key=f"k{i % 7}", event="e"), draft("u", [i]),
                          draft("t", {"i": i})])
            for i in range(60)))
        stored = [m for result in results for m in result.stored]
        assert len(stored) == 60 + 60 + 7  # the repeated keys stored nothing
        received = []
        deadline = time.monotonic() + 5
        while len(received) < len(stored) and time.monotonic() < deadline:
            frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if frame is not None:
                topic = redis_format.topic_of_channel(frame["channel"])
                received.append(redis_format.decode_bus(topic, frame["data"]))
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
    finally:
        await pubsub.aclose()
    assert received == stored  # same messages, in commit order
    for topic in ("t", "u"):
        on_bus = [m for m in received if m.topic == topic]
        assert on_bus == (await store.read_since(topic, 0, 1000)).messages
        assert [m.seq for m in on_bus] == list(range(1, len(on_bus) + 1))


# Durability


async def test_every_acknowledged_append_survives_a_sigkill(open_store, redis_server):
    assert redis_server.appendonly and redis_server.appendfsync == "always"
    store = await open_store()
    acked: dict[str, int] = {}   # message id -> seq
    failures: list[StoreError] = []
    stop = asyncio.Event()

    async def publisher(name: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                result = await store.append([draft("t", f"{name}-{n}", key=f"{name}-{n}")])
            except StoreError as error:
                failures.append(error)
                await asyncio.sleep(0.01)
            else:
                acked[result.receipts[0].id] = result.receipts[0].seq

    publishers = [asyncio.ensure_future(publisher(f"p{i}")) for i in range(4)]
    await until(lambda: len(acked) >= 200, "200 appends")
    redis_server.kill()
    await until(lambda: failures, "a failure")
    redis_server.start()
    before = len(acked)
    await until(lambda: len(acked) >= before + 100, "the store recovering by itself")
    stop.set()
    await asyncio.gather(*publishers)
    redis_server.kill()
    redis_server.start()

    history = await store.read_since("t", 0, 100000)
    by_id = {m.id: m.seq for m in history.messages}
    assert len(by_id) == len(history.messages), "a message stored twice"
    assert len({m.data for m in history.messages}) == len(history.messages)
    assert [m.seq for m in history.messages] == list(range(1, history.head + 1))
    lost = {i: s for i, s in acked.items() if by_id.get(i) != s}
    assert not lost, f"{len(lost)} acknowledged appends lost"
    assert all("\n" not in str(error) for error in failures)


# Redis away


async def test_calls_fail_fast_while_redis_is_down_and_work_again_after(open_store,
                                                                          redis_server):
    store = await open_store()
    await store.append([draft("t", 1)])
    await store.set_cursor("alice", "t", 1)
    redis_server.kill()
    calls = [lambda: store.append([draft("t", 2)]), lambda: store.read_since("t", 0, 10),
             lambda: store.read_from_cursor("alice", "t", None, 10),
             lambda: store.get_cursor("alice", "t"), lambda: store.set_cursor("alice", "t", 1),
             lambda: store.positions(["t"]), store.ping]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await call()
        assert time.monotonic() - started < 2 * TIMEOUT
        assert "127.0.0.1" in one_line(caught.value)
    redis_server.start()
    # No reopen, no retry by hand: the next call of each kind just works.
    assert (await store.append([draft("t", 3)])).receipts[0].seq == 2
    assert await seqs_of(store, "t") == [1, 2]
    await store.set_cursor("alice", "t", 2)
    assert (await store.read_from_cursor("alice", "t", None, 10)).since == 2
    await store.ping()


async def test_a_hung_redis_fails_calls_within_the_timeout(open_store, redis_server):
    store = await open_store()
    await store.append([draft("t", 1)])
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(store.append([draft("t", 2)]),
                                        store.read_since("t", 0, 10),
                                        store.ping(), return_exceptions=True)
        elapsed = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
    assert elapsed < TIMEOUT + 2
    # The append sent into the hung server may have been stored after all
    # (its answer was lost): what an error means for a publisher is "retry
    # with the same idempotency key", never "not stored".
    assert (await store.append([draft("t", 3)])).receipts[0].seq in (2, 3)
    stored = [m.data for m in (await store.read_since("t", 0, 10)).messages]
    assert stored.count(b"2") <= 1, "an append was sent twice"


async def test_scripts_are_loaded_again_when_redis_forgot_them(open_store, raw):
    store = await open_store()
    await store.append([draft("t", 1)])
    await raw.script_flush()
    assert (await store.append([draft("t", 2)])).receipts[0].seq == 2
    await raw.script_flush()
    await store.set_cursor("alice", "t", 2)
    await raw.script_flush()
    assert await seqs_of(store, "t") == [1, 2]
    await raw.script_flush()
    assert (await store.read_from_cursor("alice", "t", None, 10)).since == 2
    await raw.script_flush()
    assert (await store.positions(["t"]))["t"].seq == 2


async def test_open_refuses_an_unreachable_redis_with_one_line(io_loop):
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert time.monotonic() - started < 2 * TIMEOUT
    assert f"127.0.0.1:{port}" in one_line(caught.value)
    with pytest.raises(StoreError) as caught:
        await RedisStore("http://127.0.0.1:6379/0").open()
    assert "store.redis_url" in one_line(caught.value)


# Atomicity


async def test_a_batch_across_topics_is_atomic(open_store, raw):
    store = await open_store()
    await store.append([draft("t", "before"), draft("u", "before"), draft("v", "before")])
    pubsub = raw.pubsub()
    await pubsub.subscribe(*(redis_format.channel(topic) for topic in ("t", "u", "v")))
    try:
        with pytest.raises(StoreError):  # refused before it reaches Redis
            await store.append([draft("t", 1, key="k"), draft("u", 1),
                                Draft("v", {"not": "bytes"})])
        # The last topic's log is not a sorted set: the script refuses the whole batch.
        await raw.set(redis_format.log_key("v"), "in the way")
        with pytest.raises(StoreError) as caught:
            await store.append([draft("t", 1, key="k"), draft("u", 1), draft("v", 1)])
        assert "WRONGTYPE" in one_line(caught.value)
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
    finally:
        await pubsub.aclose()
    assert await seqs_of(store, "t") == [1] and await seqs_of(store, "u") == [1]
    assert await raw.exists(redis_format.idempotency_key("t", "k")) == 0
    assert await raw.get(redis_format.log_key("v")) == b"in the way"
    await raw.delete(redis_format.log_key("v"))
    result = await store.append([draft("t", 1, key="k"), draft("u", 1), draft("v", 1)])
    assert [(r.topic, r.seq) for r in result.receipts] == [("t", 2), ("u", 2), ("v", 2)]


async def test_a_script_refused_inside_a_pipeline_harms_no_other_job(open_store, raw):
    store = await open_store()
    await store.append([draft("v", "before")])
    await raw.set(redis_format.log_key("v"), "in the way")
    outcomes = await asyncio.gather(store.append([draft("t", 1)]), store.append([draft("v", 1)]),
                                    store.set_cursor("alice", "t", 1),
                                    store.append([draft("t", 2)]), return_exceptions=True)
    assert isinstance(outcomes[1], StoreError)
    assert [outcomes[0].receipts[0].seq, outcomes[3].receipts[0].seq] == [1, 2]
    assert await store.get_cursor("alice", "t") == Position(
        1, (await store.read_since("t", 0, 0)).epoch)


# Retention and expiry


async def test_reads_never_return_messages_older_than_max_age(open_store, raw):
    # Sleeping can only overshoot: 1 and 2 are surely past max_age at the
    # read; 3 has 1.2 s to spare on a busy machine.
    store = await open_store(max_age=2.0)
    await store.append([draft("t", 1), draft("t", 2)])
    await asyncio.sleep(1.5)
    await store.append([draft("t", 3)])
    await asyncio.sleep(0.8)  # 1 and 2 are past max_age now, 3 is not; no append since
    history = await store.read_since("t", 0, 100)
    assert [m.seq for m in history.messages] == [3]
    assert (history.head, history.oldest) == (3, 3)
    assert await raw.zcard(redis_format.log_key("t")) == 1  # trimmed, not only skipped


async def test_reads_from_a_cursor_skip_expired_messages_too(open_store):
    store = await open_store(max_age=2.0)
    await store.append([draft("t", 1), draft("t", 2)])
    await store.set_cursor("alice", "t", 1)
    await asyncio.sleep(1.5)
    await store.append([draft("t", 3)])
    await asyncio.sleep(0.8)
    resume = await store.read_from_cursor("alice", "t", None, 100)
    assert resume.since == 1
    assert [m.seq for m in resume.history.messages] == [3]
    assert resume.history.oldest == 3


async def test_idle_logs_and_idempotency_keys_expire_by_themselves(open_store, raw):
    store = await open_store(max_age=3600.0)
    await store.append([draft("t", 1, key="k")])
    assert 3590_000 < await raw.pttl(redis_format.log_key("t")) <= 3600_000
    assert 86390 < await raw.ttl(redis_format.idempotency_key("t", "k")) <= 86400
    assert await raw.ttl(redis_format.meta_key("t")) == -1  # the head and epoch stay
    short = await open_store(max_age=0.2)
    await short.append([draft("u", 1)])
    await asyncio.sleep(0.4)
    assert await raw.exists(redis_format.log_key("u")) == 0
    history = await short.read_since("u", 0, 10)
    assert (history.messages, history.head, history.oldest) == ([], 1, 2)


# What open says





@pytest.mark.parametrize("appendonly, appendfsync, survives", [
    (True, "always", "power loss"),
    (True, "everysec", "last second"),
    (False, "always", "loses everything"),
])
async def test_open_logs_what_an_acknowledged_write_survives(tmp_path, captured, appendonly,
                                                             appendfsync, survives):
    with RedisServer(tmp_path, appendonly=appendonly, appendfsync=appendfsync) as server:
        store = RedisStore(server.url)
        await store.open()
        await store.close()
        server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        store = RedisStore(server.url)
        await store.open()
        await store.close()
    first, second = events(captured, "store.redis_durability")
    first.pop("timestamp"), second.pop("timestamp")
    assert survives in first["survives"] and first == second
    assert first["appendfsync"] == appendfsync
    (warning,) = events(captured, "store.redis_eviction")
    assert warning["level"] == "warning" and warning["policy"] == "allkeys-lru"
