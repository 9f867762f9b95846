"""Append-only recording of a session's messages, and their replay.

A recording is a directory:

- ``manifest.json``: ``{"schema": "guidance.live.recording/1", "start_ns": ..., "start_utc": ...,
  "source": ..., "file": "session.rec", "segments": [{"file": ..., "start_ns": ...,
  "source": ...}, ...]}``, written when the recording opens and rewritten (atomically)
  when a new segment starts;
- segments ``session.rec``, ``session.1.rec``, ``session.2.rec``, ...: a process that
  restarts with the same directory appends a new segment (nothing is ever overwritten).
  Each is the magic ``b"GDREC\\r\\n\\x1a"`` and a little-endian uint16 format version, then
  one record per message::

      direction  uint8    0 = "in" (received), 1 = "out" (sent)
      recv_ns    uint64   local receive / send time, time.time_ns()
      n_parts    uint32
      lengths    n_parts x uint64
      parts      the bytes of each part, back to back

- ``quarantine.rec`` (same format, direction "in"), only when messages were refused:
  part 0 is the reason (UTF-8), then at most ``QUARANTINE_PARTS`` parts of the refused
  message, each cut to ``QUARANTINE_PART_BYTES``; the file stops growing at
  ``QUARANTINE_MAX_BYTES`` (later refusals are only counted).

The parts are wire parts (``guidance.live.wire.encode``, no transport topic frame); the
pipeline records only messages that passed validation. Every record is written with one
call and flushed, so a crash (even ``kill -9``) loses at most the record in flight; a
truncated final record is skipped with a warning when reading.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from guidance.core.errors import GuidanceError
from guidance.core.jsonfile import read_json
from guidance.core.stop import Stop

__all__ = [
    "RECORDING_SCHEMA",
    "RecordingError",
    "Recorder",
    "read_manifest",
    "read_recording",
    "read_segment",
    "segment_files",
    "replay",
]

logger = logging.getLogger(__name__)

RECORDING_SCHEMA = "guidance.live.recording/1"
MAGIC = b"GDREC\r\n\x1a"
FORMAT_VERSION = 1
SESSION_FILE = "session.rec"
MANIFEST_FILE = "manifest.json"
QUARANTINE_FILE = "quarantine.rec"
QUARANTINE_MAX_BYTES = 16 << 20
QUARANTINE_PARTS = 4
QUARANTINE_PART_BYTES = 4096
DIRECTIONS = ("in", "out")
MAX_PARTS = 1024

_FILE_HEADER = struct.Struct("<8sH")
_RECORD_HEADER = struct.Struct("<BQI")
_LENGTH = struct.Struct("<Q")

Record = tuple[str, int, list[bytes]]
"""(direction, recv_ns, parts)."""


class RecordingError(GuidanceError):
    """A recording that cannot be read (not a recording, unsupported version, corrupt)."""


def segment_name(index: int) -> str:
    """File name of segment ``index`` (0: ``session.rec``, then ``session.1.rec``, ...)."""
    return SESSION_FILE if index == 0 else f"session.{index}.rec"


def segment_files(directory: str | Path) -> list[Path]:
    """The segment files of a recording, in order (those present, from 0 up)."""
    folder = Path(directory)
    files = []
    while (folder / segment_name(len(files))).exists():
        files.append(folder / segment_name(len(files)))
    return files


def _new_segment(path: Path) -> BinaryIO:
    f = open(path, "xb")
    f.write(_FILE_HEADER.pack(MAGIC, FORMAT_VERSION))
    return f


class Recorder:
    """Appends records to a new segment of ``directory`` (``session.rec`` for a new
    recording, the next ``session.N.rec`` when the directory already holds one: a
    restarted process continues the same session) and keeps ``manifest.json`` listing
    the segments. ``quarantine`` stores refused messages in a bounded side file.

    Every record is flushed to the OS; with ``fsync=True`` it is also forced to disk
    (``os.fsync``), which survives power loss but costs a disk sync per message.
    ``write`` and ``quarantine`` may be called from several threads.
    """

    def __init__(self, directory: str | Path, *, source: str = "", fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        index = len(segment_files(self.directory))
        self.segment = self.directory / segment_name(index)
        self._file = _new_segment(self.segment)
        start_ns = time.time_ns()
        manifest = _read_manifest_if_any(self.directory) or {
            "schema": RECORDING_SCHEMA,
            "start_ns": start_ns,
            "start_utc": _utc(start_ns),
            "source": source,
            "file": SESSION_FILE,
            "segments": [],
        }
        manifest.setdefault("segments", [])
        manifest["segments"].append({"file": self.segment.name, "start_ns": start_ns, "start_utc": _utc(start_ns),
                                     "source": source})
        _write_json_atomically(self.directory / MANIFEST_FILE, manifest)
        self._flush(self._file)
        self._quarantine: BinaryIO | None = None
        self.records = 0
        """Records written to this segment so far."""
        self.quarantined = 0
        """Refused messages stored in the quarantine file."""
        self.quarantine_full = 0
        """Refused messages not stored because the quarantine file is full."""

    def write(self, direction: str, parts: list[bytes], recv_ns: int) -> None:
        """Append one message: ``direction`` "in" or "out", its wire ``parts`` and the local
        time it was received or sent (``recv_ns``, ``time.time_ns()``)."""
        if direction not in DIRECTIONS:
            raise RecordingError(f"direction must be one of {', '.join(DIRECTIONS)}; "
                                 f"got {direction!r}")
        if not 0 < len(parts) <= MAX_PARTS:
            raise RecordingError(f"a record holds 1 to {MAX_PARTS} parts, got {len(parts)}")
        if isinstance(recv_ns, bool) or not isinstance(recv_ns, int) or recv_ns < 0:
            raise RecordingError(f"recv_ns must be a non-negative int, got {recv_ns!r}")
        record = _pack_record(DIRECTIONS.index(direction), recv_ns, parts)
        with self._lock:
            self._file.write(record)
            self._flush(self._file)
            self.records += 1

    def quarantine(self, parts: list[bytes], reason: str, recv_ns: int) -> bool:
        """Store a refused message (clipped) with its ``reason`` in the quarantine file;
        False (and counted in ``quarantine_full``) once that file is full."""
        clipped = [bytes(p[:QUARANTINE_PART_BYTES]) for p in list(parts)[:QUARANTINE_PARTS]]
        record = _pack_record(0, recv_ns, [reason.encode("utf-8", "replace")[:QUARANTINE_PART_BYTES], *clipped])
        with self._lock:
            if self._quarantine is None:
                path = self.directory / QUARANTINE_FILE
                self._quarantine = open(path, "ab") if path.exists() else _new_segment(path)
            if self._quarantine.tell() + len(record) > QUARANTINE_MAX_BYTES:
                self.quarantine_full += 1
                return False
            self._quarantine.write(record)
            self._flush(self._quarantine)
            self.quarantined += 1
            return True

    def _flush(self, f: BinaryIO) -> None:
        f.flush()
        if self._fsync:
            os.fsync(f.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()
            if self._quarantine is not None:
                self._quarantine.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pack_record(code: int, recv_ns: int, parts: list[bytes]) -> bytes:
    return b"".join([_RECORD_HEADER.pack(code, recv_ns, len(parts)), *(_LENGTH.pack(len(p)) for p in parts),
                     *parts])


def _utc(stamp_ns: int) -> str:
    return datetime.fromtimestamp(stamp_ns / 1e9, timezone.utc).isoformat()


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _read_manifest_if_any(directory: Path) -> dict | None:
    return read_manifest(directory) if (directory / MANIFEST_FILE).exists() else None


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a recording; RecordingError if missing or of another schema."""
    path = Path(directory) / MANIFEST_FILE
    manifest = read_json(path, what=f"recording ({MANIFEST_FILE})", error=RecordingError)
    if not isinstance(manifest, dict) or manifest.get("schema") != RECORDING_SCHEMA:
        raise RecordingError(f"{path} is not a {RECORDING_SCHEMA} manifest")
    return manifest


