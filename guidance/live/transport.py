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
- Malformed messages are counted (``malformed``, ``last_error``) and dropped; a
  subscriber keeps going. The log gets one line per kind of problem and sender at most
  every ``LOG_PERIOD_S``, with counts (``guidance.live.throttle``).
- Replays are refused: per (source, kind), a message whose ``stamp_ns`` is not after the
  last accepted one, or lies more than ``MAX_FUTURE_S`` ahead of this clock, is dropped
  (``replayed``). A restarted publisher restarts its ``seq`` but its stamps move on.
- Bounded work and memory: ``ZMQ_MAXMSGSIZE`` (``max_message_bytes``, from the largest
  frame the process accepts) disconnects a peer that sends a bigger part; at most
  ``MAX_DRAIN`` queued messages are read per call; the per-sender tables are capped.
- Either side may bind, and either may start first: ZeroMQ reconnects by itself every
  ``RECONNECT_IVL_MS`` (up to ``RECONNECT_IVL_MAX_MS``); sockets close with ``LINGER`` 0.

Endpoints: ``tcp://127.0.0.1:PORT`` by default (loopback unless told otherwise);
``ipc://`` and ``inproc://`` work too. A port held by another process is a
``TransportError`` naming the port and the process that holds it.

Security (``keys``, a ``guidance.live.keys.CurveKeys``): CURVE on every socket. The
binding side is the CURVE server and accepts only clients whose public key is among its
peers (ZAP, one ``ThreadAuthenticator`` per context); the connecting side names the role
that binds there (``server_role``) and talks only to the holder of that role's secret
key. A process without an accepted key receives nothing, and nothing it sends arrives.
Without ``keys`` the sockets are plain (callers must ask for that explicitly).
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
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from guidance.core.errors import GuidanceError
from guidance.live.keys import CurveKeys
from guidance.live.throttle import ThrottledLog
from guidance.live.wire import KINDS, Message, WireError, decode, encode

