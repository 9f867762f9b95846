"""Frame sources on the guidance bus: the live simulator, a recording replay and a video file.

Each source binds a ``guidance.live.transport.Publisher`` on ``frame_endpoint`` (the pipeline
connects), publishes ``guidance.live.wire`` messages and, every ``heartbeat_s`` seconds, a
``Heartbeat`` with role "sim" (state "starting", "running", then "finished" or
"stopped") whose ``source`` names the kind of source ("sim", "replay", "video"). Pacing
waits on the caller's ``stop`` event (``stop.wait``), so setting it ends a source at
once; nothing here installs signal handlers.

With ``keys`` (the "sim" role's ``guidance.live.keys.CurveKeys``) the sockets use CURVE:
only processes holding an accepted key receive anything.

ZeroMQ PUB sockets drop what they send before a subscriber's subscription has arrived;
``startup_s`` delays the first message (sending heartbeats) so that subscribers that are
already connecting receive everything. At the end a source waits ``LINGER_S`` (unless
stopped) so that its last messages leave before its sockets close.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import zmq

from guidance.live import wire
from guidance.live.keys import CurveKeys
from guidance.live.recording import Record, read_recording, replay
from guidance.live.transport import Publisher
from guidance.core.dicom import read_xray_dicom
from guidance.core.errors import GuidanceError
from guidance.core.stop import Stop
from guidance.core.views import View, read_view
from guidance.core.geometry import invert_rigid
from sim.cbct import IntraopScan, intraop_scan
from sim.phantom import Phantom
from sim.scenario import Scenario, ScenarioPlayer, SimFrame, SimState
from sim.subject import Subject

__all__ = ["REPLAYED_KINDS", "LINGER_S", "StreamError", "run_sim", "replay_recording", "run_video", "run_dicom_cine"]

logger = logging.getLogger(__name__)

REPLAYED_KINDS = ("frame", "tracker_sample")
"""Message kinds of a recording's "in" records that ``replay_recording`` re-publishes."""
ROLE = "sim"
LINGER_S = 0.2
"""Pause after the last message before the sockets close (they close with LINGER 0, which
would drop what is still queued); skipped when ``stop`` is set."""


class StreamError(GuidanceError):
    """A stream source or option that cannot work (a video that will not open or does not fit its view,
    a bad rate or speed)."""


class _Session:
    """One source's heartbeats (role "sim", every ``heartbeat_s``), start-up wait, pacing
    and closing, on ``publisher``; ``stats`` travel in the heartbeats.

    Pacing: event ``index`` is due ``index * period_s`` after the start-up wait (monotonic
    clock); ``period_s`` None means unpaced. All waits are ``stop.wait``.
    """

    def __init__(self, publisher: Publisher, source: str, stop: Stop, heartbeat_s: float,
                 stats: dict) -> None:
        if not (isinstance(heartbeat_s, (int, float)) and math.isfinite(heartbeat_s) and heartbeat_s > 0):
            raise StreamError(f"heartbeat_s must be a positive number; got {heartbeat_s!r}")
        self._publisher = publisher
        self._source = source
        self._stop = stop
        self._heartbeat_s = float(heartbeat_s)
        self._next_heartbeat_s = -math.inf
        self._start_s = time.monotonic()
        self._clock_s = self._start_s
        self.stats = stats
        self.heartbeats = 0

    def _heartbeat(self, state: str) -> None:
        self._publisher.send(wire.Heartbeat(source=self._source, role=ROLE, state=state, stats=self.stats))
        self.heartbeats += 1
        self._next_heartbeat_s = time.monotonic() + self._heartbeat_s

    def _wait(self, seconds: float, state: str) -> bool:
        """Wait ``seconds`` on ``stop``, sending heartbeats on time; False once stopped."""
        deadline = time.monotonic() + seconds
        while True:
            if time.monotonic() >= self._next_heartbeat_s:
                self._heartbeat(state)
            # The wait below ends by the next heartbeat at the latest: no busy loop.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return not self._stop.is_set()
            if self._stop.wait(min(remaining, self._next_heartbeat_s - time.monotonic())):
                return False

    def start(self, startup_s: float) -> bool:
        """Wait ``startup_s`` (heartbeats "starting") and start the pacing clock; False if stopped."""
        running = self._wait(startup_s, "starting")
        self._clock_s = time.monotonic()
        return running

    def wait_for(self, index: int, period_s: float | None) -> bool:
        """Wait until event ``index`` is due (at once when unpaced); False once stopped."""
        offset_s = 0.0 if period_s is None else self._clock_s + index * period_s - time.monotonic()
        return self._wait(offset_s, "running")

    def beat(self) -> None:
        """Send a "running" heartbeat if one is due."""
        if time.monotonic() >= self._next_heartbeat_s:
            self._heartbeat("running")

    def due_index(self, period_s: float) -> int:
        """The index of the latest event already due."""
        return int(math.floor((time.monotonic() - self._clock_s) / period_s + 1e-9))

    def finish(self) -> None:
        """Record ``elapsed_s``, send the last heartbeat ("finished" or "stopped") and, unless
        stopped, linger so that the last messages leave before the sockets close."""
        self.stats["elapsed_s"] = time.monotonic() - self._start_s
        self.stats["heartbeats"] = self.heartbeats + 1
        self._heartbeat("stopped" if self._stop.is_set() else "finished")
        self._stop.wait(LINGER_S)


