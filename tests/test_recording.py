"""guidance.live.recording: append-only session files, crash tolerance and timed replay."""

import json
import threading
import time

import pytest

from guidance.live import recording, wire
from guidance.live.recording import (
    RECORDING_SCHEMA,
    Recorder,
    RecordingError,
    read_manifest,
    read_recording,
    read_segment,
    replay,
    segment_files,
)

RECORDS = [
    ("in", 1_000_000_000, wire.encode(wire.Heartbeat(role="sim", state="running"))),
    ("in", 1_010_000_000, [b'{"header": 1}', b"\x00" * 1000, b""]),
    ("out", 1_020_000_000, [b"x" * 70_000]),
]


def _record(directory, records=RECORDS, **kwargs):
    with Recorder(directory, source="test", **kwargs) as rec:
        for direction, recv_ns, parts in records:
            rec.write(direction, parts, recv_ns)
        assert rec.records == len(records)


@pytest.mark.parametrize("fsync", [False, True])
def test_round_trip(tmp_path, fsync):
    _record(tmp_path / "session", fsync=fsync)
    assert list(read_recording(tmp_path / "session")) == RECORDS
    manifest = read_manifest(tmp_path / "session")
    assert manifest["schema"] == RECORDING_SCHEMA and manifest["source"] == "test"
    assert abs(manifest["start_ns"] - time.time_ns()) < 60e9
    decoded = wire.decode(next(read_recording(tmp_path / "session"))[2])
    assert isinstance(decoded, wire.Heartbeat)


def test_a_restart_appends_a_segment_and_never_overwrites(tmp_path):
    _record(tmp_path)
    first = (tmp_path / "session.rec").read_bytes()
    with Recorder(tmp_path, source="restarted") as rec:
        assert rec.segment.name == "session.1.rec"
        rec.write("in", [b"after restart"], 2_000_000_000)
    assert (tmp_path / "session.rec").read_bytes() == first
    assert [p.name for p in segment_files(tmp_path)] == ["session.rec", "session.1.rec"]
    assert list(read_recording(tmp_path)) == RECORDS + [("in", 2_000_000_000, [b"after restart"])]
    manifest = read_manifest(tmp_path)
    assert [(s["file"], s["source"]) for s in manifest["segments"]] == [("session.rec", "test"),
                                                                        ("session.1.rec", "restarted")]
    with pytest.raises(RecordingError, match="no session.rec"):
        list(read_recording(tmp_path / "nothing"))


def test_quarantine_is_clipped_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(recording, "QUARANTINE_MAX_BYTES", 20_000)
    with Recorder(tmp_path) as rec:
        assert rec.quarantine([b"frame"], "too few parts", 5)
        assert rec.quarantine([b"x" * 100_000] * 1100, "1100 parts", 6)
        while rec.quarantine([b"y" * 3000], "filler", 7):
            pass
        assert rec.quarantine_full == 1 and rec.records == 0
    stored = list(read_segment(tmp_path / recording.QUARANTINE_FILE))
    assert stored[0] == ("in", 5, [b"too few parts", b"frame"])
    assert stored[1][2][0] == b"1100 parts" and len(stored[1][2]) == 1 + recording.QUARANTINE_PARTS
    assert all(len(p) == recording.QUARANTINE_PART_BYTES for p in stored[1][2][1:])
    assert (tmp_path / recording.QUARANTINE_FILE).stat().st_size <= 20_000
    assert list(read_recording(tmp_path)) == []


def test_write_checks_arguments(tmp_path):
    with Recorder(tmp_path) as rec:
        with pytest.raises(RecordingError, match="direction must be one of in, out"):
            rec.write("sideways", [b"x"], 0)
        with pytest.raises(RecordingError, match="1 to 1024 parts"):
            rec.write("in", [], 0)
        with pytest.raises(RecordingError, match="recv_ns must be a non-negative int"):
            rec.write("in", [b"x"], -5)


@pytest.mark.parametrize("cut", [1, 8, 20, 1000, 70_000])
def test_truncated_tail_is_ignored(tmp_path, caplog, cut):
    _record(tmp_path)
    path = tmp_path / "session.rec"
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # the recorder died while writing the last record
    assert list(read_recording(tmp_path)) == RECORDS[:2]
    assert "record 2 is truncated" in caplog.text


def test_bad_magic_and_corrupt_record(tmp_path):
    (tmp_path / "session.rec").write_bytes(b"PK\x03\x04 not a recording at all")
    with pytest.raises(RecordingError, match="not a guidance recording"):
        list(read_recording(tmp_path))
    (tmp_path / "session.rec").write_bytes(b"")
    with pytest.raises(RecordingError, match="bad magic"):
        list(read_recording(tmp_path))
    with pytest.raises(RecordingError, match="manifest.json\\) file not found"):
        read_manifest(tmp_path)
    other = tmp_path / "other"
    _record(other)
    data = bytearray((other / "session.rec").read_bytes())
    data[10] = 7  # direction code of the first record
    (other / "session.rec").write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="record 0 is corrupt"):
        list(read_recording(other))
    (other / "manifest.json").write_text(json.dumps({"schema": "something/2"}))
    with pytest.raises(RecordingError, match="not a guidance.live.recording/1 manifest"):
        read_manifest(other)


def test_replay_as_fast_as_possible_preserves_order():
    records = [("in", (100 - i) * 10**9 if i % 2 else i * 10**9, [bytes([i])]) for i in range(50)]
    start = time.monotonic()
    assert list(replay(records, None)) == records
    assert time.monotonic() - start < 0.5


def test_replay_honours_relative_timing():
    records = [("in", 5_000_000_000 + dt_ms * 1_000_000, [b"%d" % dt_ms])
               for dt_ms in (0, 40, 120)]
    start = time.monotonic()
    times = [time.monotonic() - start for _ in replay(records, 1.0)]
    assert times[0] < 0.03
    assert 0.035 <= times[1] < 0.035 + 0.15
    assert 0.115 <= times[2] < 0.115 + 0.15
    start = time.monotonic()
    times = [time.monotonic() - start for _ in replay(records, 4.0)]
    assert 0.025 <= times[2] < 0.025 + 0.15


def test_replay_stops_on_event():
    records = [("in", 0, [b"a"]), ("in", 10 * 10**9, [b"b"])]
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    start = time.monotonic()
    assert [r[2] for r in replay(records, 1.0, stop=stop)] == [[b"a"]]
    assert time.monotonic() - start < 1.0
    timer.join()


def test_replay_checks_speed():
    for speed in (0, -1.0, float("inf"), "fast"):
        with pytest.raises(RecordingError, match="speed must be a positive number or None"):
            replay(RECORDS, speed)
