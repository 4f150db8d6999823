"""The Redis store: every topic's log, cursors and idempotency keys in one
Redis, changed only by Lua scripts, so each change is atomic, and the script
that stores a message also publishes it on the topic's channel: the order
in the log is the order on the bus. Keys and the one encoding of entries
and bus messages: notifier/redis_format.py.

Writes (appends and cursor updates) queue for one writer task. It sends
everything waiting, up to MAX_GROUP jobs, as one pipeline of EVALSHA calls
on its own connection and resolves them in pipeline order in one step: Redis
runs the scripts in that order, answers in that order, and with
``appendfsync always`` fsyncs them together before answering (Redis's own
group commit). Reads use a small pool of other connections.

Epochs. A topic's epoch is created by the first script that touches the
topic, a read as much as a write: each call brings a random candidate, kept
only when the topic has no epoch. So the epoch a subscriber is told before
anything was published is the one the first publish keeps, and
``positions`` agrees with ``read_since`` for never-used topics too. The cost
is one small hash per topic ever read, kept like SQLite's topics rows. When
a topic's meta is gone (a Redis without persistence restarted, someone
deleted it), the next script gives the topic a new epoch and drops any log
left without its meta, so seqs start again at 1 in a log no one can take
for the old one; cursors and idempotency keys remember their epoch, so
neither is taken for the new log's.

Retention. Count retention runs in every append. Age retention runs in every
append and every read, from the front of the log (entries are in time
order), so no read returns a message older than ``max_age``; and the log key
expires ``max_age`` after its topic's last append, so idle topics' logs
vanish by themselves. There is no pruning pass. Ages come from Redis's TIME,
so every node agrees on them.

Durability. A write is acknowledged once Redis answered it, under Redis's
own persistence settings, which ``open`` reads and logs. Nothing is ever
sent twice: a script sent again after a lost reply could store twice, so a
connection error, timeout or Redis error fails the job (StoreError) within
TIMEOUT, and the next job goes out on a new connection.

A batch spanning topics is one script call holding every topic's keys:
atomic on a single Redis. Redis Cluster would refuse it (the keys live in
different slots); docs/architecture.md says what Cluster would change.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as LostConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from notifier import logs, redis_format
from notifier.messages import Draft, Message, new_id, rfc3339
from notifier.store.base import (
    IDEMPOTENCY_WINDOW, AppendResult, History, Position, Receipt, Resume, SeqAboveHead, Store,
    StoreError, resolve_in_order,
)

_log = logs.get("notifier.store")

MAX_GROUP = 512          # jobs per pipeline: bounds one round trip's latency
READ_CONNECTIONS = 8     # the reads' pool; a read waits for a free one up to TIMEOUT
TIMEOUT = 3.0            # seconds to connect, and to wait for any reply
POSITIONS_PER_CALL = 500  # topics per positions script call (all calls in one round trip)

# Shared by every script. Entries start "<seq> <created_ms> ".
_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function created_of(entry)
  return tonumber(string.match(entry, '^%d+ (%d+) '))
end

-- Age retention: drop the entries created before `cutoff` (ms) from the
-- front of the log. Entries are in time order: the first fresh one ends it.
local function trim_expired(log, cutoff)
  local front = redis.call('ZRANGE', log, 0, 0)
  if #front == 0 or created_of(front[1]) >= cutoff then return end
  while true do
    local chunk = redis.call('ZRANGE', log, 0, 31)
    local expired = #chunk
    for i = 1, #chunk do
      if created_of(chunk[i]) >= cutoff then expired = i - 1; break end
    end
    if expired > 0 then redis.call('ZREMRANGEBYRANK', log, 0, expired - 1) end
    if expired < 32 then return end
  end
end

-- The topic's epoch and head. A topic without an epoch gets `candidate`;
-- a log left without its meta belongs to no epoch and goes.
local function position(meta, log, candidate)
  local got = redis.call('HMGET', meta, 'epoch', 'head')
  if got[1] then return got[1], tonumber(got[2]) or 0 end
  redis.call('DEL', meta, log)
  redis.call('HSET', meta, 'epoch', candidate)
  return candidate, 0
end

local function oldest_of(log, head)
  local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return head + 1
end
"""

