"""ZeroMQ publish/subscribe of guidance messages: the one place that knows socket options.

On the socket every message is ``[topic, *wire parts]``: the topic frame (the kind name in
ASCII, e.g. ``b"frame"``) belongs to this module, so that SUB sockets can filter by kind;
it is not part of the wire format, and ``guidance.live.wire.decode`` never sees it.

Delivery policy:

- A publisher never blocks: PUB sockets drop messages for a subscriber whose queue
  (``SNDHWM`` at the publisher + ``RCVHWM`` at the subscriber + the OS buffers) is full,
  so one stalled subscriber cannot hold up the others.
- Drops are counted where they can be seen, at the subscriber: the publisher numbers
  each kind it sends (``seq`` 0, 1, 2, ...), and a gap in the sequence of a
  (source, kind) stream counts as ``lost``.
- ``Subscriber.recv_latest`` drains what is queued and keeps only the newest message of
  each kind (the older ones count as ``skipped``). ``ZMQ_CONFLATE`` is not used: it
  breaks multipart messages.
- Malformed messages are logged, counted (``malformed``, ``last_error``) and dropped; a
  subscriber keeps going.
- Either side may bind, and either may start first: ZeroMQ reconnects by itself every
  ``RECONNECT_IVL_MS`` (up to ``RECONNECT_IVL_MAX_MS``); sockets close with ``LINGER`` 0.

Endpoints: ``tcp://127.0.0.1:PORT`` by default; ``ipc://`` and ``inproc://`` work too.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

import zmq

from guidance.live.wire import KINDS, Heartbeat, Message, WireError, decode, encode

__all__ = [
    "DEFAULT_FRAME_ENDPOINT",
    "DEFAULT_RESULT_ENDPOINT",
    "DEFAULT_SNDHWM",
    "DEFAULT_RCVHWM",
    "Publisher",
    "Subscriber",
    "HeartbeatMonitor",
    "free_tcp_endpoint",
]

logger = logging.getLogger(__name__)

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
"""Frames and tracker samples: sim / C-arm -> pipeline."""
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:5556"
"""Pose results, instrument states, overlays: pipeline -> display."""
DEFAULT_SNDHWM = 8
"""Messages queued per subscriber at the publisher before it drops."""
DEFAULT_RCVHWM = 4
"""Messages queued at the subscriber: small, so a slow reader sees fresh frames."""
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
MAX_DRAIN = 256
BIND_RETRY_S = 3.0
"""At most this many queued messages are read by one ``recv_latest`` call."""


def _check_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(ENDPOINT_SCHEMES):
        raise ValueError(f"endpoint must start with one of {', '.join(ENDPOINT_SCHEMES)}; "
                         f"got {endpoint!r}")
    return endpoint


def _socket(context: zmq.Context | None, socket_type: int) -> zmq.Socket:
    sock = (context or zmq.Context.instance()).socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


def _bind(sock: zmq.Socket, endpoint: str, timeout_s: float = BIND_RETRY_S) -> None:
    """Bind, retrying for ``timeout_s`` while the address is still held: a restarted
    process rebinds the port its predecessor just closed, which ZeroMQ frees asynchronously."""
    endpoint = _check_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            pause.wait(0.05)


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` endpoint on a port that was free a moment ago (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


class Publisher:
    """A PUB socket sending guidance messages; ``send`` never blocks.

    ``endpoint``: where to bind (``bind=True``) or connect. ``sndhwm``: messages queued
    per subscriber before that subscriber's messages are dropped.
    """

    def __init__(self, endpoint: str, bind: bool = True, *, sndhwm: int = DEFAULT_SNDHWM,
                 context: zmq.Context | None = None) -> None:
        self._socket = _socket(context, zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        if bind:
            _bind(self._socket, endpoint)
        else:
            self._socket.connect(_check_endpoint(endpoint))
        self._next_seq: dict[str, int] = {}
        self.sent = 0
        """Messages handed to ZeroMQ."""

    @property
    def endpoint(self) -> str:
        """The endpoint last bound or connected (with the actual port when bound to 0)."""
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, msg: Message) -> Message:
        """Stamp ``msg`` with this publisher's next ``seq`` for its kind and the current
        ``stamp_ns`` (``time.time_ns()``), send it without blocking and return the stamped
        message (``wire.encode`` of it gives the exact bytes sent)."""
        seq = self._next_seq.get(msg.kind, 0)
        stamped = replace(msg, seq=seq, stamp_ns=time.time_ns())
        parts = [msg.kind.encode("ascii"), *encode(stamped)]
        self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        self._next_seq[msg.kind] = seq + 1
        self.sent += 1
        return stamped

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Subscriber:
    """A SUB socket receiving guidance messages.

    ``endpoints``: one endpoint or several, connected (or bound with ``bind=True``);
    ``topics``: the kinds to receive (``wire.KINDS`` names), all when None.

    ``tap`` is called with the wire parts (topic frame removed) of every multipart message
    received, valid or not, before decoding: the recorder's hook.

    Counters: ``received`` (valid messages decoded), ``malformed`` (dropped, reason of the
    last one in ``last_error``), ``skipped`` (superseded by a newer message of their kind in
    ``recv_latest``), ``lost`` (gaps in the publishers' sequence numbers).
    """

    def __init__(self, endpoints: str | Sequence[str], topics: Iterable[str] | None = None,
                 bind: bool = False, *, rcvhwm: int = DEFAULT_RCVHWM,
                 context: zmq.Context | None = None,
                 tap: Callable[[list[bytes]], None] | None = None) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        endpoints = [_check_endpoint(e) for e in endpoints]
        if topics is None:
            topics = [""]
        else:
            topics = list(topics)
            for topic in topics:
                if topic not in KINDS:
                    raise ValueError(f"unknown topic {topic!r}; topics are message kinds: "
                                     f"{', '.join(KINDS)}")
        self._socket = _socket(context, zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        for endpoint in endpoints:
            if bind:
                _bind(self._socket, endpoint)
            else:
                self._socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._tap = tap
        self._last_seq: dict[tuple[str, str], int] = {}
        self.received = 0
        self.malformed = 0
        self.skipped = 0
        self.lost = 0
        self.last_error: str | None = None

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid message, waiting at most ``timeout_s`` seconds; None on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = next(self._drain(), None)
            if msg is not None:
                return msg
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self._poller.poll(math.ceil(remaining_s * 1000)):
                return None

    def recv_latest(self, timeout_s: float) -> dict[str, Message]:
        """The newest queued message of each kind, kind -> message.

        Waits at most ``timeout_s`` seconds for a first message, then reads (without
        waiting, at most ``MAX_DRAIN`` messages) whatever else is queued; every message
        replaced by a newer one of its kind counts in ``skipped``. Empty on timeout.
        """
        first = self.recv(timeout_s)
        if first is None:
            return {}
        latest = {first.kind: first}
        for count, msg in enumerate(self._drain(), start=1):
            if msg.kind in latest:
                self.skipped += 1
            latest[msg.kind] = msg
            if count >= MAX_DRAIN:
                break
        return latest

    def _drain(self) -> Iterator[Message]:
        """Valid messages already queued, without waiting; malformed ones are dropped."""
        while True:
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self._tap is not None:
                self._tap(parts[1:])
            msg = self._accept(parts)
            if msg is not None:
                yield msg

    def _accept(self, parts: list[bytes]) -> Message | None:
        try:
            msg = decode(parts[1:])
        except WireError as exc:
            return self._reject(str(exc))
        if parts[0] != msg.kind.encode("ascii"):
            return self._reject(f"topic {parts[0][:40]!r} does not match kind {msg.kind!r}")
        key = (msg.source, msg.kind)
        last = self._last_seq.get(key)
        if last is not None and msg.seq > last + 1:
            self.lost += msg.seq - last - 1
        self._last_seq[key] = msg.seq
        self.received += 1
        return msg

    def _reject(self, reason: str) -> None:
        self.malformed += 1
        self.last_error = reason
        logger.warning("dropped malformed message (%d so far): %s", self.malformed, reason)

    def close(self) -> None:
        self._poller.unregister(self._socket)
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HeartbeatMonitor:
    """Last-seen time and state per role, from received Heartbeat messages.

    A role is alive while its last heartbeat is at most ``timeout_s`` seconds old. Times
    are local receive times (``time.monotonic()`` seconds), never the sender's clock.
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._seen_s: dict[str, float] = {}
        self._state: dict[str, str] = {}

    def update(self, heartbeat: Heartbeat, now_s: float | None = None) -> None:
        """Record a heartbeat received at ``now_s`` (default: now)."""
        self._seen_s[heartbeat.role] = time.monotonic() if now_s is None else now_s
        self._state[heartbeat.role] = heartbeat.state

    def age_s(self, role: str, now_s: float | None = None) -> float | None:
        """Seconds since the last heartbeat of ``role``; None if never seen."""
        if role not in self._seen_s:
            return None
        return (time.monotonic() if now_s is None else now_s) - self._seen_s[role]

    def alive(self, role: str, now_s: float | None = None) -> bool:
        age = self.age_s(role, now_s)
        return age is not None and age <= self.timeout_s

    def state(self, role: str) -> str | None:
        """The state reported by the last heartbeat of ``role``; None if never seen."""
        return self._state.get(role)
