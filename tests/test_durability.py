"""Nothing answered 2xx is ever lost: SIGKILL `notifier serve` while
publishers are running, restart it, and replay everything from since 0."""

from __future__ import annotations

import http.client
import signal
import threading
import time

import pytest

from procs import ServerProcess, read_history, send

PUBLISHERS = 8
TOPIC = "durable.test"


def _publisher(port: int, index: int, stop: threading.Event, answered: list, failures: list) -> None:
    """Publish in a loop on one keep-alive connection, recording each 2xx."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    count = 0
    try:
        while not stop.is_set():
            data = {"publisher": index, "n": count}
            try:
                status, body = send(connection, "POST", "/api/publish", {"topic": TOPIC, "data": data})
            except (OSError, http.client.HTTPException):
                return  # the server died under us: that answer never came
            if status != 200:
                failures.append((status, body))
                return
            answered.append((body["seq"], body["id"], data))
            count += 1
    finally:
        connection.close()


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_publish(tmp_path):
    server = ServerProcess(tmp_path).start().wait_ready()
    stop = threading.Event()
    answered: list = []
    failures: list = []
    threads = [threading.Thread(target=_publisher, args=(server.port, i, stop, answered, failures))
               for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(answered) < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.signal(signal.SIGKILL)
    server.wait(5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert not failures, failures
    assert len(answered) >= 500, f"only {len(answered)} publishes answered before the kill"

    restarted = ServerProcess(tmp_path, store_path=server.store_path).start().wait_ready()
    try:
        stored = read_history(restarted, TOPIC)
    finally:
        restarted.kill()
    seqs = [message["seq"] for message in stored]
    assert seqs == list(range(1, len(stored) + 1)), "seqs must run 1..N with no gap or disorder"
    by_seq = {message["seq"]: message for message in stored}
    for seq, message_id, data in answered:
        message = by_seq.get(seq)
        assert message is not None, f"acknowledged seq {seq} was lost"
        assert message["id"] == message_id and message["data"] == data
    assert len({seq for seq, _, _ in answered}) == len(answered)
    print(f"{len(answered)} acknowledged, {len(stored)} stored")


@pytest.mark.slow
def test_idempotency_key_survives_restart(tmp_path):
    body = {"topic": TOPIC, "data": {"v": 1}, "idempotency_key": "order-42"}
    with ServerProcess(tmp_path) as server:
        status, first = server.request("POST", "/api/publish", body)
        assert status == 200
    with ServerProcess(tmp_path, store_path=server.store_path) as restarted:
        status, again = restarted.request("POST", "/api/publish", {**body, "data": {"v": 2}})
        assert status == 200
        assert again == first
        assert [m["data"] for m in read_history(restarted, TOPIC)] == [{"v": 1}]


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_unreadable_store_fails_start_and_is_kept(tmp_path, content):
    store = tmp_path / "notifier.db"
    store.write_bytes(content)
    server = ServerProcess(tmp_path, store_path=store).start()
    code = server.wait(15)
    assert code != 0
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0], lines
    assert store.read_bytes() == content
