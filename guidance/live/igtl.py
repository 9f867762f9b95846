"""OpenIGTLink edge: our poses, instruments, plan, CT and fluoro frames to 3D Slicer (or any
OpenIGTLink client). The one place that knows OpenIGTLink bytes and RAS.

Bytes follow the OpenIGTLink protocol (header version 1, which every implementation
reads): a 58-byte big-endian header (uint16 version, char[12] type, char[20] device
name, uint64 timestamp = seconds << 32 | fraction of 2**32, uint64 body size, uint64
CRC-64/ECMA-182 of the body), then the body. Three kinds, one class each:

- ``Transform``: 12 big-endian float32, the upper 3x4 of a 4x4 matrix column by column
  (R11 R21 R31 R12 R22 R32 R13 R23 R33 TX TY TZ);
- ``Image``: the 72-byte image header (version 1, components, scalar type, endian,
  coordinate system, size i j k, the 3x4 matrix whose columns are the i, j, k axes
  times their spacing and the position of the image *centre*, sub-volume offset and
  size), then the voxels (i fastest);
- ``Status``: uint16 code, int64 sub-code, char[20] error name, NUL-terminated message.

Slicer reads every transform and image as RAS; our world is the CT's LPS
(CONVENTIONS.md). ``ras_from_lps`` is the one conversion. Every transform is sent
in the PLUS/Slicer naming ``<From>To<To>``: the matrix maps coordinates of ``<From>``
into ``<To>``; ``<To>`` is always ``CT``, the pre-op CT's RAS frame, so Slicer shows
everything in the CT's own coordinates without any transform hierarchy:

- ``CArmToCT``: the registered X-ray source (camera) frame in the CT: origin at the focal
  spot, +z along the principal ray towards the detector, +x along image columns, +y
  along rows; it is ``RAS_from_LPS @ inv(T_cam_from_world)`` of the registration;
- ``<Tool>ToCT`` (e.g. ``KwireToCT``): a tracked instrument, origin at its tip, +z along
  its axis towards the tip (handle to tip);
- ``Plan<Level><Side>ToCT`` (e.g. ``PlanL3LeftToCT``): a planned trajectory, origin at the
  entry point, +z from entry towards target;
- IMAGE ``CT``: the pre-op CT (HU, int16), sent once to each client when it connects;
- IMAGE ``Fluoro``: the latest X-ray frame placed in 3D on its detector plane (at the
  source-to-detector distance along the registered principal ray), at most
  ``image_hz`` per second;
- STATUS with the device name of the pose it qualifies (``CArmToCT``, ``<Tool>ToCT``):
  OK, failed (registration failed, code 2) or stale (no update for ``stale_s``, code 7),
  so a client never takes an old pose for a current one.

``IgtlServer`` serves several clients; each has a bounded queue (oldest dropped first)
and its own sender thread, so a slow or vanished client never slows the pipeline nor
grows memory. ``IgtlBridge`` is the pipeline's sink: ``publish`` only hands a message
to the bridge's own thread, which encodes and queues.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import crcmod
import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid, make_rigid
from guidance.core.views import View
from guidance.core.volume import Volume
from guidance.live.wire import Frame, InstrumentState, Message, PoseResult

__all__ = [
    "HEADER_SIZE",
    "IgtlError",
    "IgtlMessage",
    "Transform",
    "Image",
    "Status",
    "KINDS",
    "crc64",
    "encode",
    "decode",
    "ras_from_lps",
    "detector_T_lps_from_ijk",
    "IgtlServer",
    "IgtlBridge",
]

log = logging.getLogger(__name__)

HEADER_SIZE = 58
HEADER_VERSION = 1
_HEADER = struct.Struct(">H12s20sIIQQ")
_NAME_BYTES = 20
_TYPE_BYTES = 12

crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, rev=False, initCrc=0, xorOut=0)
"""CRC-64/ECMA-182 (polynomial 0x42F0E1EBA9EA3693, no reflection, init 0, no final xor),
the OpenIGTLink body checksum; crcmod's C implementation (a 30 MB CT in ~0.1 s)."""

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class IgtlError(GuidanceError):
    """OpenIGTLink bytes that violate the protocol, or content that cannot be sent."""


def ras_from_lps(T_lps_from_x: np.ndarray) -> np.ndarray:
    """``T_ras_from_x`` of a 4x4 ``T_lps_from_x``: the one LPS -> RAS conversion (x and y
    change sign; the frame ``x`` that the matrix maps from is unchanged)."""
    return _RAS_FROM_LPS @ np.asarray(T_lps_from_x, dtype=float)


