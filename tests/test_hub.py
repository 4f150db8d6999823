"""The hub as a data structure: subscriptions, parking during replay, fan-out
of one shared frame, presence and the slow-consumer limit. Peers are small
recording objects: no sockets are involved at this level."""

from __future__ import annotations

import orjson

from notifier.frames import text_frame
from notifier.hub import Hub
from notifier.messages import Message


class Peer:
    def __init__(self, id: str, user: str):
        self.id = id
        self.user = user
        self.frames: list[tuple[bytes, bytes]] = []
        self.slow = 0
        self.outbox = self  # the peer records what its outbox is given
        self.queued = 0
        self.behind: list = []  # subscriptions it was asked to catch up

    def write(self, frames: bytes, payloads) -> None:
        # One entry per message, each with the bytes object it went out in.
        self.frames.extend((frames, payload) for payload in payloads)

    def queue(self, frames: bytes, payloads) -> None:
        self.queued += len(payloads)
        self.write(frames, payloads)

    def slow_consumer(self) -> None:
        self.slow += 1

    def catch_up(self, subscription) -> None:
        self.behind.append(subscription)

    def seqs(self) -> list:
        return [orjson.loads(payload)["seq"] for _, payload in self.frames]

    def datas(self) -> list:
        return [orjson.loads(payload)["data"] for _, payload in self.frames]


EPOCH = "e1"


def message(topic: str, seq: int | None, data=None, epoch: str = EPOCH) -> Message:
    body = orjson.dumps(seq if data is None else data)
    return Message(topic, seq, None if seq is None else epoch, f"id-{topic}-{seq}",
                   "2024-05-01T12:00:00.000Z", None, body)


class ImmediateHub(Hub):
    """Flushes right after each deliver: the end of a loop turn, with no loop."""

    def deliver(self, messages) -> None:
        super().deliver(messages)
        self.flush()


def hub_with(*peers: Peer, max_parked_bytes: int = 1 << 20, **kwargs) -> Hub:
    hub = ImmediateHub(max_parked_bytes, lambda: None, **kwargs)
    for peer in peers:
        hub.add(peer)
    return hub


def live(hub: Hub, peer: Peer, topic: str, last_seq: int = 0):
    subscription = replaying(hub, peer, topic)
    subscription.last_seq = last_seq
    assert hub.go_live(subscription)
    return subscription


def replaying(hub: Hub, peer: Peer, topic: str):
    """A subscription as a session makes one: parked until go_live, in EPOCH."""
    subscription = hub.subscribe(peer, topic)
    subscription.epoch = EPOCH
    return subscription


def test_subscribe_parks_while_replaying():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    assert subscription.replaying is True
    hub.deliver([message("news", 1), message("news", 2)])
    assert alice.frames == []
    assert [m.seq for m, _, _ in subscription.parked] == [1, 2]
    assert subscription.parked_bytes == 2 * len(text_frame(message("news", 1).payload()))


def test_go_live_releases_parked_after_last_seq_in_order():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 3), message("news", 4), message("news", 5)])
    subscription.last_seq = 3  # the replay already sent 1..3
    hub.go_live(subscription)
    assert subscription.replaying is False and subscription.parked_bytes == 0
    assert alice.seqs() == [4, 5]
    hub.deliver([message("news", 6)])
    assert alice.seqs() == [4, 5, 6]


def test_go_live_skips_seqs_already_seen():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 1), message("news", 2)])
    subscription.last_seq = 2
    hub.go_live(subscription)
    assert alice.frames == []
    hub.deliver([message("news", 2), message("news", 1)])  # late duplicates
    assert alice.frames == []
    hub.deliver([message("news", 3)])
    assert alice.seqs() == [3]


def test_live_subscription_never_delivers_a_seq_twice_or_backwards():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    live(hub, alice, "news", last_seq=10)
    hub.deliver([message("news", 9), message("news", 10), message("news", 11),
                 message("news", 11), message("news", 12)])
    assert alice.seqs() == [11, 12]