def read_recording(directory: str | Path) -> Iterator[Record]:
    """The records of every segment of ``directory`` in order, as (direction, recv_ns, parts).

    A truncated final record of a segment (the writer crashed mid-record) is skipped with
    a warning. Raises RecordingError when there is no segment, for a file that is not a
    recording (bad magic), of an unsupported version, or with a corrupt record header.
    """
    files = segment_files(directory)
    if not files:
        raise RecordingError(f"no {SESSION_FILE} in {directory}: not a guidance recording")
    for path in files:
        yield from read_segment(path)


def read_segment(path: str | Path) -> Iterator[Record]:
    """The records of one segment file (or of the quarantine file), as in ``read_recording``."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size or head[:len(MAGIC)] != MAGIC:
            raise RecordingError(f"{path} is not a guidance recording (bad magic {head[:8]!r})")
        version = _FILE_HEADER.unpack(head)[1]
        if version != FORMAT_VERSION:
            raise RecordingError(f"{path}: unsupported format version {version}; "
                                 f"this reader knows {FORMAT_VERSION}")
        index = 0
        while True:
            record = _read_record(f, path, index)
            if record is None:
                return
            yield record
            index += 1


def _read_record(f: BinaryIO, path: Path, index: int) -> Record | None:
    """The next record, or None at the end of the file (clean or truncated)."""
    head = f.read(_RECORD_HEADER.size)
    if not head:
        return None
    if len(head) == _RECORD_HEADER.size:
        code, recv_ns, n_parts = _RECORD_HEADER.unpack(head)
        if code >= len(DIRECTIONS) or not 0 < n_parts <= MAX_PARTS:
            raise RecordingError(f"{path}: record {index} is corrupt (direction code {code}, "
                                 f"{n_parts} parts)")
        lengths_raw = f.read(_LENGTH.size * n_parts)
        if len(lengths_raw) == _LENGTH.size * n_parts:
            lengths = [n for (n,) in _LENGTH.iter_unpack(lengths_raw)]
            parts = [f.read(n) for n in lengths]
            if [len(p) for p in parts] == lengths:
                return DIRECTIONS[code], recv_ns, parts
    logger.warning("%s: record %d is truncated (the recorder stopped mid-record); ignored",
                   path, index)
    return None


def replay(records: Iterable[Record], speed: float | None = 1.0, *,
           stop: Stop | None = None) -> Iterator[Record]:
    """Yield ``records`` at their recorded relative timing (by ``recv_ns``) scaled by
    ``speed`` (1.0 = real time, 2.0 = twice as fast), or as fast as possible when
    ``speed`` is None. The waits are ``stop.wait``: setting ``stop`` ends the replay at
    once. Records whose time has already passed are yielded without waiting.
    """
    if speed is not None and not (isinstance(speed, (int, float)) and 0 < speed < float("inf")):
        raise RecordingError(f"speed must be a positive number or None, got {speed!r}")
    return _replay(records, speed, stop or threading.Event())


def _replay(records: Iterable[Record], speed: float | None,
            stop: Stop) -> Iterator[Record]:
    first_ns = None
    start_s = time.monotonic()
    for record in records:
        if stop.is_set():
            return
        if speed is not None:
            if first_ns is None:
                first_ns = record[1]
            due_s = start_s + (record[1] - first_ns) / 1e9 / speed
            wait_s = due_s - time.monotonic()
            if wait_s > 0 and stop.wait(wait_s):
                return
        yield record