# ------------------------------------------------------------------------------- codec


def _timestamp_fields(stamp_ns: int) -> tuple[int, int]:
    """(seconds, fraction of a second in units of 2**-32) of an epoch time in ns."""
    seconds, nanos = divmod(int(stamp_ns), 1_000_000_000)
    return seconds, (nanos << 32) // 1_000_000_000


def _name_field(text: str, size: int, what: str) -> bytes:
    data = text.encode("ascii", errors="strict") if text.isascii() else b""
    if not data or len(data) > size:
        raise IgtlError(f"{what} {text!r} must be 1 to {size} ASCII characters")
    return data


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("ascii", errors="replace")


@dataclass(frozen=True)
class IgtlMessage:
    """A message's content kind; subclasses add their fields and pack/unpack the body."""

    type_name: ClassVar[str] = ""

    device_name: str

    def body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def from_body(cls, device_name: str, body: bytes) -> "IgtlMessage":
        raise NotImplementedError


@dataclass(frozen=True)
class Transform(IgtlMessage):
    """TRANSFORM: a 4x4 rigid matrix (RAS, mm); the bottom row is implied (0 0 0 1)."""

    type_name: ClassVar[str] = "TRANSFORM"
    _BODY: ClassVar[struct.Struct] = struct.Struct(">12f")

    matrix: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=float)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise IgtlError(f"TRANSFORM {self.device_name}: needs a finite 4x4 matrix, got shape {m.shape}")
        object.__setattr__(self, "matrix", m)

    def body(self) -> bytes:
        return self._BODY.pack(*self.matrix[:3, :4].T.ravel())

    @classmethod
    def from_body(cls, device_name: str, body: bytes) -> "Transform":
        if len(body) != cls._BODY.size:
            raise IgtlError(f"TRANSFORM body must be {cls._BODY.size} bytes, got {len(body)}")
        m = np.eye(4)
        m[:3, :4] = np.array(cls._BODY.unpack(body), dtype=float).reshape(4, 3).T
        return cls(device_name, m)


_SCALAR_TYPES = {2: np.int8, 3: np.uint8, 4: np.int16, 5: np.uint16, 6: np.int32, 7: np.uint32,
                 10: np.float32, 11: np.float64}
_SCALAR_CODES = {np.dtype(t): code for code, t in _SCALAR_TYPES.items()}
_COORD_RAS = 1
_ENDIAN_BIG = 1