def test_ephemeral_is_always_delivered():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "chat")
    hub.deliver([message("chat", None, "typing"), message("chat", 5), message("chat", None, "x")])
    subscription.last_seq = 5
    hub.go_live(subscription)
    assert alice.seqs() == [None, None]
    assert alice.datas() == ["typing", "x"]
    hub.deliver([message("chat", None, "again"), message("chat", None, "again")])
    assert alice.datas() == ["typing", "x", "again", "again"]
    assert subscription.last_seq == 5
    hub.deliver([message("chat", 6)])
    assert alice.seqs()[-1] == 6


def test_one_frame_object_shared_by_all_peers():
    peers = [Peer(f"c{i}", f"user{i}") for i in range(5)]
    hub = hub_with(*peers)
    for peer in peers:
        live(hub, peer, "news")
    sent = message("news", 1, {"headline": "hi"})
    hub.deliver([sent])
    first_frame, first_payload = peers[0].frames[0]
    assert first_frame == text_frame(sent.payload())
    assert first_payload == sent.payload()
    for peer in peers[1:]:
        assert len(peer.frames) == 1
        assert peer.frames[0][0] is first_frame
        assert peer.frames[0][1] is first_payload


def test_parked_and_live_peers_share_the_frame():
    early, late = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(early, late)
    live(hub, early, "news")
    subscription = replaying(hub, late, "news")
    hub.deliver([message("news", 1)])
    hub.go_live(subscription)
    assert late.frames[0][0] is early.frames[0][0]


def test_only_subscribers_of_the_topic_get_it():
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob)
    live(hub, alice, "news")
    live(hub, bob, "sport")
    hub.deliver([message("news", 1), message("sport", 1), message("other", 1)])
    assert alice.seqs() == [1] and orjson.loads(alice.frames[0][1])["topic"] == "news"
    assert bob.seqs() == [1] and orjson.loads(bob.frames[0][1])["topic"] == "sport"


def test_unsubscribe():
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob)
    live(hub, alice, "news")
    live(hub, bob, "news")
    assert hub.unsubscribe(alice, "news") is True
    assert hub.unsubscribe(alice, "news") is False
    assert hub.unsubscribe(alice, "never") is False
    hub.deliver([message("news", 1)])
    assert alice.frames == [] and bob.seqs() == [1]
    assert hub.topics_of(alice) == [] and hub.topics_of(bob) == ["news"]
    hub.unsubscribe(bob, "news")
    assert "news" not in hub.topics
    assert hub.subscription_count() == 0


def test_subscribe_again_replaces_the_subscription():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    first = live(hub, alice, "news")
    second = replaying(hub, alice, "news")
    assert hub.is_current(first) is False and hub.is_current(second) is True
    assert hub.subscription_count() == 1
    hub.deliver([message("news", 1)])
    assert alice.frames == []  # parked on the new one, not sent by the old one
    hub.go_live(second)
    assert alice.seqs() == [1]


def test_remove_drops_every_subscription():
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob)
    subscriptions = [live(hub, alice, topic) for topic in ("a", "b", "c")]
    live(hub, bob, "a")
    hub.remove(alice)
    assert all(hub.is_current(s) is False for s in subscriptions)
    assert set(hub.topics) == {"a"}
    assert hub.peers_of("alice") == [] and hub.topics_of(alice) == []
    hub.deliver([message("a", 1), message("b", 1)])
    assert alice.frames == [] and bob.seqs() == [1]
    hub.remove(alice)  # twice is harmless
    assert hub.unsubscribe(alice, "a") is False