__all__ = [
    "DEFAULT_FRAME_ENDPOINT",
    "DEFAULT_RESULT_ENDPOINT",
    "DEFAULT_SNDHWM",
    "DEFAULT_RCVHWM",
    "Publisher",
    "Subscriber",
    "TransportError",
    "free_tcp_endpoint",
    "max_message_bytes",
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
RECONNECT_IVL_MAX_MS = 200
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
MAX_DRAIN = 256
"""At most this many queued messages are read by one ``recv_latest`` or ``recv`` call."""
BIND_RETRY_S = 3.0
MAX_FUTURE_S = 5.0
"""A message stamped further ahead of this clock is refused (it would lock out its sender)."""
MAX_SENDERS = 1024
"""(source, kind) streams whose last stamp is remembered; the oldest is forgotten beyond."""
LOG_PERIOD_S = 5.0
HEADER_ALLOWANCE_BYTES = 1 << 20
RECONNECT_GRACE_S = 0.02
"""A connection ZeroMQ dropped for a protocol error (e.g. a part over ``ZMQ_MAXMSGSIZE``)
is not retried by ZeroMQ itself; the subscriber reconnects it after this long without a
retry event (ZeroMQ reports its own retry of an ordinary disconnect at once, from the
same I/O thread: 0.07 ms after it, median of 20, at most 0.12 ms; a needless reconnect
costs only a new handshake)."""
_RETRY_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED
DEFAULT_MAX_FRAME_PX = 2048
"""Largest frame side (pixels) accepted by default: 2048 x 2048 float32 = 16 MiB."""


class TransportError(GuidanceError):
    """A socket that cannot be set up (port held by another process, bad endpoint)."""


def max_message_bytes(max_frame_px: int = DEFAULT_MAX_FRAME_PX) -> int:
    """``ZMQ_MAXMSGSIZE`` for a subscriber that accepts frames of up to ``max_frame_px``
    pixels a side (4-byte pixels), plus room for the header."""
    if not (isinstance(max_frame_px, int) and max_frame_px > 0):
        raise TransportError(f"max_frame_px must be a positive int, got {max_frame_px!r}")
    return max_frame_px * max_frame_px * 4 + HEADER_ALLOWANCE_BYTES


def _check_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(ENDPOINT_SCHEMES):
        raise TransportError(f"endpoint must start with one of {', '.join(ENDPOINT_SCHEMES)}; "
                             f"got {endpoint!r}")
    return endpoint


def _socket(context: zmq.Context | None, socket_type: int, keys: CurveKeys | None, *,
            server: bool) -> zmq.Socket:
    context = context or zmq.Context.instance()
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        if server:
            _authenticate(context, keys)
            sock.curve_server = True
    return sock


def _server_roles(endpoints: Sequence[str], server_role: str | Sequence[str] | None) -> list[str | None]:
    """The role expected to bind each endpoint (one for all, or one per endpoint)."""
    if server_role is None or isinstance(server_role, str):
        return [server_role] * len(endpoints)
    roles = list(server_role)
    if len(roles) != len(endpoints):
        raise TransportError(f"{len(roles)} server roles for {len(endpoints)} endpoints")
    return roles


class _AllowedKeys:
    """ZAP credentials provider: the union of the peers' public keys of every CurveKeys
    used with one context."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


_AUTHENTICATORS: dict[int, tuple[ThreadAuthenticator, _AllowedKeys]] = {}
_AUTH_LOCK = threading.Lock()


def _authenticate(context: zmq.Context, keys: CurveKeys) -> None:
    """Start (once per context) the ZAP handler that admits the peers of ``keys``."""
    with _AUTH_LOCK:
        entry = _AUTHENTICATORS.get(id(context))
        if entry is None:
            auth = ThreadAuthenticator(context)
            auth.start()
            allowed = _AllowedKeys()
            auth.configure_curve_callback(domain="*", credentials_provider=allowed)
            entry = _AUTHENTICATORS[id(context)] = (auth, allowed)
        entry[1].keys.update(keys.peers.values())


def _port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` here: "pid N (command line)", or None if not visible."""
    import psutil  # only after a bind conflict: not on every process's start-up path

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:200]!r})"
    except (psutil.Error, OSError):
        return None
    return None


def _bind_conflict(endpoint: str) -> TransportError:
    port = endpoint.rsplit(":", 1)[-1]
    holder = _port_holder(int(port)) if endpoint.startswith("tcp://") and port.isdigit() else None
    hint = f" (check with `ss -ltnp 'sport = :{port}'`)" if endpoint.startswith("tcp://") else ""
    who = holder or f"another process{hint}"
    return TransportError(f"cannot bind {endpoint}: the address is in use by {who}; stop that process "
                          f"or choose another endpoint")