def _check_speed(speed: float | None) -> None:
    if speed is not None and not (isinstance(speed, (int, float)) and 0 < speed < math.inf):
        raise StreamError(f"speed must be a positive number or None (as fast as possible); got {speed!r}")


def _tracker_samples(state: SimState, instrument: str | None, quality_mm: float,
                     acquired_ns: int) -> list[wire.TrackerSample]:
    """The instrument (with the reference pose), reference and C-arm samples of a state."""
    reference = state.tracker["reference"]
    samples = []
    if instrument is not None:
        samples.append(wire.TrackerSample(source="sim", tool_id=instrument, acquired_ns=acquired_ns,
                                          T_tracker_from_tool=state.tracker[instrument],
                                          T_tracker_from_reference=reference, quality=quality_mm))
    samples.append(wire.TrackerSample(source="sim", tool_id="reference", acquired_ns=acquired_ns,
                                      T_tracker_from_tool=reference, quality=quality_mm))
    samples.append(wire.TrackerSample(source="sim", tool_id="carm", acquired_ns=acquired_ns,
                                      T_tracker_from_tool=state.tracker["carm"], quality=0.0))
    return samples


def _frame_message(frame: SimFrame, acquired_ns: int) -> wire.Frame:
    """The wire Frame of a simulated image: nominal view; as ground truth the actual pose
    and, with an instrument, its true ``T_world_from_tool``."""
    truth = {"T_cam_from_world": frame.T_cam_from_world,
             "T_world_corrected_from_world": frame.T_world_corrected_from_world}
    if frame.T_world_from_tool is not None:
        truth["T_world_from_tool"] = frame.T_world_from_tool
    return wire.Frame(source="sim", frame_id=frame.frame_id, acquired_ns=acquired_ns, view=frame.view,
                      pixels=frame.pixels, ground_truth=truth)


def run_sim(
    scenario: Scenario,
    phantom: Phantom | Subject,
    *,
    frame_endpoint: str,
    tracker_endpoint: str | None = None,
    speed: float | None = 1.0,
    stop: Stop,
    on_frame: Callable[[SimFrame, wire.Frame], None] | None = None,
    heartbeat_s: float = 0.5,
    startup_s: float = 0.0,
    prerender: bool = False,
    keys: CurveKeys | None = None,
    intraop_at_s: float | None = None,
) -> dict:
    """Play ``scenario`` on ``phantom`` (or a CT ``Subject``: ``sim.scenario.scenario_site``)
    and publish it until its ``duration_s`` or ``stop``.

    ``intraop_at_s``: at this scenario time (s) also publish an intra-op CBCT-like scan
    of the patient (``sim.cbct.intraop_scan``, prepared before streaming starts) as a
    ``VolumeFrame`` with the scanner's tracker pose and the true correction as ground truth.

    ``prerender`` renders every image before streaming starts, so the simulated C-arm
    costs no CPU while it streams: for benchmarks of the pipeline on the same machine,
    where a real C-arm would be a separate device.

    Ticks run at the scenario's ``fps`` (scenario time t = k / fps); ``speed`` 1.0 paces
    them in real time (2.0: twice as fast), None runs as fast as possible. When rendering
    falls behind real time, the ticks already past are skipped (counted), as a C-arm drops
    frames, so the scenario clock stays on the wall clock. Unpaced, bursts beyond the
    publisher's high-water mark are dropped (a PUB never blocks); subscribers count them
    as lost.

    Every tick publishes the tracker samples (the instrument, with
    ``T_tracker_from_reference``; "reference"; "carm"; none when the scenario is not
    ``tracked``) on ``tracker_endpoint`` (None: on ``frame_endpoint``), then, in fluoro
    mode or at the first tick of a new shot, a ``Frame`` (nominal view, ground truth
    ``T_cam_from_world``, ``T_world_corrected_from_world`` and, with an instrument,
    ``T_world_from_tool``); ``on_frame(sim_frame, sent_frame)`` is called after
    each frame is sent.

    Returns counts: frames, tracker_samples, heartbeats, skipped_ticks, and render_ms_mean,
    render_ms_max (image synthesis per frame), elapsed_s.
    """
    _check_speed(speed)
    player = ScenarioPlayer(scenario, phantom)
    rendered = _prerender(player) if prerender else {}
    scan = None if intraop_at_s is None else intraop_scan(player, player.ct, intraop_at_s)
    stats = {"frames": 0, "tracker_samples": 0, "skipped_ticks": 0, "render_ms_mean": 0.0, "render_ms_max": 0.0,
             "volumes": 0}
    with ExitStack() as stack:
        frame_pub = stack.enter_context(Publisher(frame_endpoint, keys=keys))
        tracker_pub = frame_pub
        if tracker_endpoint not in (None, frame_endpoint):
            tracker_pub = stack.enter_context(Publisher(tracker_endpoint, keys=keys))
        session = _Session(frame_pub, "sim", stop, heartbeat_s, stats)
        if session.start(startup_s):
            _play(session, _SimPublisher(player, frame_pub, tracker_pub, on_frame, stats, rendered, scan), speed)
        session.finish()
    logger.info("sim: %d frames (%.1f ms mean render), %d tracker samples, %d ticks skipped in %.1f s",
                stats["frames"], stats["render_ms_mean"], stats["tracker_samples"], stats["skipped_ticks"],
                stats["elapsed_s"])
    return stats