def test_presence():
    a1, a2, bob, carol = Peer("c1", "alice"), Peer("c2", "alice"), Peer("c3", "bob"), Peer("c4", "carol")
    hub = hub_with(a1, a2, bob, carol)
    for peer in (bob, a1, a2):
        live(hub, peer, "room")
    hub.subscribe(carol, "room")  # still replaying: present all the same
    live(hub, carol, "other")
    assert hub.presence("room") == (["alice", "bob", "carol"], 4)
    assert hub.presence("other") == (["carol"], 1)
    assert hub.presence("empty") == ([], 0)
    hub.unsubscribe(a1, "room")
    assert hub.presence("room") == (["alice", "bob", "carol"], 3)
    hub.remove(a2)
    assert hub.presence("room") == (["bob", "carol"], 2)
    assert hub.users() == {"alice": 1, "bob": 1, "carol": 1}
    assert {peer.id for peer in hub.peers_of("alice")} == {"c1"}


def test_parked_bytes_over_the_limit_calls_slow_consumer():
    frame_size = len(text_frame(message("news", 1).payload()))
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob, max_parked_bytes=2 * frame_size)
    hub.subscribe(alice, "news")
    live(hub, bob, "news")
    hub.deliver([message("news", 1), message("news", 2)])
    assert alice.slow == 0  # exactly at the limit is fine
    hub.deliver([message("news", 3)])
    assert alice.slow >= 1
    assert bob.slow == 0 and bob.seqs() == [1, 2, 3]  # live peers are not parked


def test_go_live_resets_parked_bytes():
    frame_size = len(text_frame(message("news", 1).payload()))
    alice = Peer("c1", "alice")
    hub = hub_with(alice, max_parked_bytes=2 * frame_size)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 1), message("news", 2)])
    hub.go_live(subscription)
    hub.deliver([message("news", seq) for seq in range(3, 20)])
    assert alice.slow == 0 and alice.seqs() == list(range(1, 20))


def test_counters_and_delivery_callback():
    seen = []
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob, on_delivered=seen.append)
    live(hub, alice, "news")
    live(hub, bob, "news")
    hub.deliver([message("news", 1), message("nobody", 1)])
    assert hub.messages_in == 2 and hub.messages_out == 2
    assert seen == [2]
    hub.deliver([message("nobody", 2)])
    assert seen == [2] and hub.messages_in == 3


def test_one_turn_of_messages_goes_to_each_peer_in_one_write():
    peers = [Peer(f"c{i}", f"user{i}") for i in range(3)]
    hub = Hub(1 << 20, lambda: None)
    for peer in peers:
        hub.add(peer)
        live(hub, peer, "news")
    batch = [message("news", seq) for seq in range(1, 6)]
    hub.deliver(batch[:2])
    hub.deliver(batch[2:])
    assert peers[0].frames == []  # nothing leaves before the end of the turn
    hub.flush()
    joined = b"".join(text_frame(m.payload()) for m in batch)
    for peer in peers:
        assert peer.seqs() == [1, 2, 3, 4, 5]
        assert {id(frames) for frames, _ in peer.frames} == {id(peers[0].frames[0][0])}
        assert peer.frames[0][0] == joined


# Positions: each subscription expects last_seq + 1 in its epoch


def test_a_seq_further_ahead_parks_it_and_asks_to_catch_up():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = live(hub, alice, "news", last_seq=3)
    hub.deliver([message("news", 5)])  # 4 is still on its way, or was lost
    assert alice.frames == [] and alice.behind == [subscription]
    assert [m.seq for m, _, _ in subscription.parked] == [5]
    hub.deliver([message("news", 6)])  # parked too while catching up: asked once
    assert alice.behind == [subscription]
    assert [m.seq for m, _, _ in subscription.parked] == [5, 6]
    subscription.last_seq = 5  # the catch-up read 4 and 5 from the store
    assert hub.go_live(subscription)
    assert alice.seqs() == [6]


