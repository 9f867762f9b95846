"""guidance.live.transport over loopback sockets on free ports (each test well under 2 s)."""

import threading
import time

import numpy as np
import pytest
import zmq

from guidance.live import wire
from guidance.live import transport
from guidance.live.keys import CurveKeys, load_keys, make_keys
from guidance.live.transport import (
    Publisher,
    Subscriber,
    TransportError,
    free_tcp_endpoint,
    max_message_bytes,
)
from guidance.core.views import carm_view

VIEW = carm_view(detector_size_px=(32, 24))


def _frame(frame_id: int, size: tuple[int, int] = (24, 32)) -> wire.Frame:
    view = VIEW if size == (24, 32) else carm_view(detector_size_px=(size[1], size[0]))
    return wire.Frame(source="sim", frame_id=frame_id, acquired_ns=time.time_ns(), view=view,
                      pixels=np.full(size, frame_id, np.uint16))


def _handshake(send, sub: Subscriber, timeout_s: float = 1.5) -> wire.Message:
    """Send heartbeats until one arrives (PUB/SUB drops what is sent before the
    subscription reaches the publisher)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        send(wire.Heartbeat(source="handshake", role="sim", state="handshake"))
        msg = sub.recv(0.05)
        if msg is not None:
            return msg
    raise AssertionError("no message arrived")


def _recv(sub: Subscriber, timeout_s: float = 1.0) -> wire.Message | None:
    """The next message that is not a (late) handshake heartbeat."""
    deadline = time.monotonic() + timeout_s
    while True:
        msg = sub.recv(max(0.0, deadline - time.monotonic()))
        if msg is None or msg.source != "handshake":
            return msg


@pytest.fixture
def endpoint():
    return free_tcp_endpoint()


@pytest.fixture
def raw(endpoint):
    """A plain PUB socket bound to ``endpoint``: sends whatever bytes a test gives it."""
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 5000)
    socket.bind(endpoint)
    yield socket
    socket.close()


def test_pub_sub_delivery(endpoint):
    with Publisher(endpoint) as pub, Subscriber(endpoint) as sub:
        assert pub.endpoint == endpoint
        _handshake(pub.send, sub)
        sent = pub.send(_frame(5))
        msg = _recv(sub)
        assert isinstance(msg, wire.Frame) and msg.frame_id == 5
        assert (msg.seq, msg.stamp_ns) == (sent.seq, sent.stamp_ns) and msg.seq == 0
        assert wire.encode(msg) == wire.encode(sent)
        assert _recv(sub, 0.01) is None
        assert sub.malformed == 0 and sub.lost == 0


def test_subscriber_first_then_publisher_and_topic_filter(endpoint):
    with Subscriber(endpoint, topics=["frame"]) as sub:
        assert sub.recv(0.05) is None
        with Publisher(endpoint) as pub:
            deadline = time.monotonic() + 1.5
            msg = None
            while msg is None and time.monotonic() < deadline:
                pub.send(wire.Heartbeat(role="sim", state="filtered out"))
                pub.send(_frame(1))
                msg = sub.recv(0.05)
            assert isinstance(msg, wire.Frame)


def test_subscriber_binds_publisher_connects(endpoint):
    with Subscriber(endpoint, bind=True) as sub, Publisher(endpoint, bind=False) as pub:
        assert isinstance(_handshake(pub.send, sub), wire.Heartbeat)


def test_unknown_topic_and_bad_endpoint():
    with pytest.raises(TransportError, match="unknown topic 'frames'; topics are message kinds"):
        Subscriber(free_tcp_endpoint(), topics=["frames"])
    with pytest.raises(ValueError, match="endpoint must start with one of tcp://"):
        Publisher("127.0.0.1:5555")


def test_latest_frame_policy_skips_older_frames():
    # inproc delivery is synchronous once subscribed, so the counts are exact.
    endpoint = f"inproc://latest-{time.monotonic_ns()}"
    with Publisher(endpoint) as pub, Subscriber(endpoint) as sub:
        _handshake(pub.send, sub)
        for frame_id in range(5):
            pub.send(_frame(frame_id))
        pub.send(wire.Heartbeat(role="sim", state="after frames"))
        latest = sub.recv_latest(1.0)
        assert set(latest) == {"frame", "heartbeat"}
        assert latest["frame"].frame_id == 4
        assert latest["heartbeat"].state == "after frames"
        assert sub.skipped == 4 and sub.lost == 0
        assert sub.recv_latest(0.01) == {}


def test_latest_frame_policy_over_tcp(endpoint):
    with Publisher(endpoint) as pub, Subscriber(endpoint) as sub:
        _handshake(pub.send, sub)
        for frame_id in range(5):
            pub.send(_frame(frame_id))
        pub.send(wire.Heartbeat(role="sim", state="marker"))
        frames = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            latest = sub.recv_latest(0.2)
            if "frame" in latest:
                frames.append(latest["frame"].frame_id)
            if "heartbeat" in latest and latest["heartbeat"].state == "marker":
                break
        assert frames[-1] == 4
        assert len(frames) + sub.skipped + sub.lost == 5


def test_malformed_message_is_counted_and_next_good_one_arrives(endpoint, raw, caplog):
    with Subscriber(endpoint) as sub:
        _handshake(lambda m: raw.send_multipart([m.kind.encode(), *wire.encode(m)]), sub)
        good = wire.encode(_frame(9))
        bad_crc = [good[0], good[1][:-1] + bytes([good[1][-1] ^ 1])]
        raw.send_multipart([b"frame", b"\x00garbage"])
        raw.send_multipart([b"frame"])
        raw.send_multipart([b"frame", *bad_crc])
        raw.send_multipart([b"heartbeat", *good])
        raw.send_multipart([b"frame", *good])
        msg = _recv(sub)
        assert isinstance(msg, wire.Frame) and msg.frame_id == 9
        assert sub.malformed == 4
        assert "does not match kind 'frame'" in sub.last_error
        assert "dropped malformed frame from 'sim': buffer 0: CRC32 mismatch" in caplog.text
        assert "dropped malformed message from '?': header (part 0) is not JSON" in caplog.text


def test_sequence_gaps_count_as_lost(endpoint, raw):
    with Subscriber(endpoint) as sub:
        def send(msg):
            raw.send_multipart([msg.kind.encode(), *wire.encode(msg)])

        _handshake(send, sub)
        for seq in (10, 11, 14, 0):  # 12 and 13 lost; 0: the publisher restarted
            send(wire.Heartbeat(source="p", seq=seq, stamp_ns=time.time_ns(), role="pipeline",
                                state="running"))
        received = [_recv(sub).seq for _ in range(4)]
        assert received == [10, 11, 14, 0]
        assert sub.lost == 2


def test_publisher_never_blocks(endpoint):
    frame = _frame(0, size=(256, 256))  # 128 KiB per message
    with Publisher(endpoint) as pub:
        start = time.monotonic()
        for _ in range(100):
            pub.send(frame)
        assert time.monotonic() - start < 1.0  # nobody listening
        with Subscriber(endpoint) as sub:  # listening, never reading
            _handshake(pub.send, sub)
            start = time.monotonic()
            for _ in range(200):
                pub.send(frame)
            assert time.monotonic() - start < 1.0
        assert pub.sent >= 300


def test_malformed_burst_is_logged_with_counts_not_line_by_line(endpoint, raw, caplog):
    with Subscriber(endpoint, rcvhwm=5000) as sub:
        _handshake(lambda m: raw.send_multipart([m.kind.encode(), *wire.encode(m)]), sub)
        for i in range(2000):
            raw.send_multipart([b"frame", b"garbage %d" % i])
        raw.send_multipart([b"frame", *wire.encode(_frame(3))])
        msg = _recv(sub, timeout_s=5.0)
        assert isinstance(msg, wire.Frame) and msg.frame_id == 3
        assert sub.malformed == 2000
        assert len([r for r in caplog.records if "dropped malformed" in r.getMessage()]) <= 2


def test_replayed_and_future_stamped_messages_are_refused(endpoint, raw):
    with Subscriber(endpoint) as sub:
        _handshake(lambda m: raw.send_multipart([m.kind.encode(), *wire.encode(m)]), sub)
        now = time.time_ns()
        old = [b"frame", *wire.encode(replace_stamp(_frame(1), now))]
        raw.send_multipart(old)
        assert _recv(sub).frame_id == 1
        raw.send_multipart(old)  # the same message again: a replay
        raw.send_multipart([b"frame", *wire.encode(replace_stamp(_frame(2), now - 10**9))])  # older
        raw.send_multipart([b"frame", *wire.encode(replace_stamp(_frame(3), now + 60 * 10**9))])  # future
        raw.send_multipart([b"frame", *wire.encode(replace_stamp(_frame(4), now + 1))])
        msg = _recv(sub)
        assert msg.frame_id == 4 and sub.replayed == 3 and sub.malformed == 0
        assert "not after the last accepted" in sub.last_error or "future" in sub.last_error


def replace_stamp(msg, stamp_ns):
    from dataclasses import replace

    return replace(msg, stamp_ns=stamp_ns)


def test_oversized_part_is_refused_by_the_socket(endpoint):
    with Publisher(endpoint) as pub, Subscriber(endpoint, max_message_bytes=64 * 64 * 2 + 4096) as sub:
        _handshake(pub.send, sub)
        pub.send(_frame(1, size=(64, 64)))
        assert _recv(sub).frame_id == 1
        pub.send(_frame(2, size=(512, 512)))  # 512 KiB: the subscriber disconnects the sender
        assert _recv(sub, timeout_s=0.5) is None
        _handshake(pub.send, sub, timeout_s=5.0)  # it reconnects, and small messages flow again
        pub.send(_frame(3, size=(64, 64)))
        assert _recv(sub).frame_id == 3
    assert max_message_bytes(2048) == 2048 * 2048 * 4 + transport.HEADER_ALLOWANCE_BYTES


def test_a_waiting_recv_reconnects_after_an_oversized_part(endpoint):
    """One long ``recv`` spans the refusal: it wakes on the dropped connection, reconnects
    it and returns the next small frame (it used to sleep through its whole timeout)."""
    with Publisher(endpoint) as pub, Subscriber(endpoint, max_message_bytes=64 * 64 * 2 + 4096) as sub:
        _handshake(pub.send, sub)
        stop = threading.Event()

        def stream() -> None:
            pub.send(_frame(1, size=(512, 512)))
            frame_id = 2
            while not stop.wait(0.02):
                pub.send(_frame(frame_id, size=(64, 64)))
                frame_id += 1

        sender = threading.Thread(target=stream)
        sender.start()
        try:
            msg = sub.recv(10.0)
        finally:
            stop.set()
            sender.join()
        assert msg is not None and msg.kind == "frame" and msg.frame_id >= 2


def test_bind_conflict_names_the_port_and_the_process(endpoint, monkeypatch):
    monkeypatch.setattr(transport, "BIND_RETRY_S", 0.2)
    port = endpoint.rsplit(":", 1)[1]
    with Publisher(endpoint):
        with pytest.raises(TransportError, match=f"cannot bind {endpoint}: the address is in use by "
                                                 f"(pid \\d+|another process .*{port})"):
            Publisher(endpoint)
    with pytest.raises(TransportError, match="endpoint must start with"):
        Subscriber("udp://127.0.0.1:1")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    make_keys(folder)
    return {role: load_keys(folder, role) for role in ("sim", "pipeline", "display")}


@pytest.fixture(scope="module")
def intruder(tmp_path_factory, keys):
    """A process with its own key pair that knows everybody's public keys (they are public)."""
    folder = tmp_path_factory.mktemp("intruder")
    make_keys(folder, roles=("sim", "pipeline"))
    own = load_keys(folder, "pipeline")
    return CurveKeys(role="intruder", public=own.public, secret=own.secret, peers=dict(keys["sim"].peers))


