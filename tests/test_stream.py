"""sim.stream over loopback sockets on free ports: live sim, recording replay, video file."""

import threading
import time

import cv2
import numpy as np
import pytest

from guidance.live import wire
from guidance.core.geometry import invert_rigid
from guidance.live.recording import Recorder
from guidance.live.transport import Subscriber, free_tcp_endpoint
from guidance.core.views import View, carm_view, write_view
from sim.phantom import make_phantom
from sim.scenario import Scenario
from sim.stream import StreamError, replay_recording, run_sim, run_video

STARTUP_S = 0.5  # lets the test's subscriber connect before the first message
SMALL = dict(detector_px=128, pixel_spacing_mm=2.4)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=2.0)


def _start(target, **kwargs) -> tuple[threading.Thread, dict]:
    """Run a stream function in a thread; its returned stats land in the dict."""
    stats: dict = {}
    thread = threading.Thread(target=lambda: stats.update(target(**kwargs)), daemon=True)
    thread.start()
    return thread, stats


def _collect(subscribers: list[Subscriber], thread: threading.Thread, timeout_s: float = 15.0) -> list[list]:
    """Everything each subscriber receives until the thread has ended and all are quiet."""
    received: list[list] = [[] for _ in subscribers]
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        got = False
        for sub, out in zip(subscribers, received):
            msg = sub.recv(0.02)
            if msg is not None:
                out.append(msg)
                got = True
        if got or thread.is_alive():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.3:
            break
    thread.join(timeout=1.0)
    assert not thread.is_alive()
    return received


def _of_kind(messages: list, kind: str) -> list:
    return [m for m in messages if m.kind == kind]


def test_run_sim_streams_frames_and_tracker_samples_in_real_time(phantom):
    endpoint = free_tcp_endpoint()
    scenario = Scenario(duration_s=1.0, fps=10.0, **SMALL)
    stop = threading.Event()
    with Subscriber(endpoint, rcvhwm=1000) as sub:
        thread, stats = _start(run_sim, scenario=scenario, phantom=phantom, frame_endpoint=endpoint, speed=1.0,
                               stop=stop, startup_s=STARTUP_S)
        (messages,) = _collect([sub], thread)
    frames = _of_kind(messages, "frame")
    assert stats["frames"] + stats["skipped_ticks"] == 10 and stats["frames"] >= 8
    assert len(frames) == stats["frames"] and sub.lost == 0 and sub.malformed == 0
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids)) and ids[0] == 0
    for frame in frames:
        assert isinstance(frame.view, View) and frame.view.intensity == "raw" and frame.view.I0 == 4095.0
        assert frame.pixels.dtype == np.uint16 and frame.pixels.shape == (128, 128)
        assert frame.source == "sim"
        gt = frame.ground_truth
        np.testing.assert_allclose(gt["T_cam_from_world"],
                                   frame.view.T_cam_from_world @ invert_rigid(gt["T_world_corrected_from_world"]),
                                   atol=1e-9)
    acquired_s = np.array([f.acquired_ns for f in frames]) / 1e9
    period_s = np.diff(acquired_s) / np.diff(ids)
    assert 0.07 < np.median(period_s) < 0.14  # 10 fps
    assert 0.6 < acquired_s[-1] - acquired_s[0] < 1.5
    samples = _of_kind(messages, "tracker_sample")
    assert len(samples) == stats["tracker_samples"] == 3 * stats["frames"]
    assert {s.tool_id for s in samples} == {"kwire", "reference", "carm"}
    kwire = [s for s in samples if s.tool_id == "kwire"]
    assert all(s.T_tracker_from_reference is not None for s in kwire)
    heartbeats = _of_kind(messages, "heartbeat")
    assert heartbeats and {h.role for h in heartbeats} == {"sim"}
    assert heartbeats[-1].state == "finished" and heartbeats[-1].stats["frames"] == stats["frames"]
    assert 0 < stats["render_ms_mean"] < 500