# KEYS: meta, log. ARGV: since, limit, candidate epoch, max_age_ms.
# Returns {head, epoch, oldest, {entry...}}.
_READ = _LUA_COMMON + """
local epoch, head = position(KEYS[1], KEYS[2], ARGV[3])
trim_expired(KEYS[2], now_ms() - tonumber(ARGV[4]))
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
end
return {head, epoch, oldest_of(KEYS[2], head), entries}
"""

# KEYS: meta, log, cursors. ARGV: user, default since ('' for none), limit,
# candidate epoch, max_age_ms. Returns {head, epoch, oldest, cursor or nil,
# since ('' for none), {entry...}}.
_RESUME = _LUA_COMMON + """
local epoch, head = position(KEYS[1], KEYS[2], ARGV[4])
trim_expired(KEYS[2], now_ms() - tonumber(ARGV[5]))
local cursor = redis.call('HGET', KEYS[3], ARGV[1])
local since = ARGV[2]
if cursor then
  local seq, cursor_epoch = string.match(cursor, '^(%d+) (.*)$')
  -- a stale cursor: everything in this log is new to the user
  if cursor_epoch == epoch then since = seq else since = '0' end
end
local entries = {}
if since ~= '' and tonumber(ARGV[3]) > 0 then
  entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf', 'LIMIT', 0, ARGV[3])
end
return {head, epoch, oldest_of(KEYS[2], head), cursor, since, entries}
"""

# KEYS: meta, log, cursors. ARGV: user, seq, candidate epoch.
# Returns the head; -1 - head when seq is above it (nothing stored).
_CURSOR = _LUA_COMMON + """
local got = redis.call('HMGET', KEYS[1], 'epoch', 'head')
local head = tonumber(got[2]) or 0
if not got[1] then head = 0 end
if tonumber(ARGV[2]) > head then return -1 - head end
local epoch = position(KEYS[1], KEYS[2], ARGV[3])
local current = redis.call('HGET', KEYS[3], ARGV[1])
if current then
  local seq, cursor_epoch = string.match(current, '^(%d+) (.*)$')
  -- forward only within an epoch; a cursor from another epoch is replaced
  if cursor_epoch == epoch and tonumber(seq) >= tonumber(ARGV[2]) then return head end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. epoch)
return head
"""

# KEYS: meta, log of each topic. ARGV: candidate epoch.
# Returns {head, epoch, head, epoch, ...} in KEYS order.
_POSITIONS = _LUA_COMMON + """
local out = {}
for i = 1, #KEYS / 2 do
  local epoch, head = position(KEYS[2 * i - 1], KEYS[2 * i], ARGV[1])
  out[2 * i - 1] = head
  out[2 * i] = epoch
end
return out
"""