def _delivered(pub, sub, attempts=15):
    """How many of ``attempts`` heartbeats (sent 50 ms apart) arrive."""
    got = 0
    for _ in range(attempts):
        pub.send(wire.Heartbeat(source="sim", role="sim", state="running"))
        got += sub.recv(0.05) is not None
    return got


def test_curve_peers_talk_and_outsiders_get_nothing(endpoint, keys, intruder):
    with Publisher(endpoint, keys=keys["sim"]) as pub:
        with Subscriber(endpoint, keys=keys["pipeline"], server_role="sim") as sub:
            assert _delivered(pub, sub) > 0
        # A client whose key the server does not accept receives nothing.
        with Subscriber(endpoint, keys=intruder, server_role="sim") as sub:
            assert _delivered(pub, sub) == 0
        # A plain client receives nothing from a CURVE server.
        with Subscriber(endpoint) as sub:
            assert _delivered(pub, sub) == 0


def test_curve_squatter_on_a_port_reaches_nobody(endpoint, keys, intruder):
    """A process without the pipeline's secret key binds the result port: the display,
    which talks only to the holder of the pipeline key, receives nothing from it."""
    squatter_keys = CurveKeys(role="pipeline", public=intruder.public, secret=intruder.secret,
                              peers=dict(keys["display"].peers))
    with Publisher(endpoint, keys=squatter_keys) as fake:
        with Subscriber(endpoint, keys=keys["display"], server_role="pipeline") as sub:
            assert _delivered(fake, sub) == 0
    with Publisher(endpoint, keys=keys["pipeline"]) as real:
        with Subscriber(endpoint, keys=keys["display"], server_role="pipeline") as sub:
            assert _delivered(real, sub) > 0


def test_subscriber_survives_a_fuzz_of_mutated_messages(endpoint, raw):
    """1000 seeded random and mutated messages on a real socket: all dropped or accepted
    as valid, none raises, and the next good message arrives."""
    from test_wire import EXAMPLES, _mutate

    rng = np.random.default_rng(7)
    encoded = [(m.kind.encode(), wire.encode(m)) for m in EXAMPLES.values()]
    with Subscriber(endpoint, rcvhwm=5000) as sub:
        _handshake(lambda m: raw.send_multipart([m.kind.encode(), *wire.encode(m)]), sub)
        for _ in range(1000):
            topic, parts = encoded[rng.integers(len(encoded))]
            mutated = _mutate(rng, parts)
            raw.send_multipart([topic, *[p if isinstance(p, bytes) else b"%r" % (p,) for p in mutated]])
        raw.send_multipart([b"frame", *wire.encode(replace_stamp(_frame(5), time.time_ns()))])
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            msg = sub.recv(0.5)
            if isinstance(msg, wire.Frame) and msg.frame_id == 5:
                break
        else:
            raise AssertionError("the good frame after the fuzz did not arrive")
        assert sub.malformed + sub.replayed + sub.received >= 950