@dataclass(frozen=True)
class Image(IgtlMessage):
    """IMAGE: a scalar volume ``voxels[k, j, i]`` (a 2-D image is k = 1) and
    ``T_ras_from_ijk`` (voxel index -> RAS mm, the columns carry the spacing). Sent as
    big-endian voxels in RAS coordinates, the position field at the image centre
    (index (size - 1) / 2), as the protocol defines it."""

    type_name: ClassVar[str] = "IMAGE"
    _HEAD: ClassVar[struct.Struct] = struct.Struct(">HBBBB3H12f3H3H")

    voxels: np.ndarray
    T_ras_from_ijk: np.ndarray

    def __post_init__(self) -> None:
        v = np.asarray(self.voxels)
        if v.ndim == 2:
            v = v[None]
        if v.ndim != 3 or v.dtype not in _SCALAR_CODES or min(v.shape) < 1 or max(v.shape) > 65535:
            raise IgtlError(f"IMAGE {self.device_name}: needs a 2-D or 3-D array of "
                            f"{', '.join(sorted(str(t) for t in _SCALAR_CODES))} with sides up to 65535, "
                            f"got {v.dtype} {v.shape}")
        T = np.asarray(self.T_ras_from_ijk, dtype=float)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)) or np.any(np.linalg.norm(T[:3, :3], axis=0) <= 0):
            raise IgtlError(f"IMAGE {self.device_name}: T_ras_from_ijk must be a finite 4x4 affine")
        object.__setattr__(self, "voxels", v)
        object.__setattr__(self, "T_ras_from_ijk", T)

    def body(self) -> bytes:
        k, j, i = self.voxels.shape
        size = np.array([i, j, k], dtype=float)
        centre = self.T_ras_from_ijk @ np.append((size - 1) / 2.0, 1.0)
        head = self._HEAD.pack(1, 1, _SCALAR_CODES[self.voxels.dtype], _ENDIAN_BIG, _COORD_RAS, i, j, k,
                               *self.T_ras_from_ijk[:3, :3].T.ravel(), *centre[:3], 0, 0, 0, i, j, k)
        return head + np.ascontiguousarray(self.voxels, dtype=self.voxels.dtype.newbyteorder(">")).tobytes()

    @classmethod
    def from_body(cls, device_name: str, body: bytes) -> "Image":
        if len(body) < cls._HEAD.size:
            raise IgtlError(f"IMAGE body shorter than its {cls._HEAD.size}-byte image header")
        values = cls._HEAD.unpack(body[:cls._HEAD.size])
        version, components, scalar, endian, coord = values[:5]
        size = np.array(values[5:8])
        if version != 1 or components != 1 or scalar not in _SCALAR_TYPES or endian not in (1, 2):
            raise IgtlError(f"IMAGE header unsupported: version {version}, {components} components, "
                            f"scalar type {scalar}, endian {endian}")
        if coord != _COORD_RAS:
            raise IgtlError(f"IMAGE coordinate system {coord} is not RAS (1)")
        if values[20:23] != (0, 0, 0) or tuple(values[23:26]) != tuple(size):
            raise IgtlError("IMAGE sub-volumes are not supported")
        dtype = np.dtype(_SCALAR_TYPES[scalar]).newbyteorder(">" if endian == 1 else "<")
        data = body[cls._HEAD.size:]
        if len(data) != int(np.prod(size)) * dtype.itemsize:
            raise IgtlError(f"IMAGE data is {len(data)} bytes; {size.tolist()} voxels of {dtype} need "
                            f"{int(np.prod(size)) * dtype.itemsize}")
        voxels = np.frombuffer(data, dtype=dtype).reshape(size[2], size[1], size[0]).astype(dtype.newbyteorder("="))
        T = np.eye(4)
        T[:3, :3] = np.array(values[8:17], dtype=float).reshape(3, 3).T
        T[:3, 3] = np.array(values[17:20], dtype=float) - T[:3, :3] @ ((size - 1) / 2.0)
        return cls(device_name, voxels, T)


STATUS_CODES = {"ok": 1, "failed": 2, "stale": 7}
"""OpenIGTLink status codes we send: 1 OK, 2 unknown error (registration failed),
7 time-out (the pose is stale)."""


@dataclass(frozen=True)
class Status(IgtlMessage):
    """STATUS: ``code`` (1 OK, 2 error, 7 time-out, ...), ``subcode``, ``error_name``
    (up to 20 ASCII characters) and a free ``message``."""

    type_name: ClassVar[str] = "STATUS"
    _HEAD: ClassVar[struct.Struct] = struct.Struct(">Hq20s")

    code: int
    error_name: str = ""
    message: str = ""
    subcode: int = 0

    def body(self) -> bytes:
        name = self.error_name.encode("ascii", errors="replace")[:_NAME_BYTES]
        return self._HEAD.pack(self.code, self.subcode, name) + self.message.encode("utf-8") + b"\0"

    @classmethod
    def from_body(cls, device_name: str, body: bytes) -> "Status":
        if len(body) < cls._HEAD.size + 1 or body[-1:] != b"\0":
            raise IgtlError("STATUS body must be at least 31 bytes and end with a NUL")
        code, subcode, name = cls._HEAD.unpack(body[:cls._HEAD.size])
        return cls(device_name, code, _text(name), body[cls._HEAD.size:-1].decode("utf-8", errors="replace"),
                   subcode)


KINDS: dict[str, type[IgtlMessage]] = {k.type_name: k for k in (Transform, Image, Status)}


def encode(message: IgtlMessage, stamp_ns: int) -> bytes:
    """Header + body of ``message`` with timestamp ``stamp_ns`` (epoch ns)."""
    body = message.body()
    seconds, fraction = _timestamp_fields(stamp_ns)
    header = _HEADER.pack(HEADER_VERSION, _name_field(message.type_name, _TYPE_BYTES, "type"),
                          _name_field(message.device_name, _NAME_BYTES, "device name"), seconds, fraction,
                          len(body), crc64(body))
    return header + body