# KEYS: meta and log of each of the batch's T topics, then each distinct
# idempotency key. ARGV: candidate epoch, max_messages, max_age_ms,
# idempotency window (s), T, the T channels, then three per draft: its
# topic's number (1..T), its idempotency key's number (0: none), its entry
# tail. Returns {epoch of each topic..., then per draft: its new seq, or the
# first receipt "<seq> <id> <time>" when its key was used in this epoch}.
_APPEND = _LUA_COMMON + """
local topics = tonumber(ARGV[5])
local max_messages = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
local first_draft = 6 + topics
-- Every read and check comes first: past them, nothing can fail halfway.
local epochs, heads, fresh = {}, {}, {}
for t = 1, topics do
  local got = redis.call('HMGET', KEYS[2 * t - 1], 'epoch', 'head')
  local kind = redis.call('TYPE', KEYS[2 * t])['ok']
  if kind ~= 'zset' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[2 * t] .. ' holds a ' .. kind)
  end
  if got[1] then
    epochs[t], heads[t] = got[1], tonumber(got[2]) or 0
  else
    epochs[t], heads[t], fresh[t] = ARGV[1], 0, true
  end
end
local out, stored = {}, {}
for t = 1, topics do out[t] = epochs[t] end
for base = first_draft, #ARGV, 3 do
  local t, k = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local earlier = nil
  if k > 0 and not fresh[t] then
    local value = redis.call('GET', KEYS[2 * topics + k])
    if value then
      local seq, epoch, receipt = string.match(value, '^(%d+) (%S+) (.*)$')
      if epoch == epochs[t] then earlier = seq .. ' ' .. receipt end
    end
  end
  if earlier then
    out[#out + 1] = earlier
  else
    heads[t] = heads[t] + 1
    out[#out + 1] = heads[t]
    stored[#stored + 1] = {t, heads[t], k, ARGV[base + 2]}
  end
end
-- The writes.
for t = 1, topics do
  if fresh[t] then
    redis.call('DEL', KEYS[2 * t - 1], KEYS[2 * t])
    redis.call('HSET', KEYS[2 * t - 1], 'epoch', epochs[t])
  end
end
local now = now_ms()
local touched = {}
for _, s in ipairs(stored) do
  local t, seq, k, tail = s[1], s[2], s[3], s[4]
  local entry = string.format('%d %d ', seq, now) .. tail
  redis.call('ZADD', KEYS[2 * t], seq, entry)
  if k > 0 then
    redis.call('SET', KEYS[2 * topics + k],
               string.format('%d ', seq) .. epochs[t] .. ' ' .. string.match(tail, '^%S+ %S+'),
               'EX', ARGV[4])
  end
  s[4] = entry
  touched[t] = true
end
for t in pairs(touched) do
  local log = KEYS[2 * t]
  redis.call('HSET', KEYS[2 * t - 1], 'head', heads[t])
  if heads[t] > max_messages then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', heads[t] - max_messages)
  end
  trim_expired(log, now - max_age)
  redis.call('PEXPIRE', log, max_age)
end
for _, s in ipairs(stored) do
  redis.call('PUBLISH', ARGV[5 + s[1]], epochs[s[1]] .. ' ' .. s[4])
end
return out
"""

_SCRIPTS = {"read": _READ, "resume": _RESUME, "cursor": _CURSOR, "positions": _POSITIONS,
            "append": _APPEND}


@dataclass(slots=True)
class _Job:
    script: str
    keys: list[str]
    args: list[Any]
    finish: Callable[[Any], Any]            # the script's reply -> the caller's result
    future: asyncio.Future
    on_done: Callable[[Any], None] | None = None
    noscript: bool = False   # sent once already, when Redis had forgotten the script


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _epoch() -> str:
    """A new epoch, should the topic have none yet: every call passes one
    in, so it must be cheap. Unique across processes and time (ms time,
    process tag, counter), like a message id; it needs no secrecy."""
    return new_id()