class _SimPublisher:
    """Publishes the scenario's ticks: tracker samples at each, a frame at each new image."""

    def __init__(self, player: ScenarioPlayer, frame_pub: Publisher, tracker_pub: Publisher,
                 on_frame: Callable[[SimFrame, wire.Frame], None] | None, stats: dict,
                 rendered: dict[int, SimFrame], scan: IntraopScan | None = None) -> None:
        self.player = player
        self._scan = scan
        self._rendered = rendered
        self._frame_pub = frame_pub
        self._tracker_pub = tracker_pub
        self._on_frame = on_frame
        self._stats = stats
        self._render_ms: list[float] = []
        self._last_frame_id: int | None = None

    def tick(self, t_s: float) -> None:
        """Publish scenario time ``t_s`` (s)."""
        scenario = self.player.scenario
        acquired_ns = time.time_ns()
        state = self.player.state_at(t_s)
        if scenario.tracked:
            for sample in _tracker_samples(state, scenario.instrument, scenario.tracker_noise_mm, acquired_ns):
                self._tracker_pub.send(sample)
                self._stats["tracker_samples"] += 1
        if self._scan is not None and t_s >= self._scan.t_s:
            self._frame_pub.send(_volume_message(self._scan, acquired_ns))
            self._stats["volumes"] += 1
            self._scan = None
        if state.frame_id == self._last_frame_id:
            return
        started = time.perf_counter()
        frame = self._rendered.pop(state.frame_id, None) or self.player.render(state)
        self._render_ms.append((time.perf_counter() - started) * 1e3)
        sent = self._frame_pub.send(_frame_message(frame, acquired_ns))
        self._last_frame_id = state.frame_id
        self._stats.update(frames=self._stats["frames"] + 1, render_ms_mean=float(np.mean(self._render_ms)),
                           render_ms_max=float(np.max(self._render_ms)))
        if self._on_frame is not None:
            self._on_frame(frame, sent)


def _volume_message(scan: IntraopScan, acquired_ns: int) -> wire.VolumeFrame:
    """The wire VolumeFrame of a simulated intra-op scan, the true correction as ground truth."""
    volume = scan.volume
    return wire.VolumeFrame(source="sim", volume_id=0, acquired_ns=acquired_ns, voxels=volume.data,
                            spacing_mm=volume.spacing, origin_mm=volume.origin, direction=volume.direction,
                            T_tracker_from_scanner=scan.T_tracker_from_scanner,
                            ground_truth={"T_world_corrected_from_world": invert_rigid(scan.T_scanner_from_world)})


def _prerender(player: ScenarioPlayer) -> dict[int, SimFrame]:
    """Every image of the scenario, rendered now (frame id -> frame)."""
    scenario = player.scenario
    frames: dict[int, SimFrame] = {}
    for tick in range(int(math.floor(scenario.duration_s * scenario.fps + 1e-9))):
        state = player.state_at(tick / scenario.fps)
        if state.frame_id not in frames:
            frames[state.frame_id] = player.render(state)
    logger.info("sim: pre-rendered %d images", len(frames))
    return frames