def test_run_sim_fast_shots_with_a_separate_tracker_endpoint(phantom):
    frame_endpoint, tracker_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    scenario = Scenario(duration_s=0.5, fps=10.0, mode="shots", shot_interval_s=0.2, **SMALL)
    calls = []
    stop = threading.Event()
    with Subscriber(frame_endpoint, rcvhwm=1000) as frame_sub, \
            Subscriber(tracker_endpoint, rcvhwm=1000) as tracker_sub:
        thread, stats = _start(run_sim, scenario=scenario, phantom=phantom, frame_endpoint=frame_endpoint,
                               tracker_endpoint=tracker_endpoint, speed=None, stop=stop,
                               on_frame=lambda sim, sent: calls.append((sim.frame_id, sent.frame_id)),
                               startup_s=STARTUP_S)
        on_frames, on_tracker = _collect([frame_sub, tracker_sub], thread)
    assert stats["frames"] == 3 and stats["tracker_samples"] == 15 and stats["skipped_ticks"] == 0
    frames = _of_kind(on_frames, "frame")
    assert [f.frame_id for f in frames] == [0, 1, 2] and calls == [(0, 0), (1, 1), (2, 2)]
    assert not _of_kind(on_frames, "tracker_sample")
    # Unpaced, the samples of ticks without a frame go out in one burst: what overflows the
    # publisher's high-water mark is dropped (PUB never blocks) and counted as lost.
    assert len(_of_kind(on_tracker, "tracker_sample")) + tracker_sub.lost == 15 and tracker_sub.lost <= 3
    assert not _of_kind(on_tracker, "frame")
    lateral = frames[1].view.principal_ray_world  # shots cycle AP, lateral, LAO 20
    assert abs(lateral[0]) == pytest.approx(1.0)


def test_run_sim_without_a_tracker_sends_frames_alone_with_the_true_tool_pose(phantom):
    """Fluoroscopy alone (``tracked=False``): no tracker sample of any tool, and each frame
    carries the instrument's true pose as ground truth, as the scenario computes it."""
    from sim.scenario import ScenarioPlayer

    endpoint = free_tcp_endpoint()
    scenario = Scenario(duration_s=0.6, fps=10.0, mode="shots", shot_interval_s=0.2, tracked=False, **SMALL)
    stop = threading.Event()
    with Subscriber(endpoint, rcvhwm=1000) as sub:
        thread, stats = _start(run_sim, scenario=scenario, phantom=phantom, frame_endpoint=endpoint, speed=None,
                               stop=stop, startup_s=STARTUP_S)
        (messages,) = _collect([sub], thread)
    frames = _of_kind(messages, "frame")
    assert stats["tracker_samples"] == 0 and not _of_kind(messages, "tracker_sample")
    assert len(frames) == stats["frames"] == 3
    player = ScenarioPlayer(scenario, phantom)
    for frame in frames:
        t_s = frame.frame_id * scenario.shot_interval_s
        np.testing.assert_allclose(frame.ground_truth["T_world_from_tool"], player.state_at(t_s).T_world_from_tool,
                                   atol=1e-9)


def test_run_sim_stops_when_asked(phantom):
    stop = threading.Event()
    stop.set()
    stats = run_sim(Scenario(duration_s=5.0, **SMALL), phantom, frame_endpoint=free_tcp_endpoint(), stop=stop)
    assert stats["frames"] == 0 and stats["heartbeats"] == 2  # "starting", "stopped"


def _recorded_messages() -> list[tuple[str, list[bytes], bool]]:
    """(direction, parts, whether a replay re-publishes it) of a small recorded session."""
    view = carm_view(detector_size_px=(16, 12), intensity="raw", I0=4095.0)
    out = []
    for k in range(3):
        frame = wire.Frame(source="sim", seq=7 + k, stamp_ns=1_700_000_000_000_000_000 + k, frame_id=20 + k,
                           acquired_ns=1_699_999_999_000_000_000 + k, view=view,
                           pixels=np.full((12, 16), 100 * k, np.uint16),
                           ground_truth={"T_cam_from_world": view.T_cam_from_world})
        sample = wire.TrackerSample(source="sim", seq=30 + k, stamp_ns=5 + k, tool_id="kwire",
                                    T_tracker_from_tool=np.eye(4), quality=0.25, acquired_ns=3 + k)
        out += [("in", wire.encode(sample), True), ("in", wire.encode(frame), True)]
    out[2:2] = [
        ("in", wire.encode(wire.Heartbeat(source="sim", role="sim", state="running")), False),
        ("out", wire.encode(wire.Heartbeat(source="pipeline", role="pipeline", state="running")), False),
        ("in", [b"not a message"], False),
    ]
    return out