class RedisStore(Store):
    """Every topic has its own epoch. ``url``: redis://, rediss:// or
    unix://, as redis-py reads it; ``timeout`` bounds connecting and every
    wait for an answer."""

    publishes = True  # the append script publishes what it stores

    def __init__(self, url: str, max_messages: int = 10000, max_age: float = 7 * 86400.0,
                 timeout: float = TIMEOUT):
        self.url = url
        self.max_messages = max_messages
        self.max_age = max_age
        self.timeout = timeout
        self._max_age_ms = max(1, int(max_age * 1000))
        self._shas: dict[str, str] = {}
        self._writes: aioredis.Redis | None = None
        self._reads: aioredis.Redis | None = None
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False
        self.commit_observer: Callable[[float, int], None] | None = None

    # Opening and shutdown

    def _pool(self, pool_class: type, **options) -> aioredis.Redis:
        pool = pool_class.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), client_name="notifier-store", **options)
        return aioredis.Redis.from_pool(pool)

    def _where(self) -> str:
        if self._reads is None:
            return "redis"
        options = self._reads.connection_pool.connection_kwargs
        if "path" in options:
            return f"redis at unix:{options['path']}"
        return f"redis at {options.get('host')}:{options.get('port')}/{options.get('db', 0)}"

    async def open(self) -> None:
        try:
            self._reads = self._pool(aioredis.BlockingConnectionPool,
                                     max_connections=READ_CONNECTIONS, timeout=self.timeout)
            self._writes = self._pool(aioredis.ConnectionPool, max_connections=1)
        except ValueError as exc:
            raise StoreError(f"store.redis_url is not usable: {_one_line(exc)}") from None
        try:
            await self._reads.ping()
            await self._load_scripts()
            await self._report_durability()
        except (RedisError, OSError) as exc:
            where = self._where()
            await self._release()
            raise StoreError(f"{where} cannot be used: {_one_line(exc)}") from None
        self._closing = False
        self._writer = asyncio.ensure_future(self._write_loop())

    async def _load_scripts(self) -> None:
        for name, source in _SCRIPTS.items():
            self._shas[name] = await self._reads.script_load(source)

    async def _report_durability(self) -> None:
        """One line saying what an acknowledged write survives, from the
        server's own persistence settings; a warning when it may evict."""
        try:
            settings = {}
            for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
                settings.update(await self._reads.config_get(name))
        except ResponseError as exc:
            _log.warning("store.redis_durability", where=self._where(), survives="unknown",
                         reason=f"CONFIG GET refused ({_one_line(exc)}); check the server's "
                                "appendonly and appendfsync settings yourself")
            return
        appendonly = settings.get("appendonly", "")
        fsync = settings.get("appendfsync", "")
        if appendonly == "yes" and fsync == "always":
            survives = ("a Redis crash and a power loss: Redis fsyncs each write before it "
                        "answers")
        elif appendonly == "yes" and fsync == "everysec":
            survives = ("all but the last second or so: a crash of Redis or of the machine "
                        "can lose up to about a second of acknowledged writes (two when the "
                        "disk stalls)")
        elif appendonly == "yes":
            survives = ("a Redis crash, mostly; a machine crash or power loss loses what the "
                        "OS had not written yet (appendfsync no: up to about 30 s on Linux)")
        elif settings.get("save"):
            survives = "not a restart: it loses every write since the last RDB snapshot"
        else:
            survives = "nothing: with no AOF and no snapshots a restart loses everything"
        _log.info("store.redis_durability", where=self._where(), appendonly=appendonly,
                  appendfsync=fsync, survives=survives)
        policy = settings.get("maxmemory-policy", "")
        if policy and policy != "noeviction":
            _log.warning("store.redis_eviction", where=self._where(), policy=policy,
                         risk="under memory pressure Redis may evict logs and cursors; "
                              "set maxmemory-policy noeviction")

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            await self._writer
            self._writer = None
        await self._release()

    async def _release(self) -> None:
        for client in (self._writes, self._reads):
            if client is not None:
                await client.aclose()
        self._writes = self._reads = None

    # The writer task

    def _submit(self, script: str, keys: list[str], args: list[Any],
                finish: Callable[[Any], Any],
                on_done: Callable[[Any], None] | None = None) -> asyncio.Future:
        if self._writer is None or self._closing:
            raise StoreError("store is closed")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(script, keys, args, finish, future, on_done))
        self._wakeup.set()
        return future

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(len(self._pending), MAX_GROUP)
            jobs = [self._pending.popleft() for _ in range(count)]
            try:
                await self._commit(jobs)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive one bad group
                _log.error("store.write_failed", error=_one_line(exc))
                resolve_in_order([(job, None, StoreError(f"write failed: {_one_line(exc)}"))
                                  for job in jobs if not job.future.done()])

    async def _commit(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        # The pipeline by hand: packed by hiredis into one buffer, sent in
        # one write, its replies read in order. redis-py's Pipeline object
        # costs about a third more CPU per append for the same round trip.
        pool = self._writes.connection_pool
        replies: list[Any] = []
        lost: StoreError | None = None
        try:
            connection = await pool.get_connection()  # a new one if the last one died
            try:
                await connection.send_packed_command(b"".join(
                    hiredis.pack_command(("EVALSHA", self._shas[job.script], len(job.keys),
                                          *job.keys, *job.args))
                    for job in jobs), check_health=False)
                for _ in jobs:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:  # this job's own error; the rest go on
                        replies.append(error)
            finally:
                await pool.release(connection)
        except (RedisError, OSError) as exc:
            # The jobs without a reply may or may not have run: they fail
            # (never sent again), the ones answered before keep their answer.
            lost = self._failure(exc)
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        missing: list[_Job] = []
        for job, reply in zip(jobs, replies):
            if isinstance(reply, NoScriptError) and not job.noscript:
                # Redis forgot its scripts (a restart): this one did not run; send it again.
                job.noscript = True
                missing.append(job)
            elif isinstance(reply, Exception):
                outcomes.append((job, None, self._failure(reply)))
            else:
                try:
                    outcomes.append((job, job.finish(reply), None))
                except StoreError as exc:
                    outcomes.append((job, None, exc))
        outcomes += [(job, None, lost) for job in jobs[len(replies):]]
        if self.commit_observer is not None:
            self.commit_observer(time.perf_counter() - started, len(jobs))
        # One step for the whole pipeline, in its order: Redis's commit order.
        resolve_in_order(outcomes)
        if missing:
            try:
                await self._load_scripts()
            except (RedisError, OSError) as exc:
                failure = self._failure(exc)
                resolve_in_order([(job, None, failure) for job in missing])
                return
            self._pending.extendleft(reversed(missing))

    # Writes

    async def append(self, drafts: Sequence[Draft],
                     on_durable: Callable[[AppendResult], None] | None = None) -> AppendResult:
        when = rfc3339(time.time())
        numbers: dict[str, int] = {}             # topic -> its number in the script (1..T)
        idempotency_keys: list[str] = []
        sent: list[tuple[Draft, str]] = []       # the drafts sent, with their message ids
        first_of: dict[tuple[str, str], int] = {}  # (topic, key) -> its first draft's place in sent
        places: list[int] = []                   # each draft's place in sent
        args: list[Any] = []
        for draft in drafts:
            key = (draft.topic, draft.idempotency_key) if draft.idempotency_key else None
            if key is not None and key in first_of:
                places.append(first_of[key])  # repeated in this call: the first receipt
                continue
            number = numbers.setdefault(draft.topic, len(numbers) + 1)
            key_number = 0
            if key is not None:
                idempotency_keys.append(redis_format.idempotency_key(*key))
                key_number = len(idempotency_keys)
                first_of[key] = len(sent)
            message_id = new_id()
            try:
                tail = redis_format.entry_tail(message_id, when, draft.event, draft.data)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"a draft for {draft.topic} cannot be stored: "
                                 f"{_one_line(exc)}") from None
            places.append(len(sent))
            sent.append((draft, message_id))
            args += (number, key_number, tail)
        topics = list(numbers)
        keys = [key for topic in topics
                for key in (redis_format.meta_key(topic), redis_format.log_key(topic))]
        keys += idempotency_keys
        head_args = [_epoch(), self.max_messages, self._max_age_ms, int(IDEMPOTENCY_WINDOW),
                     len(topics), *(redis_format.channel(topic) for topic in topics)]

        def finish(reply: list) -> AppendResult:
            epochs = [epoch.decode() for epoch in reply[:len(topics)]]
            receipts: list[Receipt] = []
            stored: list[Message] = []
            for (draft, message_id), outcome in zip(sent, reply[len(topics):]):
                if isinstance(outcome, int):
                    epoch = epochs[numbers[draft.topic] - 1]
                    stored.append(Message(draft.topic, outcome, epoch, message_id, when,
                                          draft.event, draft.data))
                    receipts.append(Receipt(draft.topic, outcome, message_id, when))
                else:
                    seq, first_id, first_time = outcome.decode().split(" ")
                    receipts.append(Receipt(draft.topic, int(seq), first_id, first_time))
            return AppendResult([receipts[place] for place in places], stored)

        return await self._submit("append", keys, head_args + args, finish, on_durable)

    async def set_cursor(self, user: str, topic: str, seq: int) -> None:
        def finish(head: int) -> None:
            if head < 0:
                raise SeqAboveHead(f"seq {seq} is above the head of {topic} ({-1 - head})")

        keys = [redis_format.meta_key(topic), redis_format.log_key(topic),
                redis_format.cursors_key(topic)]
        await self._submit("cursor", keys, [user, seq, _epoch()], finish)

    # Reads

    def _failure(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self._where()}: {_one_line(exc)}")

    async def _read(self, call: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """``call`` on the reads' pool. Reads are safe to run again (their
        only writes, creating an epoch and trimming, are idempotent), so
        each runs once more after a lost connection (a pooled connection
        that died with a Redis restart) and after NOSCRIPT (a restarted
        Redis forgot the scripts). A timeout is not repeated: a hung Redis
        fails the call within TIMEOUT."""
        if self._reads is None or self._closing:
            raise StoreError("store is closed")
        lost = missing = False
        while True:
            try:
                return await call(self._reads)
            except NoScriptError as exc:
                if missing:
                    raise self._failure(exc) from None
                missing = True
                try:
                    await self._load_scripts()
                except (RedisError, OSError) as load_exc:
                    raise self._failure(load_exc) from None
            except LostConnection as exc:
                if lost:
                    raise self._failure(exc) from None
                lost = True
            except (RedisError, OSError) as exc:
                raise self._failure(exc) from None

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._read(
            lambda client: client.evalsha(self._shas[script], len(keys), *keys, *args))

    def _history(self, topic: str, head: int, epoch: bytes, oldest: int,
                 entries: list[bytes]) -> History:
        epoch_text = epoch.decode()
        messages = [redis_format.decode_entry(topic, epoch_text, entry)[0] for entry in entries]
        return History(messages, head, epoch_text, oldest)

    async def read_since(self, topic: str, since: int, limit: int) -> History:
        head, epoch, oldest, entries = await self._script(
            "read", [redis_format.meta_key(topic), redis_format.log_key(topic)],
            [since, limit, _epoch(), self._max_age_ms])
        return self._history(topic, head, epoch, oldest, entries)

    async def read_from_cursor(self, user: str, topic: str, default: int | None,
                               limit: int) -> Resume:
        keys = [redis_format.meta_key(topic), redis_format.log_key(topic),
                redis_format.cursors_key(topic)]
        head, epoch, oldest, cursor, since, entries = await self._script(
            "resume", keys, [user, "" if default is None else default, limit, _epoch(),
                             self._max_age_ms])
        return Resume(int(since) if since else None, _position(cursor),
                      self._history(topic, head, epoch, oldest, entries))

    async def get_cursor(self, user: str, topic: str) -> Position | None:
        return _position(await self._read(
            lambda client: client.hget(redis_format.cursors_key(topic), user)))

    async def positions(self, topics: Sequence[str]) -> dict[str, Position]:
        names = list(dict.fromkeys(topics))
        if not names:
            return {}
        chunks = [names[start:start + POSITIONS_PER_CALL]
                  for start in range(0, len(names), POSITIONS_PER_CALL)]

        async def call(client: aioredis.Redis) -> list:
            pipe = client.pipeline(transaction=False)
            for chunk in chunks:
                keys = [key for topic in chunk
                        for key in (redis_format.meta_key(topic), redis_format.log_key(topic))]
                pipe.evalsha(self._shas["positions"], len(keys), *keys, _epoch())
            return await pipe.execute()

        found: dict[str, Position] = {}
        for chunk, reply in zip(chunks, await self._read(call)):
            for i, topic in enumerate(chunk):
                found[topic] = Position(reply[2 * i], reply[2 * i + 1].decode())
        return found

    async def ping(self) -> None:
        if self._writer is None or self._writer.done():
            raise StoreError("the store's writer is not running")
        await self._read(lambda client: client.ping())


def _position(cursor: bytes | None) -> Position | None:
    """A stored cursor, ``<seq> <epoch>``."""
    if cursor is None:
        return None
    seq, epoch = cursor.decode().split(" ")
    return Position(int(seq), epoch)