def _play(session: _Session, sim: _SimPublisher, speed: float | None) -> None:
    """Run the ticks k / fps of the scenario's duration, paced at ``speed`` (None: unpaced);
    when late, skip to the tick that is due."""
    scenario = sim.player.scenario
    n_ticks = int(math.floor(scenario.duration_s * scenario.fps + 1e-9))
    period_s = None if speed is None else 1.0 / (scenario.fps * speed)
    tick = 0
    while tick < n_ticks and session.wait_for(tick, period_s):
        due = tick if period_s is None else min(session.due_index(period_s), n_ticks)
        if due > tick:
            session.stats["skipped_ticks"] += due - tick
            tick = due
            continue
        sim.tick(tick / scenario.fps)
        tick += 1


# ---------------------------------------------------------------------------- replay


class _VerbatimPublisher(Publisher):
    """A Publisher that can also send already-encoded wire parts unchanged: no new ``seq``
    or ``stamp_ns``, so the bytes on the socket are those that were recorded."""

    def send_parts(self, kind: str, parts: list[bytes]) -> None:
        self._socket.send_multipart([kind.encode("ascii"), *parts], flags=zmq.NOBLOCK, copy=False)
        self.sent += 1


def _replayable(records: Iterator[Record], stats: dict) -> Iterator[tuple[str, int, list[bytes]]]:
    """(kind, recv_ns, parts) of the valid "in" frame and tracker sample records (the time
    stays second, where ``guidance.live.recording.replay`` reads it)."""
    for direction, recv_ns, parts in records:
        if direction != "in":
            continue
        try:
            kind = wire.decode(parts).kind
        except wire.WireError as exc:
            stats["malformed"] += 1
            logger.warning("replay: skipped a malformed record: %s", exc)
            continue
        if kind in REPLAYED_KINDS:
            yield kind, recv_ns, parts
        else:
            stats["skipped"] += 1


def replay_recording(
    directory: str | Path,
    *,
    frame_endpoint: str,
    speed: float | None = 1.0,
    stop: Stop,
    heartbeat_s: float = 0.5,
    startup_s: float = 0.0,
    keys: CurveKeys | None = None,
) -> dict:
    """Re-publish the "in" frames and tracker samples of a ``guidance.live.recording`` recording
    exactly as they were received (the recorded parts, byte for byte: same ``seq``,
    ``stamp_ns`` and ``source``), at their recorded relative timing scaled by ``speed``
    (None: as fast as possible). Other kinds and "out" records are skipped; malformed
    records are skipped with a warning. Heartbeats go out between re-published messages
    (a long pause in the recording is a pause in the heartbeats too).

    Returns counts: published, skipped ("in" records of other kinds), malformed, heartbeats,
    elapsed_s.
    """
    _check_speed(speed)
    stats = {"published": 0, "skipped": 0, "malformed": 0}
    with _VerbatimPublisher(frame_endpoint, keys=keys) as pub:
        session = _Session(pub, "replay", stop, heartbeat_s, stats)
        if session.start(startup_s):
            for kind, _, parts in replay(_replayable(read_recording(directory), stats), speed, stop=stop):
                session.beat()
                pub.send_parts(kind, parts)
                stats["published"] += 1
        session.finish()
    logger.info("replay of %s: %d messages re-published in %.1f s", directory, stats["published"],
                stats["elapsed_s"])
    return stats


# ----------------------------------------------------------------------------- video


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """A video frame as a 2-D uint8 grey image (BGR / BGRA converted, 16 bit scaled down)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise StreamError(f"unsupported video frame: {image.dtype} of shape {image.shape}")
    return np.ascontiguousarray(image)


def _open_video(source: str | Path | int) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not capture.isOpened():
        capture.release()
        raise StreamError(f"cannot open video source {source!r}")
    return capture


def _first_frame(capture: cv2.VideoCapture, source: str | Path | int, view: View,
                 view_path: str | Path) -> np.ndarray:
    """The first grey frame, checked against the view's image size."""
    ok, image = capture.read()
    if not ok:
        raise StreamError(f"video source {source!r} delivered no frame")
    grey = _grey_uint8(image)
    H, W = grey.shape
    if view.image_size != (W, H):
        raise StreamError(f"video frames are {W}x{H} pixels but the view file {view_path} is for "
                          f"{view.width}x{view.height} (image_size [W, H]); calibrate a view for this size")
    return grey


