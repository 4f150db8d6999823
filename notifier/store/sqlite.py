"""The embedded default store: one SQLite file in WAL mode.

One writer thread owns the only write connection. Appends and cursor updates
queue up for it; everything waiting when it wakes is committed in a single
transaction (group commit), fsynced (``synchronous=FULL``), and only then
answered, so durability costs one fsync per group, not per publish. Reads run
on a small pool of reader connections, which WAL lets proceed during writes.
The event loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from notifier import logs
from notifier.messages import Draft, Message, new_id, rfc3339
from notifier.protocol import MAX_SEQ
from notifier.store.base import (
    IDEMPOTENCY_WINDOW, AppendResult, History, Position, Receipt, Resume, SeqAboveHead, Store,
    StoreError, resolve_in_order,
)

_log = logs.get("notifier.store")

MAX_GROUP = 512          # jobs per transaction: bounds one commit's latency
PRUNE_INTERVAL = 30.0    # seconds between age-based retention passes
PRUNE_CHUNK = 2000       # idempotency rows deleted per transaction, so publishes interleave
PRUNE_TOPICS = 200       # topics visited per retention transaction, likewise
READS_PER_TRIP = 64      # reads sent to a reader thread together, at most

SCHEMA_VERSION = 3

# Migrations, in order: MIGRATIONS[n] brings schema version n to n + 1.
MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE topics (topic TEXT PRIMARY KEY, head INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE messages (
        topic TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, time TEXT NOT NULL,
        created REAL NOT NULL, event TEXT, data BLOB NOT NULL,
        PRIMARY KEY (topic, seq)
    ) WITHOUT ROWID;
    CREATE INDEX messages_created ON messages (created);
    CREATE TABLE cursors (
        user TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
        PRIMARY KEY (user, topic)
    ) WITHOUT ROWID;
    CREATE TABLE idempotency (
        topic TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
        time TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (topic, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_created ON idempotency (created);
    """,
    # Age retention walks each topic in seq order instead (see SELECT_FIRST_FRESH).
    """
    DROP INDEX messages_created;
    """,
    # A cursor remembers the epoch it was acked under. Every topic of one
    # database shares the database's epoch, so existing cursors get it.
    """
    ALTER TABLE cursors ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
    UPDATE cursors SET epoch = (SELECT value FROM meta WHERE key = 'epoch');
    """,
]