def decode(data: bytes) -> tuple[IgtlMessage, int]:
    """(message, stamp_ns) of one complete message; checks size and CRC, raises IgtlError."""
    if len(data) < HEADER_SIZE:
        raise IgtlError(f"an OpenIGTLink message needs at least {HEADER_SIZE} bytes, got {len(data)}")
    version, type_name, device, seconds, fraction, body_size, crc = _HEADER.unpack(data[:HEADER_SIZE])
    body = data[HEADER_SIZE:]
    if version not in (1, 2):
        raise IgtlError(f"unsupported OpenIGTLink header version {version}")
    if body_size != len(body):
        raise IgtlError(f"header says {body_size} body bytes, got {len(body)}")
    if crc64(body) != crc:
        raise IgtlError(f"CRC-64 mismatch for {_text(type_name)} {_text(device)}")
    kind = KINDS.get(_text(type_name))
    if kind is None:
        raise IgtlError(f"unknown OpenIGTLink message type {_text(type_name)!r}")
    stamp_ns = seconds * 1_000_000_000 + ((fraction * 1_000_000_000) >> 32)
    return kind.from_body(_text(device), body), stamp_ns


# ---------------------------------------------------------------------------- geometry


def detector_T_lps_from_ijk(view: View) -> np.ndarray:
    """Pixel index (i = u, j = v, k) -> world LPS (mm) of the detector plane of ``view``.

    The plane lies at the source-to-detector distance f along the principal ray (f from
    the view, else focal length x pixel pitch): pixel (u, v) sits at
    ``f K^-1 [u, v, 1]`` in the camera frame; k runs along the ray in 1 mm steps."""
    if view.source_to_detector_mm is not None:
        depth = view.source_to_detector_mm
    elif view.pixel_spacing_mm is not None:
        depth = view.K[0, 0] * view.pixel_spacing_mm[0]
    else:
        raise IgtlError("the view states neither its source-to-detector distance nor its pixel spacing, "
                        "so the detector cannot be placed in 3D")
    K_inv = np.linalg.inv(view.K)
    T_cam_from_ijk = np.eye(4)
    T_cam_from_ijk[:3, 0] = depth * K_inv[:, 0]
    T_cam_from_ijk[:3, 1] = depth * K_inv[:, 1]
    T_cam_from_ijk[:3, 2] = (0.0, 0.0, 1.0)
    T_cam_from_ijk[:3, 3] = depth * K_inv[:, 2]
    return invert_rigid(view.T_cam_from_world) @ T_cam_from_ijk