def _record(directory, spacing_ns: int = 50_000_000) -> list[list[bytes]]:
    """Write the session; returns the parts that a replay must re-publish, in order."""
    messages = _recorded_messages()
    with Recorder(directory, source="test") as recorder:
        for k, (direction, parts, _) in enumerate(messages):
            recorder.write(direction, parts, 1_000_000_000 + k * spacing_ns)
    return [parts for _, parts, replayed in messages if replayed]


def test_replay_recording_republishes_recorded_parts_byte_identically(tmp_path):
    expected = _record(tmp_path / "session")
    endpoint = free_tcp_endpoint()
    stop = threading.Event()
    with Subscriber(endpoint, rcvhwm=1000) as sub:
        thread, stats = _start(replay_recording, directory=tmp_path / "session", frame_endpoint=endpoint,
                               speed=None, stop=stop, startup_s=STARTUP_S)
        (messages,) = _collect([sub], thread)
    replayed = [m for m in messages if m.kind != "heartbeat"]
    assert [wire.encode(m) for m in replayed] == expected
    assert [m.seq for m in replayed if m.kind == "frame"] == [7, 8, 9]
    assert {m.source for m in messages if m.kind == "heartbeat"} == {"replay"}
    assert (stats["published"], stats["skipped"], stats["malformed"]) == (6, 1, 1)


def test_replay_recording_keeps_the_recorded_timing(tmp_path):
    _record(tmp_path / "session", spacing_ns=40_000_000)  # 8 records over 0.36 s
    stats = replay_recording(tmp_path / "session", frame_endpoint=free_tcp_endpoint(), speed=2.0,
                             stop=threading.Event())
    assert stats["published"] == 6 and 0.14 < stats["elapsed_s"] < 1.0
    with pytest.raises(StreamError, match="speed must be a positive number or None"):
        replay_recording(tmp_path / "session", frame_endpoint=free_tcp_endpoint(), speed=0.0,
                         stop=threading.Event())


@pytest.fixture
def video(tmp_path):
    """A 12-frame 64 x 48 MJPG video at 25 fps whose frame k is flat grey at 20 k + 10."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert writer.isOpened()
    for k in range(12):
        writer.write(np.full((48, 64, 3), 20 * k + 10, np.uint8))
    writer.release()
    return path


def _view_file(tmp_path, size):
    path = tmp_path / f"carm_{size[0]}x{size[1]}.view.json"
    write_view(carm_view(detector_size_px=size, intensity="raw", I0=4095.0), path)
    return path


def test_run_video_publishes_every_frame_as_display(tmp_path, video):
    view_path = _view_file(tmp_path, (64, 48))
    endpoint = free_tcp_endpoint()
    stop = threading.Event()
    with Subscriber(endpoint, rcvhwm=1000) as sub:
        thread, stats = _start(run_video, source=video, view_path=view_path, frame_endpoint=endpoint, stop=stop,
                               startup_s=STARTUP_S)
        (messages,) = _collect([sub], thread)
    frames = _of_kind(messages, "frame")
    assert stats["frames"] == 12 and [f.frame_id for f in frames] == list(range(12))
    for k, frame in enumerate(frames):
        assert frame.pixels.dtype == np.uint8 and frame.pixels.shape == (48, 64)
        assert frame.view.intensity == "display" and frame.view.I0 is None and frame.source == "video"
        assert abs(float(frame.pixels.mean()) - (20 * k + 10)) < 3.0
    np.testing.assert_allclose(frames[0].view.K, carm_view(detector_size_px=(64, 48)).K)
    assert 0.3 < stats["elapsed_s"] - STARTUP_S < 1.5  # the file's 25 fps


def test_run_video_loops_until_stopped(tmp_path, video):
    stop = threading.Event()
    timer = threading.Timer(0.4, stop.set)
    timer.start()
    stats = run_video(video, _view_file(tmp_path, (64, 48)), frame_endpoint=free_tcp_endpoint(), fps=100.0,
                      stop=stop, loop=True)
    timer.join()
    assert stats["frames"] > 12


def test_run_video_rejects_a_view_of_another_size_and_a_missing_file(tmp_path, video):
    with pytest.raises(StreamError, match="video frames are 64x48 pixels but the view file .* is for 32x32"):
        run_video(video, _view_file(tmp_path, (32, 32)), frame_endpoint=free_tcp_endpoint(),
                  stop=threading.Event())
    with pytest.raises(StreamError, match="cannot open video source"):
        run_video(tmp_path / "missing.avi", _view_file(tmp_path, (64, 48)), frame_endpoint=free_tcp_endpoint(),
                  stop=threading.Event())
