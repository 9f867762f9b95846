"""Append-only recording of a session's messages, and their replay.

A recording is a directory with two files:

- ``manifest.json``: ``{"schema": "guidance.live.recording/1", "start_ns": ..., "start_utc": ...,
  "source": ..., "file": "session.rec"}``, written when the recording opens;
- ``session.rec``: the magic ``b"GDREC\\r\\n\\x1a"`` and a little-endian uint16 format
  version, then one record per message::

      direction  uint8    0 = "in" (received), 1 = "out" (sent)
      recv_ns    uint64   local receive / send time, time.time_ns()
      n_parts    uint32
      lengths    n_parts x uint64
      parts      the bytes of each part, back to back

The parts are wire parts (``guidance.live.wire.encode``, no transport topic frame). Every record
is written with one call and flushed, so a crash loses at most the record in flight; a
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

__all__ = [
    "RECORDING_SCHEMA",
    "RecordingError",
    "Recorder",
    "read_manifest",
    "read_recording",
    "replay",
]

logger = logging.getLogger(__name__)

RECORDING_SCHEMA = "guidance.live.recording/1"
MAGIC = b"GDREC\r\n\x1a"
FORMAT_VERSION = 1
SESSION_FILE = "session.rec"
MANIFEST_FILE = "manifest.json"
DIRECTIONS = ("in", "out")
MAX_PARTS = 1024

_FILE_HEADER = struct.Struct("<8sH")
_RECORD_HEADER = struct.Struct("<BQI")
_LENGTH = struct.Struct("<Q")

Record = tuple[str, int, list[bytes]]
"""(direction, recv_ns, parts)."""


class RecordingError(GuidanceError):
    """A recording that cannot be read (not a recording, unsupported version, corrupt)."""


class Recorder:
    """Appends records to ``<directory>/session.rec`` (a new file; an existing session is
    never overwritten) after writing ``manifest.json``.

    Every record is flushed to the OS; with ``fsync=True`` it is also forced to disk
    (``os.fsync``), which survives power loss but costs a disk sync per message.
    ``write`` may be called from several threads.
    """

    def __init__(self, directory: str | Path, *, source: str = "", fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._file = open(self.directory / SESSION_FILE, "xb")
        start_ns = time.time_ns()
        manifest = {
            "schema": RECORDING_SCHEMA,
            "start_ns": start_ns,
            "start_utc": datetime.fromtimestamp(start_ns / 1e9, timezone.utc).isoformat(),
            "source": source,
            "file": SESSION_FILE,
        }
        (self.directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        self._file.write(_FILE_HEADER.pack(MAGIC, FORMAT_VERSION))
        self._flush()
        self.records = 0
        """Records written so far."""

    def write(self, direction: str, parts: list[bytes], recv_ns: int) -> None:
        """Append one message: ``direction`` "in" or "out", its wire ``parts`` and the local
        time it was received or sent (``recv_ns``, ``time.time_ns()``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; "
                             f"got {direction!r}")
        if not 0 < len(parts) <= MAX_PARTS:
            raise ValueError(f"a record holds 1 to {MAX_PARTS} parts, got {len(parts)}")
        if isinstance(recv_ns, bool) or not isinstance(recv_ns, int) or recv_ns < 0:
            raise ValueError(f"recv_ns must be a non-negative int, got {recv_ns!r}")
        record = b"".join([
            _RECORD_HEADER.pack(DIRECTIONS.index(direction), recv_ns, len(parts)),
            *(_LENGTH.pack(len(p)) for p in parts),
            *parts,
        ])
        with self._lock:
            self._file.write(record)
            self._flush()
            self.records += 1

    def _flush(self) -> None:
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a recording; RecordingError if missing or of another schema."""
    path = Path(directory) / MANIFEST_FILE
    manifest = read_json(path, what=f"recording ({MANIFEST_FILE})", error=RecordingError)
    if not isinstance(manifest, dict) or manifest.get("schema") != RECORDING_SCHEMA:
        raise RecordingError(f"{path} is not a {RECORDING_SCHEMA} manifest")
    return manifest


def read_recording(directory: str | Path) -> Iterator[Record]:
    """The records of ``<directory>/session.rec`` in order, as (direction, recv_ns, parts).

    A truncated final record (the writer crashed mid-record) is skipped with a warning.
    Raises RecordingError for a file that is not a recording (bad magic), of an
    unsupported version, or with a corrupt record header.
    """
    path = Path(directory) / SESSION_FILE
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
           stop: threading.Event | None = None) -> Iterator[Record]:
    """Yield ``records`` at their recorded relative timing (by ``recv_ns``) scaled by
    ``speed`` (1.0 = real time, 2.0 = twice as fast), or as fast as possible when
    ``speed`` is None. The waits are ``stop.wait``: setting ``stop`` ends the replay at
    once. Records whose time has already passed are yielded without waiting.
    """
    if speed is not None and not (isinstance(speed, (int, float)) and 0 < speed < float("inf")):
        raise ValueError(f"speed must be a positive number or None, got {speed!r}")
    return _replay(records, speed, stop or threading.Event())


def _replay(records: Iterable[Record], speed: float | None,
            stop: threading.Event) -> Iterator[Record]:
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