def _frame_with_z(origin: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A rigid T_world_from_local with origin ``origin`` and +z along ``z`` (x chosen
    perpendicular, deterministic: from the world x axis, or y when z is along x)."""
    z = np.asarray(z, dtype=float) / np.linalg.norm(z)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = helper - np.dot(helper, z) * z
    x /= np.linalg.norm(x)
    return make_rigid(np.column_stack([x, np.cross(z, x), z]), np.asarray(origin, dtype=float))


def _device(name: str) -> str:
    """A device name: letters and digits of ``name``, words capitalised, at most 20 bytes."""
    words = "".join(c if c.isalnum() else " " for c in name).split()
    device = "".join(w[:1].upper() + w[1:] for w in words)
    if not device or len(device) > _NAME_BYTES or not device.isascii():
        raise IgtlError(f"cannot make an OpenIGTLink device name (1-20 ASCII) from {name!r}")
    return device


def ct_image(ct: Volume) -> Image:
    """IMAGE ``CT``: the CT's voxels (HU rounded to int16) in RAS."""
    voxels = np.clip(np.rint(ct.data), -32768, 32767).astype(np.int16)
    return Image("CT", voxels, ras_from_lps(ct.T_world_from_index))


def plan_transforms(plan: list[dict]) -> list[Transform]:
    """``Plan<Level><Side>ToCT`` of each planned trajectory: origin at entry, +z to target."""
    out = []
    for t in plan:
        entry, target = np.asarray(t["entry_world"], float), np.asarray(t["target_world"], float)
        name = _device(f"Plan {t.get('level', '')} {t.get('side', '')} ToCT")
        out.append(Transform(name, ras_from_lps(_frame_with_z(entry, target - entry))))
    return out


# ------------------------------------------------------------------------------ server


class _Client:
    """One connected client: a bounded byte-budget queue drained by a sender thread, and a
    reader thread that discards what the client sends and notices when it leaves."""

    def __init__(self, sock: socket.socket, address: tuple, greeting: list[bytes], max_queue_bytes: int,
                 send_timeout_s: float, on_close) -> None:
        self.sock = sock
        self.address = address
        self.dropped = 0
        self.sent = 0
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._max_bytes = max_queue_bytes
        self._cond = threading.Condition()
        self._closed = False
        self._finishing = False
        self._on_close = on_close
        sock.settimeout(send_timeout_s)
        self._reader = sock.dup()  # blocking reads without the send time-out
        self._reader.settimeout(None)
        self._greeting = greeting
        self._threads = [threading.Thread(target=self._send_loop, name=f"igtl-send-{address}", daemon=True),
                         threading.Thread(target=self._read_loop, name=f"igtl-read-{address}", daemon=True)]
        for t in self._threads:
            t.start()

    def put(self, data: bytes) -> None:
        """Queue ``data``; the oldest queued messages are dropped to stay within the budget."""
        with self._cond:
            if self._closed:
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            while self._queued_bytes > self._max_bytes and len(self._queue) > 1:
                self._queued_bytes -= len(self._queue.popleft())
                self.dropped += 1
            self._cond.notify()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._on_close(self)

    def finish(self, timeout_s: float) -> None:
        """Send what is queued (for at most ``timeout_s``), then close."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()
        self._threads[0].join(timeout_s)
        self.close()

    def join(self, timeout_s: float) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout_s)

    def _send_loop(self) -> None:
        try:
            for data in self._greeting:
                self.sock.sendall(data)
                self.sent += 1
            self._greeting = []
            while True:
                with self._cond:
                    while not self._queue and not self._closed and not self._finishing:
                        self._cond.wait()
                    if self._closed or not self._queue:  # closed, or finishing with nothing left to send
                        break
                    data = self._queue.popleft()
                    self._queued_bytes -= len(data)
                self.sock.sendall(data)
                self.sent += 1
        except OSError as exc:
            log.info("OpenIGTLink client %s dropped: %s", self.address, exc)
        self.close()

    def _read_loop(self) -> None:
        try:
            while self._reader.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self._reader.close()
        log.info("OpenIGTLink client %s disconnected", self.address)
        self.close()


class IgtlServer:
    """A TCP server that broadcasts encoded OpenIGTLink messages to every connected client.

    Binds ``host:port`` (127.0.0.1 unless told otherwise; port 0 picks a free one, see
    ``port``). ``greeting()`` gives the messages a new client receives first (e.g. the
    CT). Each client has a queue of at most ``max_queue_bytes`` (the oldest messages are
    dropped beyond it, never the newest) and a sender thread; a send blocked for
    ``send_timeout_s`` disconnects that client. ``broadcast`` never blocks.
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", greeting=lambda: [],
                 max_queue_bytes: int = 8 << 20, send_timeout_s: float = 5.0) -> None:
        if not 0 <= int(port) <= 65535:
            raise IgtlError(f"OpenIGTLink port {port} is not a TCP port (0-65535)")
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self.host = host
        self._greeting = greeting
        self._max_queue_bytes = max_queue_bytes
        self._send_timeout_s = send_timeout_s
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self.connections = 0
        self.dropped_by_closed = 0
        self._accept_thread = threading.Thread(target=self._accept_loop, name="igtl-accept", daemon=True)
        self._accept_thread.start()

    @property
    def clients(self) -> list[_Client]:
        with self._lock:
            return list(self._clients)

    def broadcast(self, data: bytes) -> None:
        """Queue one encoded message for every connected client."""
        for client in self.clients:
            client.put(data)

    def close(self, drain_s: float = 1.0) -> None:
        """Stop accepting, send each client what is queued for it (for at most ``drain_s``
        in all), disconnect them and join the threads."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(2.0)
        deadline = time.monotonic() + drain_s
        for client in self.clients:
            client.finish(max(deadline - time.monotonic(), 0.0))
            client.join(2.0)

    def _remove(self, client: _Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
                self.dropped_by_closed += client.dropped

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            log.info("OpenIGTLink client %s connected", address)
            client = _Client(sock, address, list(self._greeting()), self._max_queue_bytes, self._send_timeout_s,
                             self._remove)
            with self._lock:
                self._clients.append(client)

    def __enter__(self) -> "IgtlServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ bridge


class IgtlBridge:
    """The pipeline's OpenIGTLink sink: ``publish(message, frame)`` for each message the
    pipeline sends (PoseResult with the frame it came from, InstrumentState; others are
    ignored). Encoding and queuing happen on the bridge's own thread; ``publish`` only
    replaces the pending item of its kind, so a burst never queues up.

    ``ct``: the pre-op CT in HU, sent once to each client on connect (with the plan's
    transforms); ``image_hz``: the cap on fluoro IMAGE messages; ``stale_s``: a pose with
    no update for this long is declared stale (STATUS code 7).
    """

    def __init__(self, port: int, *, ct: Volume | None = None, plan: list[dict] | None = None,
                 host: str = "127.0.0.1", image_hz: float = 2.0, stale_s: float = 1.0,
                 max_queue_bytes: int = 8 << 20) -> None:
        if not (math.isfinite(image_hz) and image_hz > 0) or not (math.isfinite(stale_s) and stale_s > 0):
            raise IgtlError(f"image_hz and stale_s must be positive; got {image_hz!r}, {stale_s!r}")
        now = time.time_ns()
        self._greeting = ([encode(ct_image(ct), now)] if ct is not None else []) + \
            [encode(t, now) for t in plan_transforms(plan or [])]
        self.server = IgtlServer(port, host=host, greeting=lambda: self._greeting, max_queue_bytes=max_queue_bytes)
        self.port = self.server.port
        self._image_period_ns = int(1e9 / image_hz)
        self._stale_ns = int(stale_s * 1e9)
        self._pending: dict[str, tuple[Message, Frame | None]] = {}
        self._last_update_ns: dict[str, int] = {}
        self._stale: set[str] = set()
        self._next_image_ns = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="igtl-bridge", daemon=True)
        self._thread.start()

    def publish(self, message: Message, frame: Frame | None = None) -> None:
        """Hand a pipeline output to the bridge (returns at once)."""
        if isinstance(message, PoseResult):
            key = "pose"
        elif isinstance(message, InstrumentState):
            key = f"tool:{message.tool_id}"
        else:
            return
        with self._cond:
            self._pending[key] = (message, frame)
            self._cond.notify()

    def close(self) -> None:
        """Send what was published (clients get at most a second to take it), then stop."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5.0)
        self.server.close()

    def __enter__(self) -> "IgtlBridge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            with self._cond:
                if not self._pending and not self._stopped:
                    self._cond.wait(timeout=self._stale_ns / 4e9)
                stopping = self._stopped
                pending, self._pending = self._pending, {}
            now = time.time_ns()
            for message, frame in pending.values():
                try:
                    for data in self._encode(message, frame, now):
                        self.server.broadcast(data)
                        self.published += 1
                except ValueError as exc:  # GuidanceError, or numpy's on a degenerate pose
                    log.warning("OpenIGTLink: %s not sent: %s", type(message).__name__, exc)
            if not stopping:
                self._check_stale(now)

    def _encode(self, message: Message, frame: Frame | None, now: int) -> list[bytes]:
        if isinstance(message, InstrumentState):
            device = _device(f"{message.tool_id} ToCT")
            if message.tip_world is None:  # "not_tracked": no pose to send, only the status
                return [self._status(device, "failed", message.status, now)]
            T = ras_from_lps(_frame_with_z(message.tip_world, message.axis_world))
            status = "ok" if message.status == "ok" else "failed"
            return [encode(Transform(device, T), now), self._status(device, status, message.status, now)]
        device = "CArmToCT"
        if message.status != "ok":
            return [self._status(device, "failed", message.reason, now)]
        T_cam_from_world = message.views[0]["T_cam_from_world"]
        out = [encode(Transform(device, ras_from_lps(invert_rigid(T_cam_from_world))), now),
               self._status(device, "ok", message.reason, now)]
        if frame is not None and now >= self._next_image_ns:
            view = frame.view.with_pose(T_cam_from_world)
            pixels = frame.pixels if frame.pixels.dtype in _SCALAR_CODES else frame.pixels.astype(np.float32)
            out.append(encode(Image("Fluoro", pixels, ras_from_lps(detector_T_lps_from_ijk(view))), now))
            self._next_image_ns = now + self._image_period_ns
        return out

    def _status(self, device: str, state: str, text: str, now: int) -> bytes:
        self._last_update_ns[device] = now
        self._stale.discard(device)
        return encode(Status(device, STATUS_CODES[state], state, text), now)

    def _check_stale(self, now: int) -> None:
        for device, last in list(self._last_update_ns.items()):
            if device not in self._stale and now - last > self._stale_ns:
                self._stale.add(device)
                message = f"no update for {(now - last) / 1e9:.1f} s"
                self.server.broadcast(encode(Status(device, STATUS_CODES["stale"], "stale", message), now))