SELECT_HEAD = "SELECT head FROM topics WHERE topic = ?"
UPSERT_HEAD = (
    "INSERT INTO topics (topic, head) VALUES (?, ?) "
    "ON CONFLICT (topic) DO UPDATE SET head = excluded.head"
)
INSERT_MESSAGE = (
    "INSERT INTO messages (topic, seq, id, time, created, event, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
SELECT_IDEMPOTENT = (
    "SELECT seq, id, time FROM idempotency WHERE topic = ? AND key = ? AND created > ?"
)
UPSERT_IDEMPOTENT = (
    "INSERT OR REPLACE INTO idempotency (topic, key, seq, id, time, created) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
PRUNE_BY_COUNT = "DELETE FROM messages WHERE topic = ? AND seq <= ?"
SELECT_TOPICS_AFTER = "SELECT topic FROM topics WHERE topic > ? ORDER BY topic LIMIT ?"
# Within a topic, messages are in time order, so the first fresh one bounds
# what age retention removes; walking there from the oldest costs no more
# rows than it deletes, and spares every insert an index on ``created``.
SELECT_FIRST_FRESH = (
    "SELECT seq FROM messages WHERE topic = ? AND created >= ? ORDER BY seq LIMIT 1"
)
PRUNE_IDEMPOTENCY = (
    "DELETE FROM idempotency WHERE (topic, key) IN "
    "(SELECT topic, key FROM idempotency WHERE created < ? LIMIT ?)"
)
SELECT_SINCE = (
    "SELECT seq, id, time, event, data FROM messages "
    "WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?"
)
SELECT_OLDEST = "SELECT min(seq) FROM messages WHERE topic = ?"
SELECT_CURSOR = "SELECT seq, epoch FROM cursors WHERE user = ? AND topic = ?"
# Forward only within an epoch; a cursor from another epoch is replaced.
UPSERT_CURSOR = (
    "INSERT INTO cursors (user, topic, seq, epoch) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (user, topic) DO UPDATE SET "
    "seq = CASE WHEN epoch = excluded.epoch THEN max(seq, excluded.seq) ELSE excluded.seq END, "
    "epoch = excluded.epoch"
)
SELECT_HEADS = "SELECT topic, head FROM topics WHERE topic IN ({})"
HEADS_PER_QUERY = 500  # well under SQLite's limit on bound parameters


@dataclass
class _Job:
    run: Callable[["_Transaction"], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_done: Callable[[Any], None] | None = None  # called with the result, on the loop


@dataclass
class _Transaction:
    """The writer's view of one group: heads changed so far, not yet committed."""

    db: sqlite3.Connection
    heads: dict[str, int]
    changed: dict[str, int] = field(default_factory=dict)

    def head(self, topic: str) -> int:
        if topic in self.changed:
            return self.changed[topic]
        if topic not in self.heads:
            row = self.db.execute(SELECT_HEAD, (topic,)).fetchone()
            self.heads[topic] = row[0] if row else 0
        return self.heads[topic]


def _connect(path: str) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly, so nothing is implicit.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


class SQLiteStore(Store):
    """Every topic's epoch is the database's: its logs can only be lost
    together, by replacing the file, and a new file gets a new epoch."""

    def __init__(self, path: str | os.PathLike, max_messages: int = 10000,
                 max_age: float = 7 * 86400.0):
        self.path = str(path)
        self.max_messages = max_messages
        self.max_age = max_age
        self.epoch = ""
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._waiting_reads: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._heads: dict[str, int] = {}
        self.commit_observer: Callable[[float, int], None] | None = None

    # Opening, schema and shutdown

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._open_sync)
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self._writer = threading.Thread(target=self._write_loop, name="store-write", daemon=True)
        self._writer.start()

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = None
        try:
            db = _connect(self.path)
            # Every check that can refuse the file runs before anything writes to it.
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"database {self.path} is damaged ({check}); refusing to start")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"notifier ({SCHEMA_VERSION})")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if self.path != ":memory:" and mode != "wal":
                raise StoreError(f"database {self.path} cannot use WAL mode (got {mode})")
            # FULL fsyncs the WAL at every commit: a 2xx survives power loss.
            db.execute("PRAGMA synchronous = FULL")
            self._migrate(db, version)
            self.epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        except (sqlite3.DatabaseError, StoreError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"database {self.path} cannot be opened: {exc}") from None
        self._write_db = db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        for step in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[step].split(";"):
                if statement.strip():
                    db.execute(statement)
            if step == 0:
                db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)",
                           (uuid.uuid4().hex[:16],))
            db.execute(f"PRAGMA user_version = {step + 1}")
            db.execute("COMMIT")

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        for db in self._reader_connections:
            db.close()
        self._reader_connections.clear()

    # The writer thread

    def _submit(self, run: Callable[[_Transaction], Any],
                on_done: Callable[[Any], None] | None = None) -> asyncio.Future:
        if self._writer is None:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(run, future, loop, on_done))
        return future

    def _write_loop(self) -> None:
        db = self._write_db
        next_prune = time.monotonic() + PRUNE_INTERVAL
        try:
            while True:
                try:
                    job = self._queue.get(timeout=max(0.0, next_prune - time.monotonic()))
                except queue.Empty:
                    job = False
                if job is None:
                    return
                if job:
                    jobs = [job]
                    stopping = self._gather(jobs)
                    self._commit_group(db, jobs)
                    if stopping:
                        return
                if time.monotonic() >= next_prune:
                    try:
                        self._prune_by_age(db)
                    except sqlite3.Error as exc:
                        # Retention can wait for the next pass; the writer must not die.
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        _log.error("store.prune_failed", error=str(exc))
                    next_prune = time.monotonic() + PRUNE_INTERVAL
        finally:
            db.close()

    def _gather(self, jobs: list[_Job]) -> bool:
        """Add the jobs already waiting to ``jobs``, up to MAX_GROUP. True when
        the shutdown mark was among them (it is taken off the queue)."""
        while len(jobs) < MAX_GROUP:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            jobs.append(job)
        return False

    def _commit_group(self, db: sqlite3.Connection, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        heads_before = dict(self._heads)
        try:
            db.execute("BEGIN IMMEDIATE")
            txn = _Transaction(db, self._heads)
            for job in jobs:
                # A savepoint per job: one failing job leaves the others' work intact.
                db.execute("SAVEPOINT job")
                changed_before = dict(txn.changed)
                try:
                    result = job.run(txn)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                    db.execute("ROLLBACK TO job")
                    txn.changed = changed_before
                    outcomes.append((job, None, exc if isinstance(exc, StoreError)
                                     else StoreError(str(exc))))
                else:
                    outcomes.append((job, result, None))
                db.execute("RELEASE job")
            for topic, head in txn.changed.items():
                db.execute(UPSERT_HEAD, (topic, head))
                if head > self.max_messages:
                    db.execute(PRUNE_BY_COUNT, (topic, head - self.max_messages))
            db.execute("COMMIT")
            self._heads.update(txn.changed)
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._heads = heads_before
            failure = StoreError(f"commit failed: {exc}")
            outcomes = [(job, None, failure) for job in jobs]
        if self.commit_observer is not None:
            self.commit_observer(time.perf_counter() - started, len(jobs))
        # One callback per loop per group, resolving in commit order.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(resolve_in_order, items)
            except RuntimeError:
                pass  # that loop is closed; nobody is waiting any more

    def _delete_expired(self, db: sqlite3.Connection, after: str, topics: int) -> tuple[int, str | None]:
        """Age retention for up to ``topics`` topics (-1: all) named after
        ``after``, plus expired idempotency keys. Returns the rows deleted and
        the topic to continue after, or None once every topic was visited."""
        now = time.time()
        cutoff = now - self.max_age
        names = [row[0] for row in db.execute(SELECT_TOPICS_AFTER, (after, topics))]
        deleted = 0
        for topic in names:
            fresh = db.execute(SELECT_FIRST_FRESH, (topic, cutoff)).fetchone()
            keep_from = fresh[0] if fresh else MAX_SEQ
            deleted += db.execute(PRUNE_BY_COUNT, (topic, keep_from - 1)).rowcount
        deleted += db.execute(PRUNE_IDEMPOTENCY, (now - IDEMPOTENCY_WINDOW,
                                                  PRUNE_CHUNK if topics > 0 else -1)).rowcount
        return deleted, (names[-1] if topics > 0 and len(names) == topics else None)

    def _prune_by_age(self, db: sqlite3.Connection) -> None:
        after: str | None = ""
        while after is not None:
            db.execute("BEGIN IMMEDIATE")
            _, after = self._delete_expired(db, after, PRUNE_TOPICS)
            db.execute("COMMIT")
            if after is None:
                return
            # Let queued publishes in between chunks.
            jobs: list[_Job] = []
            stopping = self._gather(jobs)
            if jobs:
                self._commit_group(db, jobs)
            if stopping:
                self._queue.put(None)  # for the main loop; the pass resumes next start
                return

    # Writes

    async def append(self, drafts: Sequence[Draft],
                     on_durable: Callable[[AppendResult], None] | None = None) -> AppendResult:
        drafts = list(drafts)
        return await self._submit(lambda txn: _append(txn, drafts, self.epoch), on_durable)

    async def set_cursor(self, user: str, topic: str, seq: int) -> None:
        def run(txn: _Transaction) -> None:
            head = txn.head(topic)
            if seq > head:
                raise SeqAboveHead(f"seq {seq} is above the head of {topic} ({head})")
            txn.db.execute(UPSERT_CURSOR, (user, topic, seq, self.epoch))
        await self._submit(run)

    async def prune_now(self) -> int:
        """Apply age-based retention right away, in one transaction; returns rows deleted."""
        return await self._submit(lambda txn: self._delete_expired(txn.db, "", -1)[0])

    # Reads

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._reader_local, "db", None)
        if db is None:
            db = _connect(self.path)
            self._reader_local.db = db
            self._reader_connections.append(db)
        return db

    async def _read(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``run`` on a reader thread, in a snapshot. Reads asked for in
        the same loop turn travel together: one trip to a thread and one
        snapshot for all of them, one callback back (a burst of connections
        each reading its personal topic would otherwise pay a thread hop,
        a Future and a wake-up apiece)."""
        if self._readers is None:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._waiting_reads
        waiting.append((run, future))
        if len(waiting) == 1:
            loop.call_soon(self._send_reads, loop)
        return await future

    def _send_reads(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting, self._waiting_reads = self._waiting_reads, []
        if self._readers is None:
            for _, future in waiting:
                if not future.done():
                    future.set_exception(StoreError("store is closed"))
            return
        # In slices, so both reader threads share a large burst.
        for start in range(0, len(waiting), READS_PER_TRIP):
            self._readers.submit(self._read_many, waiting[start:start + READS_PER_TRIP], loop)

    def _read_many(self, reads: list, loop: asyncio.AbstractEventLoop) -> None:
        outcomes = []
        try:
            db = self._reader()
            db.execute("BEGIN")
            try:
                for run, future in reads:
                    try:
                        outcomes.append((future, run(db), None))
                    except sqlite3.Error as exc:
                        outcomes.append((future, None, StoreError(f"read failed: {exc}")))
                    except Exception as exc:  # noqa: BLE001 - its caller gets it, the rest go on
                        outcomes.append((future, None, exc))
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            failure = StoreError(f"read failed: {exc}")
            outcomes = [(future, None, failure) for _, future in reads]
        try:
            loop.call_soon_threadsafe(_settle_reads, outcomes)
        except RuntimeError:
            pass  # that loop is closed; nobody is waiting any more

    async def read_since(self, topic: str, since: int, limit: int) -> History:
        return await self._read(lambda db: self._history(db, topic, since, limit))

    async def read_from_cursor(self, user: str, topic: str, default: int | None,
                               limit: int) -> Resume:
        def run(db: sqlite3.Connection) -> Resume:
            row = db.execute(SELECT_CURSOR, (user, topic)).fetchone()
            cursor = Position(*row) if row else None
            if cursor is None:
                since = default
            else:
                since = cursor.seq if cursor.epoch == self.epoch else 0
            if since is None:
                return Resume(None, None, self._history(db, topic, 0, 0))
            return Resume(since, cursor, self._history(db, topic, since, limit))
        return await self._read(run)

    def _history(self, db: sqlite3.Connection, topic: str, since: int, limit: int) -> History:
        row = db.execute(SELECT_HEAD, (topic,)).fetchone()
        head = row[0] if row else 0
        oldest = db.execute(SELECT_OLDEST, (topic,)).fetchone()[0]
        rows = db.execute(SELECT_SINCE, (topic, since, limit)).fetchall() if limit else []
        epoch = self.epoch
        messages = [Message(topic, seq, epoch, mid, mtime, event, data)
                    for seq, mid, mtime, event, data in rows]
        return History(messages, head, epoch, head + 1 if oldest is None else oldest)

    async def get_cursor(self, user: str, topic: str) -> Position | None:
        def run(db: sqlite3.Connection) -> Position | None:
            row = db.execute(SELECT_CURSOR, (user, topic)).fetchone()
            return Position(*row) if row else None
        return await self._read(run)

    async def positions(self, topics: Sequence[str]) -> dict[str, Position]:
        def run(db: sqlite3.Connection) -> dict[str, Position]:
            heads = dict.fromkeys(topics, 0)
            names = list(heads)
            for start in range(0, len(names), HEADS_PER_QUERY):
                chunk = names[start:start + HEADS_PER_QUERY]
                query = SELECT_HEADS.format(",".join("?" * len(chunk)))
                heads.update(db.execute(query, chunk).fetchall())
            return {topic: Position(head, self.epoch) for topic, head in heads.items()}
        return await self._read(run)

    async def ping(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            raise StoreError("the store's writer is not running")
        await self._read(lambda db: db.execute("SELECT 1").fetchone())


def _append(txn: _Transaction, drafts: list[Draft], epoch: str) -> AppendResult:
    now = time.time()
    when = rfc3339(now)
    receipts: list[Receipt] = []
    stored: list[Message] = []
    seen: dict[tuple[str, str], Receipt] = {}
    message_rows = []
    key_rows = []
    for draft in drafts:
        key = (draft.topic, draft.idempotency_key) if draft.idempotency_key else None
        if key is not None:
            earlier = seen.get(key)
            if earlier is None:
                row = txn.db.execute(SELECT_IDEMPOTENT, (*key, now - IDEMPOTENCY_WINDOW)).fetchone()
                earlier = Receipt(draft.topic, *row) if row else None
            if earlier is not None:
                receipts.append(earlier)
                continue
        seq = txn.head(draft.topic) + 1
        txn.changed[draft.topic] = seq
        message = Message(draft.topic, seq, epoch, new_id(), when, draft.event, draft.data)
        message_rows.append((draft.topic, seq, message.id, when, now, draft.event, draft.data))
        receipt = Receipt(draft.topic, seq, message.id, when)
        if key is not None:
            key_rows.append((*key, seq, message.id, when, now))
            seen[key] = receipt
        receipts.append(receipt)
        stored.append(message)
    txn.db.executemany(INSERT_MESSAGE, message_rows)
    if key_rows:
        txn.db.executemany(UPSERT_IDEMPOTENT, key_rows)
    return AppendResult(receipts, stored)


def _settle_reads(outcomes: list) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue  # the reader gave up (cancelled)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