def _bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind, retrying for ``BIND_RETRY_S`` while the address is still held: a restarted
    process rebinds the port its predecessor just closed, which ZeroMQ frees
    asynchronously. TransportError naming the holder when it stays taken."""
    endpoint = _check_endpoint(endpoint)
    deadline = time.monotonic() + BIND_RETRY_S
    pause = threading.Event()
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                sock.close(linger=0)
                raise TransportError(f"cannot bind {endpoint}: {exc}") from None
            if time.monotonic() >= deadline:
                sock.close(linger=0)
                raise _bind_conflict(endpoint) from None
            pause.wait(0.05)


def _connect(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None, server_role: str | None) -> None:
    """Connect; with ``keys``, as a CURVE client of the holder of ``server_role``'s key
    (the option applies to this connection only, so each endpoint may have its own)."""
    try:
        if keys is not None:
            if server_role is None:
                raise TransportError(f"a CURVE connection to {endpoint} needs the role of the process that "
                                     f"binds there (server_role)")
            sock.curve_serverkey = keys.peer(server_role)
        sock.connect(_check_endpoint(endpoint))
    except (zmq.ZMQError, GuidanceError) as exc:
        sock.close(linger=0)
        raise TransportError(f"cannot connect to {endpoint}: {exc}") from None


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` endpoint on a port that was free a moment ago (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


class Publisher:
    """A PUB socket sending guidance messages; ``send`` never blocks.

    ``endpoint``: where to bind (``bind=True``) or connect. ``sndhwm``: messages queued
    per subscriber before that subscriber's messages are dropped. ``keys``: CURVE
    identity (None: plain); ``server_role``: when connecting with keys, the role that binds.
    """

    def __init__(self, endpoint: str, bind: bool = True, *, sndhwm: int = DEFAULT_SNDHWM,
                 context: zmq.Context | None = None, keys: CurveKeys | None = None,
                 server_role: str | None = None) -> None:
        self._socket = _socket(context, zmq.PUB, keys, server=bind)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        if bind:
            _bind(self._socket, endpoint)
        else:
            _connect(self._socket, endpoint, keys, server_role)
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

    def send_raw(self, parts: Sequence[bytes]) -> None:
        """Send an already-built multipart message (topic frame first) unchanged and
        without blocking: re-publishing recorded bytes, or probing receivers with bytes
        ``send`` would refuse to build."""
        self._socket.send_multipart(list(parts), flags=zmq.NOBLOCK, copy=False)
        self.sent += 1

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

    ``tap`` is called with the wire parts (topic frame removed) of every message accepted
    (validated, not a replay), before it is returned: the recorder's hook;
    ``reject_tap`` with the parts and the reason of every message dropped (quarantine).
    ``keys``/``server_role``: CURVE, as for ``Publisher`` (``server_role`` may list one
    role per endpoint). ``max_message_bytes``:
    ``ZMQ_MAXMSGSIZE``; a peer sending a bigger part is disconnected (it reconnects).

    Counters: ``received`` (valid messages decoded), ``malformed`` (dropped, reason of the
    last one in ``last_error``), ``replayed`` (stamps not after the last of their stream),
    ``skipped`` (superseded by a newer message of their kind in ``recv_latest``), ``lost``
    (gaps in the publishers' sequence numbers).
    """

    def __init__(self, endpoints: str | Sequence[str], topics: Iterable[str] | None = None,
                 bind: bool = False, *, rcvhwm: int = DEFAULT_RCVHWM,
                 context: zmq.Context | None = None,
                 tap: Callable[[list[bytes]], None] | None = None,
                 reject_tap: Callable[[list[bytes], str], None] | None = None,
                 keys: CurveKeys | None = None, server_role: str | Sequence[str] | None = None,
                 max_message_bytes: int = max_message_bytes()) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        endpoints = [_check_endpoint(e) for e in endpoints]
        if topics is None:
            topics = [""]
        else:
            topics = list(topics)
            for topic in topics:
                if topic not in KINDS:
                    raise TransportError(f"unknown topic {topic!r}; topics are message kinds: "
                                         f"{', '.join(KINDS)}")
        self._socket = _socket(context, zmq.SUB, keys, server=bind)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._monitor = None if bind else self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | _RETRY_EVENTS)
        self._dropped_since: dict[str, float] = {}
        self._keys = keys
        self._roles = dict(zip(endpoints, _server_roles(endpoints, server_role)))
        for endpoint, role in self._roles.items():
            if bind:
                _bind(self._socket, endpoint)
            else:
                _connect(self._socket, endpoint, keys, role)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:  # a dropped connection wakes ``recv``, to be reconnected on time
            self._poller.register(self._monitor, zmq.POLLIN)
        self._tap = tap
        self._reject_tap = reject_tap
        self._last_seq: dict[tuple[str, str], int] = {}
        self._last_stamp: dict[tuple[str, str], int] = {}
        self._log = ThrottledLog(logger, LOG_PERIOD_S)
        self.received = 0
        self.malformed = 0
        self.replayed = 0
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
            now = time.monotonic()
            remaining_s = deadline - now
            if remaining_s <= 0:
                return None
            if self._dropped_since:  # wake when a dropped connection is due to be reconnected
                remaining_s = min(remaining_s, max(0.0, min(self._dropped_since.values()) + RECONNECT_GRACE_S - now))
            self._poller.poll(math.ceil(remaining_s * 1000))

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
        for msg in self._drain():
            if msg.kind in latest:
                self.skipped += 1
            latest[msg.kind] = msg
        return latest

    def _watch_connections(self) -> None:
        """Reconnect an endpoint that ZeroMQ disconnected and does not retry (a protocol
        error such as a part over ``ZMQ_MAXMSGSIZE``): ordinary disconnects are followed by
        retry events within ``RECONNECT_GRACE_S``, those are not."""
        if self._monitor is None:
            return
        now = time.monotonic()
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            endpoint = event["endpoint"].decode()
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._dropped_since[endpoint] = now
            else:
                self._dropped_since.pop(endpoint, None)
        for endpoint, since in list(self._dropped_since.items()):
            if now - since >= RECONNECT_GRACE_S:
                del self._dropped_since[endpoint]
                self._log.warning(f"reconnecting {endpoint}",
                                  "the connection was dropped for a protocol error (a message over the size limit?)")
                try:
                    self._socket.disconnect(endpoint)
                except zmq.ZMQError:
                    pass  # the dropped session has already forgotten the endpoint
                if self._keys is not None:
                    self._socket.curve_serverkey = self._keys.peer(self._roles[endpoint])
                self._socket.connect(endpoint)

    def _drain(self) -> Iterator[Message]:
        """Valid messages already queued, without waiting, reading at most ``MAX_DRAIN``
        messages (valid or not); malformed and replayed ones are dropped."""
        self._watch_connections()
        for _ in range(MAX_DRAIN):
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = self._accept(parts)
            if msg is not None:
                if self._tap is not None:
                    self._tap(parts[1:])
                yield msg

    def _accept(self, parts: list[bytes]) -> Message | None:
        try:
            msg = decode(parts[1:])
        except WireError as exc:
            return self._reject(parts, f"malformed {exc.kind} from {exc.sender!r}", exc.detail)
        if parts[0] != msg.kind.encode("ascii"):
            return self._reject(parts, f"malformed {msg.kind} from {msg.source!r}",
                                f"topic {parts[0][:40]!r} does not match kind {msg.kind!r}")
        key = (msg.source, msg.kind)
        last_stamp = self._last_stamp.get(key)
        future_s = (msg.stamp_ns - time.time_ns()) / 1e9
        if (last_stamp is not None and msg.stamp_ns <= last_stamp) or future_s > MAX_FUTURE_S:
            self.replayed += 1
            why = (f"stamp {future_s:.1f} s in the future" if future_s > MAX_FUTURE_S else
                   f"stamp_ns {msg.stamp_ns} not after the last accepted {last_stamp}")
            return self._reject(parts, f"replayed {msg.kind} from {msg.source!r}", why, malformed=False)
        last = self._last_seq.get(key)
        if last is not None and msg.seq > last + 1:
            self.lost += msg.seq - last - 1
        _remember(self._last_seq, key, msg.seq)
        _remember(self._last_stamp, key, msg.stamp_ns)
        self.received += 1
        return msg

    def _reject(self, parts: list[bytes], what: str, reason: str, *, malformed: bool = True) -> None:
        if malformed:
            self.malformed += 1
        self.last_error = reason
        self._log.warning(f"dropped {what}", reason)
        if self._reject_tap is not None:
            self._reject_tap(parts[1:], reason)

    def close(self) -> None:
        self._poller.unregister(self._socket)
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _remember(table: dict, key: tuple[str, str], value: int) -> None:
    """``table[key] = value``, forgetting the oldest entry beyond ``MAX_SENDERS``."""
    table.pop(key, None)
    table[key] = value
    if len(table) > MAX_SENDERS:
        table.pop(next(iter(table)))