def _video_period_s(capture: cv2.VideoCapture, source: str | Path | int, fps: float | None) -> float | None:
    """Seconds between published frames: 1 / fps, else the file's own rate; None for a
    live device without ``fps`` (it delivers at its own rate)."""
    if fps is not None:
        if not (isinstance(fps, (int, float)) and 0 < fps < math.inf):
            raise StreamError(f"fps must be a positive number or None; got {fps!r}")
        return 1.0 / fps
    if isinstance(source, int):
        return None
    file_fps = capture.get(cv2.CAP_PROP_FPS)
    if not (math.isfinite(file_fps) and file_fps > 0):
        logger.warning("video %s states no frame rate; publishing as fast as it reads", source)
        return None
    return 1.0 / file_fps


def _read(capture: cv2.VideoCapture, loop: bool) -> np.ndarray | None:
    """The next BGR frame, rewinding once at the end when ``loop``; None at the end."""
    ok, image = capture.read()
    if not ok and loop:
        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, image = capture.read()
    return image if ok else None


def run_video(
    source: str | Path | int,
    view_path: str | Path,
    *,
    frame_endpoint: str,
    fps: float | None = None,
    stop: Stop,
    loop: bool = False,
    heartbeat_s: float = 0.5,
    startup_s: float = 0.0,
    keys: CurveKeys | None = None,
) -> dict:
    """Publish the frames of a video file (path) or capture device (int) as "display"
    ``Frame``s (grey uint8) with the static geometry of the view file ``view_path``.

    Frames are paced at ``fps`` (None: the file's own rate; a device paces itself) and
    numbered from 0; at the end of a file the stream stops, or starts over when ``loop``.
    Raises StreamError when the source cannot be opened or delivers nothing, or when its
    frame size differs from the view's image size (checked before anything is published).

    Returns counts: frames, heartbeats, elapsed_s.
    """
    view = read_view(view_path).with_intensity("display")
    capture = _open_video(source)
    stats = {"frames": 0}
    try:
        grey = _first_frame(capture, source, view, view_path)
        period_s = _video_period_s(capture, source, fps)
        with Publisher(frame_endpoint, keys=keys) as pub:
            session = _Session(pub, "video", stop, heartbeat_s, stats)
            if session.start(startup_s):
                while grey is not None and session.wait_for(stats["frames"], period_s):
                    pub.send(wire.Frame(source="video", frame_id=stats["frames"], acquired_ns=time.time_ns(),
                                        view=view, pixels=grey))
                    stats["frames"] += 1
                    image = _read(capture, loop)
                    grey = None if image is None else _grey_uint8(image)
            session.finish()
    finally:
        capture.release()
    logger.info("video %s: %d frames published in %.1f s", source, stats["frames"], stats["elapsed_s"])
    return stats


# ------------------------------------------------------------------------ DICOM cine


def run_dicom_cine(
    path: str | Path,
    *,
    frame_endpoint: str,
    stop: Stop,
    fps: float | None = None,
    loop: bool = False,
    isocenter_world=(0.0, 0.0, 0.0),
    heartbeat_s: float = 0.5,
    startup_s: float = 0.0,
    keys: CurveKeys | None = None,
) -> dict:
    """Publish the frames of a (multi-frame) XA/RF DICOM file as live ``Frame``s, each with
    the view its tags give (``guidance.core.dicom.read_xray_dicom``, C-arm isocentre at
    ``isocenter_world``, LPS mm), numbered from 0, paced at ``fps`` (None: the file's
    FrameTime, else 15 fps); at the end the stream stops, or starts over when ``loop``.

    Returns counts: frames, heartbeats, elapsed_s.
    """
    cine = read_xray_dicom(path, isocenter_world=isocenter_world)
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps < math.inf):
        raise StreamError(f"fps must be a positive number or None; got {fps!r}")
    period_s = 1.0 / fps if fps is not None else (cine.frame_time_s or 1.0 / 15.0)
    frames = [f if f.dtype in (np.uint8, np.uint16) else f.astype(np.float32) for f in cine.frames]
    stats = {"frames": 0}
    with Publisher(frame_endpoint, keys=keys) as pub:
        session = _Session(pub, "dicom", stop, heartbeat_s, stats)
        if session.start(startup_s):
            while session.wait_for(stats["frames"], period_s):
                i = stats["frames"] % len(frames)
                if stats["frames"] >= len(frames) and not loop:
                    break
                pub.send(wire.Frame(source="dicom", frame_id=stats["frames"], acquired_ns=time.time_ns(),
                                    view=cine.views[i], pixels=frames[i]))
                stats["frames"] += 1
        session.finish()
    logger.info("DICOM cine %s: %d frames published in %.1f s", path, stats["frames"], stats["elapsed_s"])
    return stats