def test_a_hole_inside_one_batch_sends_up_to_it():
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob)
    first = live(hub, alice, "news", last_seq=1)
    live(hub, bob, "news", last_seq=4)
    hub.deliver([message("news", 2), message("news", 3), message("news", 5), message("news", 6)])
    assert alice.seqs() == [2, 3] and alice.behind == [first]
    assert [m.seq for m, _, _ in first.parked] == [5, 6]
    assert bob.seqs() == [5, 6] and bob.behind == []  # 2 and 3 were repeats for bob


def test_a_batch_that_follows_on_goes_in_one_write():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    live(hub, alice, "news", last_seq=7)
    hub.deliver([message("news", 8), message("news", None, "typing"), message("news", 9)])
    assert alice.seqs() == [8, None, 9] and len({frames for frames, _ in alice.frames}) == 1
    assert alice.behind == []


def test_another_epoch_means_catch_up_even_when_the_seq_follows_on():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = live(hub, alice, "news", last_seq=2)
    hub.deliver([message("news", 3, epoch="e2")])
    assert alice.frames == [] and alice.behind == [subscription]


def test_go_live_waits_while_what_was_parked_does_not_follow_on():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 4), message("news", 5)])
    subscription.last_seq = 2  # the replay read up to 2; 3 is missing
    assert hub.go_live(subscription) is False
    assert alice.frames == [] and subscription.replaying
    subscription.last_seq = 3
    assert hub.go_live(subscription) is True
    assert alice.seqs() == [4, 5]


def test_go_live_waits_for_a_parked_message_of_another_epoch():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 1, epoch="gone")])
    assert hub.go_live(subscription) is False


def test_forget_stale_drops_what_the_log_does_not_know_from_before_the_read():
    alice = Peer("c1", "alice")
    hub = hub_with(alice)
    subscription = replaying(hub, alice, "news")
    hub.deliver([message("news", 1, epoch="gone"), message("news", 9), message("news", None, "x"),
                 message("news", 2)])
    before = len(subscription.parked)
    hub.deliver([message("news", 3, epoch="newer")])  # parked during the read: kept
    hub.forget_stale(subscription, before, head=2)
    assert [(m.seq, m.epoch) for m, _, _ in subscription.parked] == [
        (None, None), (2, EPOCH), (3, "newer")]
    assert subscription.parked_bytes == sum(len(frame) for _, frame, _ in subscription.parked)


def test_behind_catches_up_live_subscriptions_short_of_the_head_and_rechecks_replays():
    from notifier.store.base import Position

    alice, bob, carol, dave = (Peer(f"c{i}", name) for i, name in
                               enumerate(["alice", "bob", "carol", "dave"]))
    hub = hub_with(alice, bob, carol, dave)
    short = live(hub, alice, "news", last_seq=3)
    level = live(hub, bob, "news", last_seq=5)
    elsewhere = live(hub, carol, "news", last_seq=5)
    elsewhere.epoch = "old"
    replay = replaying(hub, dave, "news")
    assert hub.behind({"news": Position(5, EPOCH), "other": Position(9, EPOCH)}) == 2
    assert alice.behind == [short] and carol.behind == [elsewhere] and bob.behind == []
    assert short.replaying and not level.replaying
    assert dave.behind == [] and replay.recheck is True
    assert hub.go_live(replay) is False and replay.recheck is False  # one more read first
    assert hub.go_live(replay) is True


def test_a_message_that_cannot_be_framed_costs_no_other_message_of_the_turn():
    alice, bob = Peer("c1", "alice"), Peer("c2", "bob")
    hub = hub_with(alice, bob)
    live(hub, alice, "news")
    live(hub, bob, "chat")
    bad = message("chat", None, "x")
    bad.event = "\ud800"  # a lone surrogate: no JSON encoder writes it
    hub.deliver([message("news", 1), bad, message("chat", 1), message("chat", None, "ok")])
    assert alice.seqs() == [1]
    assert bob.seqs() == [1, None] and bob.datas() == [1, "ok"]
