"""``run_guidance.py bench reliability``: the live chain under hostile and faulty input.

A simulated C-arm and tracker (this process, CURVE "sim" key) stream pre-rendered frames
at ``fps`` to a real pipeline process (the CLI, "pipeline" key, recording on); a display
loop (``run_display``, "display" key) and a monitor ("monitor" key) watch. Then:

- probes: each class of bad input a reliability probe found (malformed bytes, ill-typed
  view fields, absurd shapes, topic-only and 1100-part messages, bursts of valid
  tracker samples and frames, an oversized frame, a flood of garbage): is every process
  still running, and how long until the next good pose (frame acquired after the probe);
- fake poses: with the C-arm stopped, a process without an accepted key binds the frame
  port and publishes ok poses; a holder of the pipeline key replays a recorded pose
  verbatim and re-stamped: screens shown as valid (OK) during each;
- memory (RSS) of the pipeline and of this process (display included) after 1/10 and
  all of ``duration_s`` of streaming;
- kill -9 of the pipeline: time until the display says STALE, frames with a published
  pose missing from the recording;
- start-up of the pipeline process: its first heartbeat (send stamp), built (first
  heartbeat past "starting"), warmed up (past "warming_up"), first ok pose split into that pose's registration and the
  rest (target: the rest <= 1 s), and the steps the pipeline itself reports in its heartbeats' stats (process age
  when its sockets were up, it was built and warmed up, and the CPU time used by then; its prepared CT's load and
  warm-up);
- restarts in several orders: time from the last start to the first ok pose (or screen),
  split the same way, with the same steps;
- ``SUPERVISED_RESTARTS`` cold restarts of the pipeline process (kill -9, start it again):
  first ok pose after each, split the same way (median and range of the rest, the load
  average);
- a bind conflict: the message a pipeline prints when its port is taken;
- restarts without a cold process: the pipeline under ``--supervise`` and as many kill -9
  of its worker as cold restarts above (each worker at least ``RestartPolicy.quick_s`` old,
  so that no crash-loop delay applies), measured the same way; the generation its
  heartbeats report, its recording's segments, and how SIGTERM to the supervisor ends
  (status, workers left);
- in this process, before the chain starts: CURVE's cost on the frame stream
  (``curve_cost``) and how soon a stream is back after an oversized frame that the
  receiving socket refuses, plain, CURVE, and CURVE with a second receiver
  (``oversize_cost``).

Benchmarks measure; tests assert. The figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import zmq

from guidance.core.views import view_to_dict
from guidance.live.display import HeadlessWriter
from guidance.live.display_client import run_display
from guidance.live.keys import CurveKeys, load_keys, make_keys
from guidance.live.recording import read_manifest, read_recording
from guidance.live.supervisor import RestartPolicy
from guidance.live.transport import DEFAULT_MAX_FRAME_PX, Publisher, Subscriber, free_tcp_endpoint, max_message_bytes
from guidance.live.wire import Frame, Heartbeat, Message, PoseResult, TrackerSample, decode, encode

__all__ = ["run_reliability", "curve_cost", "oversize_cost", "format_rows"]

log = logging.getLogger(__name__)

RESUME_TIMEOUT_S = 15.0
START_TIMEOUT_S = 600.0
SUPERVISED_RESTARTS = 5
"""Cold restarts, and kill -9 of a supervised worker, measured each (medians in the table)."""


# ------------------------------------------------------------------------ the C-arm


class _Source:
    """The simulated C-arm and tracker: cycles pre-rendered frames at ``fps`` with fresh
    ids and stamps, tracker samples with each, on a CURVE publisher bound at
    ``endpoint``; ``inject`` queues probe messages (Messages or raw multipart bytes) that
    the same socket sends between two ticks. Its sockets have a ZeroMQ context (I/O thread)
    of their own, as a separate C-arm process would: a CURVE sender encrypts a whole
    message before its first byte leaves (about 0.7 s for the 128 MiB oversized frame),
    which must not hold up the display's sockets in this process."""

    def __init__(self, endpoint: str, keys: CurveKeys, frames: list, fps: float, instrument: str) -> None:
        self.endpoint, self.keys, self.frames, self.fps, self.instrument = endpoint, keys, frames, fps, instrument
        self.frame_id = 0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context = zmq.Context()

    def start(self) -> None:
        self._stop.clear()
        self._pub = Publisher(self.endpoint, keys=self.keys, context=self._context)
        self._thread = threading.Thread(target=self._run, name="bench-source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pub.close()

    def inject(self, items: list) -> None:
        """Send ``items`` (Messages, or raw [topic, *parts] lists) before the next tick;
        returns when they have been handed to the socket."""
        done = threading.Event()
        self._queue.put((items, done))
        done.wait()

    def _run(self) -> None:
        period_s = 1.0 / self.fps
        next_tick = time.monotonic()
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            while not self._queue.empty():
                items, done = self._queue.get()
                for item in items:
                    self._pub.send(item) if isinstance(item, Message) else self._pub.send_raw(item)
                done.set()
            self._tick()
            next_tick += period_s
            if next_tick < time.monotonic():
                next_tick = time.monotonic() + period_s

    def _tick(self) -> None:
        sim = self.frames[self.frame_id % len(self.frames)]
        now = time.time_ns()
        reference = sim.tracker["reference"]
        self._pub.send(TrackerSample(source="sim", tool_id=self.instrument, acquired_ns=now, quality=0.25,
                                     T_tracker_from_tool=sim.tracker[self.instrument],
                                     T_tracker_from_reference=reference))
        self._pub.send(TrackerSample(source="sim", tool_id="reference", acquired_ns=now, quality=0.25,
                                     T_tracker_from_tool=reference))
        self._pub.send(TrackerSample(source="sim", tool_id="carm", acquired_ns=now, quality=0.0,
                                     T_tracker_from_tool=sim.tracker["carm"]))
        self._pub.send(Frame(source="sim", frame_id=self.frame_id, acquired_ns=now, view=sim.view,
                             pixels=sim.pixels))
        self.frame_id += 1

    def good_frame(self) -> Frame:
        sim = self.frames[0]
        return Frame(source="sim", frame_id=10**9, acquired_ns=time.time_ns(), view=sim.view, pixels=sim.pixels)


# ------------------------------------------------------------------------- probes


def _header_with(parts: list[bytes], path: tuple, value) -> list[bytes]:
    header = json.loads(parts[0])
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return [json.dumps(header).encode(), *parts[1:]]


def _probes(source: _Source) -> list[tuple[str, list]]:
    """(probe class, messages to inject) for each class of bad or excessive input."""
    good = encode(source.good_frame())
    zeros = encode(Frame(source="sim", frame_id=1, acquired_ns=time.time_ns(), view=source.frames[0].view,
                         pixels=np.zeros(source.frames[0].pixels.shape, np.float32)))
    nan_pixels = np.full(source.frames[0].pixels.shape, np.nan, np.float32).tobytes()
    nan_frame = [_header_with(zeros, ("buffers", 0, "crc32"), zlib.crc32(nan_pixels))[0], nan_pixels]
    sample = encode(TrackerSample(source="sim", tool_id="reference", T_tracker_from_tool=np.eye(4), quality=0.0,
                                  acquired_ns=time.time_ns()))
    scaled = _header_with(sample, ("T_tracker_from_tool",), (np.eye(4) * 2).tolist())
    view = view_to_dict(source.frames[0].view)
    raw = [
        ("none (baseline: the next good pose without a probe)", []),
        ("garbage bytes", [[b"frame", b"\x00\xffgarbage", b"\x01"]]),
        ("truncated frame", [[b"frame", good[0], good[1][:-100]]]),
        ("wrong dtype", [[b"frame", *_header_with(good, ("buffers", 0, "dtype"), "float64")]]),
        ("NaN pixels", [[b"frame", *nan_frame]]),
        ("unknown version", [[b"frame", *_header_with(good, ("version",), 99)]]),
        ("unknown kind", [[b"frame", *_header_with(good, ("kind",), "teapot")]]),
        ("non-rigid tracker pose", [[b"tracker_sample", *scaled]]),
        ("view pixel_spacing_mm [a, b]", [[b"frame", *_header_with(good, ("view", "pixel_spacing_mm"), ["a", "b"])]]),
        ("view I0 [1, 2]", [[b"frame", *_header_with(good, ("view",), view | {"I0": [1, 2]})]]),
        ("70-dimension shape", [[b"frame", *_header_with(good, ("buffers", 0, "shape"), [1] * 70)]]),
        ("shape [2**63, 0]", [[b"frame", *_header_with(good, ("buffers", 0, "shape"), [2**63, 0])]]),
        ("topic-only message", [[b"frame"]]),
        ("1100-part message", [[b"frame", good[0], *([b"x"] * 1099)]]),
        ("10,000 malformed messages", [[b"frame", b"garbage %d" % i] for i in range(10_000)]),
    ]
    sample = TrackerSample(source="burst", tool_id="probe-burst", T_tracker_from_tool=np.eye(4), quality=0.0,
                           acquired_ns=time.time_ns())
    base = replace(source.good_frame(), source="burst")
    big_view = replace(source.frames[0].view.downsampled(source.frames[0].view.width / 8192), image_size=(8192, 8192))
    oversized = Frame(source="burst", frame_id=1, acquired_ns=time.time_ns(), view=big_view,
                      pixels=np.zeros((8192, 8192), np.uint16))
    return raw + [("10,000 valid tracker samples", _stamped([sample] * 10_000)),
                  ("2,000 valid frames", _stamped([replace(base, frame_id=10**9 + i) for i in range(2_000)])),
                  ("8192x8192 frame", _stamped([oversized]))]


def _stamped(messages: list[Message]) -> list[list[bytes]]:
    """Messages encoded now, as a publisher would stamp them (seq and stamp_ns rising), so
    that a burst leaves the socket at full speed."""
    return [[m.kind.encode("ascii"), *encode(replace(m, seq=i, stamp_ns=time.time_ns()))]
            for i, m in enumerate(messages)]


# ----------------------------------------------------------------------- watchers


class _Display:
    """``run_display`` in a thread, every screen's (time, status) kept."""

    def __init__(self, frame_ep: str, result_ep: str, ct, plan, keys: CurveKeys, out: Path) -> None:
        self.screens: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.result: dict = {}
        sink = HeadlessWriter(out, every_n=100)
        self._thread = threading.Thread(target=lambda: self.result.update(run_display(
            frame_endpoint=frame_ep, result_endpoint=result_ep, ct=ct, plan=plan, sink=sink, stop=self._stop,
            refresh_hz=20.0, size=(640, 360), keys=keys, on_screen=lambda s, t: self.screens.append((t, s)))),
            name="bench-display", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def ok_between(self, t0: float, t1: float) -> int:
        return sum(1 for t, s in self.screens if t0 <= t <= t1 and s == "ok")

    def first(self, status: str, after_s: float, timeout_s: float) -> float | None:
        """Seconds from ``after_s`` (epoch) to the first screen with ``status``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hit = next((t for t, s in list(self.screens) if t >= after_s and s == status), None)
            if hit is not None:
                return hit - after_s
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _first_heartbeats(result_ep: str, keys: CurveKeys,
                      timeout_s: float) -> tuple[Heartbeat | None, float | None, float | None]:
    """The pipeline's first heartbeat seen (its ``stamp_ns`` says when it was sent, its
    ``seq`` how many were sent before it, lost while this subscriber was still connecting),
    and the send times (s, epoch) of its first heartbeats past "starting" (built) and past
    "warming_up" (ready for its first frame)."""
    first = built_s = None
    with Subscriber(result_ep, topics=("heartbeat",), keys=keys, server_role="pipeline") as sub:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = sub.recv(max(0.0, deadline - time.monotonic()))
            first = first or msg
            if msg is not None and msg.state != "starting" and built_s is None:
                built_s = msg.stamp_ns / 1e9
            if msg is not None and msg.state not in ("starting", "warming_up"):
                return first, built_s, msg.stamp_ns / 1e9
    return first, built_s, None


def _first_ok_pose(monitor: Subscriber, after_ns: int, timeout_s: float,
                   poses: list[PoseResult] | None = None) -> float | None:
    """Seconds from ``after_ns`` until an ok pose of a frame acquired after it arrives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = monitor.recv(0.05)
        if isinstance(msg, PoseResult):
            if poses is not None:
                poses.append(msg)
            if msg.status == "ok" and msg.frame_acquired_ns > after_ns:
                return (time.time_ns() - after_ns) / 1e9
    return None


class _Pipeline:
    """The pipeline as a real process (the CLI), its output in a log file; ``supervise``:
    with ``--supervise`` (the process is the supervisor, its child the worker)."""

    def __init__(self, out: Path, frame_ep: str, result_ep: str, keys_dir: Path, record: Path,
                 supervise: bool = False) -> None:
        self.args = [sys.executable, "-m", "run_guidance", "pipeline", "--frame-endpoints", frame_ep,
                     "--result-endpoint", result_ep,
                     "--keys", str(keys_dir), "--record", str(record)] + (["--supervise"] if supervise else [])
        self.log_path = out / ("supervised-pipeline.log" if supervise else "pipeline.log")
        self.record = record
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        env = dict(os.environ, NUMBA_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        log_file = open(self.log_path, "a")
        self.process = subprocess.Popen(self.args, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        log_file.close()
        return time.time()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def workers(self) -> list[int]:
        """Pids of the supervised process's workers (its children)."""
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def kill9_worker(self) -> None:
        """kill -9 of the supervised process's worker."""
        (worker,) = self.workers()
        os.kill(worker, signal.SIGKILL)

    def stop(self) -> None:
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_lines(self) -> int:
        return len(self.log_path.read_text().splitlines()) if self.log_path.exists() else 0


# -------------------------------------------------------------------------- bench


def run_reliability(out_dir: str | Path, *, duration_s: float = 600.0, fps: float = 15.0, seed: int = 0,
                    n_frames: int = 15) -> list[dict]:
    """Run every measurement described in the module docstring; returns the rows
    (measure, value, target, met) of the table. ``duration_s``: the memory phase (the
    issue's figure is 600 s; tests run a few seconds)."""
    from sim.phantom import make_phantom
    from sim.scenario import Scenario, ScenarioPlayer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys_dir = out / time.strftime("keys-%Y%m%d-%H%M%S")
    make_keys(keys_dir)
    keys = {role: load_keys(keys_dir, role) for role in ("sim", "pipeline", "display", "monitor")}
    phantom = make_phantom(seed=seed)
    scenario = Scenario(duration_s=n_frames / fps, fps=fps, seed=seed)
    player = ScenarioPlayer(scenario, phantom)
    frames = [player.render(player.state_at(k / fps)) for k in range(n_frames)]
    frame_ep, result_ep = free_tcp_endpoint(), free_tcp_endpoint()
    record = out / time.strftime("recording-%Y%m%d-%H%M%S")
    source = _Source(frame_ep, keys["sim"], frames, fps, scenario.instrument)
    pipeline = _Pipeline(out, frame_ep, result_ep, keys_dir, record)
    monitor = Subscriber(result_ep, topics=("pose_result",), rcvhwm=1000, keys=keys["monitor"],
                         server_role="pipeline")
    rows: list[dict] = []

    def row(measure: str, value, target: str = "", met: bool | None = None) -> None:
        rows.append({"measure": measure, "value": value, "target": target, "met": met})
        log.info("%s: %s", measure, value)

    rows += curve_cost()
    rows += oversize_cost()
    display = supervised = None
    try:
        source.start()
        started = pipeline.start()
        display = _Display(frame_ep, result_ep, phantom.ct, phantom.plan, keys["display"], out / "screens")
        beat, built_s, ready_s = _first_heartbeats(result_ep, keys["monitor"], START_TIMEOUT_S)
        row("start-up: pipeline process start -> its first heartbeat seen: sent (s, its stamp), seq, state",
            "none" if beat is None else f"{beat.stamp_ns / 1e9 - started:.2f}, {beat.seq}, {beat.state}",
            "well under 1 s")
        row("start-up: pipeline process start -> built (first heartbeat past 'starting'), warmed up (past "
            "'warming_up') (s)", f"{_round(None if built_s is None else built_s - started)}, "
            f"{_round(None if ready_s is None else ready_s - started)}")
        _start_row("start-up: pipeline process start -> first ok pose", monitor, started, row)
        _steps_row("start-up", result_ep, keys["monitor"], row)
        _probe_rows(source, pipeline, display, monitor, row)
        _memory_rows(pipeline, display, monitor, duration_s, row)
        _fake_and_replay_rows(source, display, monitor, frame_ep, keys, phantom, out, row)
        _kill_rows(source, pipeline, display, monitor, record, row)
        display = _restart_rows(source, pipeline, display, monitor, frame_ep, result_ep, keys, phantom, out, row)
        _cold_restart_rows(pipeline, monitor, row)
        _bind_conflict_row(out, frame_ep, result_ep, keys_dir, row)
        pipeline.stop()
        supervised = _Pipeline(out, frame_ep, result_ep, keys_dir, out / "supervised-recording", supervise=True)
        _supervised_rows(supervised, monitor, result_ep, keys["monitor"], row)
    finally:
        monitor.close()
        pipeline.stop()
        if supervised is not None:
            supervised.stop()
        if display is not None:
            display.close()
        source.stop()
    return rows


def curve_cost(*, frame_px: int = 256, fps: float = 15.0, seconds: float = 10.0, burst: int = 300) -> list[dict]:
    """CURVE against plain sockets on loopback, in this process: a ``frame_px``^2 uint16
    frame stream at ``fps`` for ``seconds`` (transport latency = receipt minus send stamp,
    p50/p95 ms; CPU ms per frame of sender + receiver), then ``burst`` frames unpaced
    (frames per second through)."""
    from guidance.core.views import carm_view

    with tempfile.TemporaryDirectory() as keys_dir:
        make_keys(keys_dir, roles=("sim", "pipeline"))
        keys = {role: load_keys(keys_dir, role) for role in ("sim", "pipeline")}
    view = carm_view(detector_size_px=(frame_px, frame_px)).with_intensity("raw", 4095.0)
    pixels = np.random.default_rng(0).integers(0, 4096, (frame_px, frame_px)).astype(np.uint16)
    rows = []
    for mode in ("plain", "curve"):
        endpoint = free_tcp_endpoint()
        pub_keys, sub_keys = (None, None) if mode == "plain" else (keys["sim"], keys["pipeline"])
        with Publisher(endpoint, keys=pub_keys, sndhwm=burst + 10) as pub, \
                Subscriber(endpoint, keys=sub_keys, server_role="sim", rcvhwm=burst + 10) as sub:
            while sub.recv(0.05) is None:  # connected (and, with CURVE, handshaken)
                pub.send(Frame(source="sim", frame_id=0, acquired_ns=time.time_ns(), view=view, pixels=pixels))
            latencies, cpu0 = [], time.process_time()
            n = int(seconds * fps)
            for i in range(n):
                pub.send(Frame(source="sim", frame_id=i + 1, acquired_ns=time.time_ns(), view=view, pixels=pixels))
                deadline = time.monotonic() + 1.0 / fps
                while (msg := sub.recv(max(0.0, deadline - time.monotonic()))) is not None:
                    latencies.append((time.time_ns() - msg.stamp_ns) / 1e6)
            cpu_ms = (time.process_time() - cpu0) * 1e3 / n
            start = time.perf_counter()
            for i in range(burst):
                pub.send(Frame(source="sim", frame_id=n + i + 1, acquired_ns=time.time_ns(), view=view, pixels=pixels))
            got = 0
            while got < burst and sub.recv(2.0) is not None:
                got += 1
            through = got / (time.perf_counter() - start)
        lat = np.asarray(latencies)
        rows.append({"measure": f"{mode}: {frame_px}^2 uint16 at {fps:g} fps, latency p50 / p95 (ms), "
                                f"CPU per frame (ms), unpaced frames/s",
                     "value": f"{np.percentile(lat, 50):.2f} / {np.percentile(lat, 95):.2f}, {cpu_ms:.2f}, "
                              f"{through:.0f}", "target": "", "met": None})
    return rows


def oversize_cost(*, frame_px: int = 256, big_px: int = 8192, fps: float = 15.0,
                  max_frame_px: int = DEFAULT_MAX_FRAME_PX) -> list[dict]:
    """The refusal of one ``big_px``^2 uint16 frame among ``frame_px``^2 ones at ``fps``, by
    in-process subscribers accepting frames of ``max_frame_px`` a side: plain, CURVE, and
    CURVE with a second subscriber (as the display beside the pipeline, each with a ZeroMQ
    context, an I/O thread, of its own): seconds from handing it to the publisher's socket
    to the first frame sent after it received by each (the socket refuses the part by its
    size, the subscriber reconnects; with CURVE the publisher first encrypts the whole
    message for each connection in turn on its one I/O thread, before its first byte leaves,
    and a reconnecting subscriber's handshake waits for that thread)."""
    from guidance.core.views import carm_view

    with tempfile.TemporaryDirectory() as keys_dir:
        make_keys(keys_dir, roles=("sim", "pipeline", "display"))
        keys = {role: load_keys(keys_dir, role) for role in ("sim", "pipeline", "display")}
    view = carm_view(detector_size_px=(frame_px, frame_px)).with_intensity("raw", 4095.0)
    small = np.zeros((frame_px, frame_px), np.uint16)
    big_view = replace(view.downsampled(frame_px / big_px), image_size=(big_px, big_px))
    big = Frame(source="big", frame_id=0, acquired_ns=time.time_ns(), view=big_view,
                pixels=np.zeros((big_px, big_px), np.uint16))
    big_parts = _stamped([big])[0]
    values = []
    context = zmq.Context()  # the sender's own I/O thread, as in another process (never terminated: its
    second_context = zmq.Context()  # CURVE authenticator lives as long as this process); the second receiver's
    for mode, roles in (("plain", ("pipeline",)), ("curve", ("pipeline",)), ("curve", ("pipeline", "display"))):
        endpoint = free_tcp_endpoint()
        pub_keys = None if mode == "plain" else keys["sim"]
        with Publisher(endpoint, keys=pub_keys, context=context) as pub:
            subs = [Subscriber(endpoint, keys=None if mode == "plain" else keys[role], server_role="sim",
                               max_message_bytes=max_message_bytes(max_frame_px),
                               context=second_context if i else None) for i, role in enumerate(roles)]
            frame_id = 0

            def tick() -> None:
                nonlocal frame_id
                frame_id += 1
                pub.send(Frame(source="sim", frame_id=frame_id, acquired_ns=time.time_ns(), view=view, pixels=small))

            try:
                for sub in subs:
                    while sub.recv(1.0 / fps) is None:  # connected (and, with CURVE, handshaken)
                        tick()
                pub.send_raw(big_parts)
                sent_ns, back_s = time.time_ns(), [None] * len(subs)
                deadline = time.monotonic() + RESUME_TIMEOUT_S
                while None in back_s and time.monotonic() < deadline:
                    tick()
                    end = time.monotonic() + 1.0 / fps
                    while time.monotonic() < end:
                        for i, sub in enumerate(subs):
                            msg = sub.recv(0.005)
                            if back_s[i] is None and msg is not None and msg.acquired_ns > sent_ns:
                                back_s[i] = (time.time_ns() - sent_ns) / 1e9
            finally:
                for sub in subs:
                    sub.close()
        values.append(f"{mode}{' with two receivers' if len(subs) > 1 else ''} "
                      f"{' / '.join(str(_round(b)) for b in back_s)}")
    return [{"measure": f"{big_px}^2 uint16 frame refused by the socket: stream back after (s)",
             "value": ", ".join(values), "target": "", "met": None}]


def _round(value: float | None, digits: int = 2):
    return None if value is None else round(value, digits)


def _probe_rows(source, pipeline, display, monitor, row) -> None:
    for name, items in _probes(source):
        lines_before = pipeline.log_lines()
        source.inject(items)
        sent_ns = time.time_ns()  # the end of the burst
        resumed = _first_ok_pose(monitor, sent_ns, RESUME_TIMEOUT_S)
        alive = pipeline.running() and display.alive()
        logged = pipeline.log_lines() - lines_before
        row(f"probe {name}: processes running / good pose resumed (s) / pipeline log lines",
            f"{'yes' if alive else 'NO'} / {_round(resumed)} / {logged}", "yes / <= 1",
            alive and resumed is not None and resumed <= 1.0)


def _memory_rows(pipeline, display, monitor, duration_s: float, row) -> None:
    """RSS after a tenth and all of ``duration_s`` of streaming; meanwhile the pose rate,
    the poses' data age on arrival and the share of screens shown as valid (OK)."""
    me = psutil.Process()
    start, t0 = time.monotonic(), time.time()
    ages_ms: list[float] = []

    def watch(until_s: float) -> None:
        while time.monotonic() < until_s:
            msg = monitor.recv(0.1)
            if isinstance(msg, PoseResult) and msg.status == "ok":
                ages_ms.append((time.time_ns() - msg.frame_acquired_ns) / 1e6)

    watch(start + duration_s / 10)
    early = (pipeline.rss_mb(), me.memory_info().rss / 2**20)
    watch(start + duration_s)
    late = (pipeline.rss_mb(), me.memory_info().rss / 2**20)
    for name, a, b in (("pipeline", early[0], late[0]), ("bench + display", early[1], late[1])):
        growth = 100.0 * (b - a) / a
        row(f"memory {name}: RSS at {duration_s / 10:.0f} s / {duration_s:.0f} s (MB), growth %",
            f"{a:.0f} / {b:.0f}, {growth:+.1f} %", "< 5 %", growth < 5.0)
    screens = [s for t, s in list(display.screens) if t >= t0]
    ok_share = 100.0 * sum(s == "ok" for s in screens) / max(1, len(screens))
    age = f"{np.percentile(ages_ms, 50):.0f} / {np.percentile(ages_ms, 95):.0f}" if ages_ms else "none"
    row("normal streaming: ok poses/s, their data age on arrival p50 / p95 (ms), screens shown OK (%)",
        f"{len(ages_ms) / duration_s:.2f}, {age}, {ok_share:.0f} %")


def _fake_and_replay_rows(source, display, monitor, frame_ep, keys, phantom, out, row) -> None:
    recorded = _first_pose(monitor)  # a real ok pose to replay, taken while the C-arm streams
    # A squatter without an accepted key on the frame port while the C-arm is stopped.
    source.stop()
    outsider_dir = out / "outsider-keys"
    make_keys(outsider_dir, roles=("pipeline",))
    own = load_keys(outsider_dir, "pipeline")
    outsider = CurveKeys(role="pipeline", public=own.public, secret=own.secret, peers=dict(keys["sim"].peers))
    t0 = time.time()
    with Publisher(frame_ep, keys=outsider) as squatter:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            frame = source.good_frame()
            squatter.send(frame)
            squatter.send(_fake_pose(frame))
            time.sleep(1 / 15)
    fake_ok = display.ok_between(t0 + 0.6, time.time())  # after the last real pose went stale
    row("fake ok poses (no key, squatting the frame port) shown as valid (screens)", fake_ok, "0", fake_ok == 0)
    # Replays by a holder of the pipeline key, to a display that listens to it.
    source.start()
    replay_ep = free_tcp_endpoint()
    screens_dir = out / "replay-screens"
    with Publisher(replay_ep, keys=keys["pipeline"]) as insider:
        replay_display = _Display(frame_ep, replay_ep, phantom.ct, phantom.plan, keys["display"], screens_dir)
        try:
            t0 = time.time()
            end = time.monotonic() + 3.0
            restamped = encode(replace(recorded, stamp_ns=time.time_ns()))
            while time.monotonic() < end:
                insider.send_raw([b"pose_result", *encode(recorded)])  # verbatim
                insider.send_raw([b"pose_result", *restamped])  # new send stamp, old data
                time.sleep(1 / 15)
            replay_ok = replay_display.ok_between(t0, time.time())
        finally:
            replay_display.close()
    row("replayed ok poses (verbatim and re-stamped) shown as valid (screens)", replay_ok, "0", replay_ok == 0)


def _fake_pose(frame: Frame) -> PoseResult:
    """An ok pose 10 deg / 20 mm off, claiming to be the pipeline's."""
    from guidance.core.geometry import make_rigid, rotation_about_axis

    return PoseResult(frame_id=frame.frame_id, status="ok", reason="fake", confidence=1.0, mode="tracking",
                      T_world_corrected_from_world=make_rigid(rotation_about_axis([0, 0, 1], 10.0), [20.0, 0, 0]),
                      frame_acquired_ns=frame.acquired_ns, source="pipeline")


def _first_pose(monitor: Subscriber) -> PoseResult:
    deadline = time.monotonic() + RESUME_TIMEOUT_S
    while time.monotonic() < deadline:
        msg = monitor.recv(0.1)
        if isinstance(msg, PoseResult) and msg.status == "ok":
            return msg
    raise RuntimeError("no ok pose to replay: the pipeline published none")


def _kill_rows(source, pipeline, display, monitor, record: Path, row) -> None:
    poses: list[PoseResult] = []
    _first_ok_pose(monitor, time.time_ns(), RESUME_TIMEOUT_S, poses)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        msg = monitor.recv(0.05)
        if isinstance(msg, PoseResult):
            poses.append(msg)
    killed = time.time()
    pipeline.kill9()
    stale = display.first("stale", killed, 5.0)
    row("STALE shown after the pipeline is killed (s)", _round(stale), "<= 0.5", stale is not None and stale <= 0.5)
    recorded = {decode(parts).frame_id for direction, _, parts in read_recording(record)
                if direction == "in" and parts and b'"kind":"frame"' in parts[0]}
    lost = sum(1 for p in poses if p.frame_id not in recorded)
    row("kill -9: frames with a published pose missing from the recording", lost, "<= 1", lost <= 1)


def _first_ok_split(monitor: Subscriber, after_s: float) -> tuple[float, float, str] | None:
    """Seconds from ``after_s`` (epoch) to the first ok pose of a frame acquired after it,
    and that pose's registration (its preprocessing and registration latencies, s) and mode;
    None when none came."""
    poses: list[PoseResult] = []
    first = _first_ok_pose(monitor, int(after_s * 1e9), START_TIMEOUT_S, poses)
    if first is None:
        return None
    latency_ms = poses[-1].latency_ms
    return first, (latency_ms.get("preprocess", 0.0) + latency_ms.get("registration", 0.0)) / 1e3, poses[-1].mode


def _start_row(measure: str, monitor: Subscriber, after_s: float, row) -> None:
    """Seconds from ``after_s`` to the first ok pose, split into that pose's registration
    and the rest (process start-up, imports, CT preparation, waiting for a frame): the
    target is the rest <= 1 s."""
    split = _first_ok_split(monitor, after_s)
    if split is None:
        row(measure + " (s)", None, "the registration + <= 1 s", False)
        return
    first, registration_s, mode = split
    row(measure + " (s): total, its registration, the rest",
        f"{first:.2f}, {registration_s:.2f} ({mode}), {first - registration_s:.2f}",
        "the registration + <= 1 s", first - registration_s <= 1.0)


def _restarts_row(measure: str, splits: list[tuple[float, float, str] | None], row) -> None:
    """The rest of each restart (first ok pose less its registration): median (range), then
    each as total / registration / rest."""
    done = [s for s in splits if s is not None]
    rests = [first - registration_s for first, registration_s, _ in done]
    value = "none" if not rests else (
        f"rest median {np.median(rests):.2f} ({min(rests):.2f}-{max(rests):.2f}), {len(done)} of {len(splits)}; "
        + "; ".join(f"{f:.2f} / {r:.2f} / {f - r:.2f}" for f, r, _ in done)
        + f"; load average {os.getloadavg()[0]:.1f}")
    row(measure + " (s): the rest median (range); each total / its registration / the rest", value,
        "the registration + <= 1 s", bool(rests) and len(done) == len(splits) and float(np.median(rests)) <= 1.0)


def _cold_restart_rows(pipeline: _Pipeline, monitor: Subscriber, row) -> None:
    """``SUPERVISED_RESTARTS`` cold restarts of the unsupervised pipeline process (kill -9,
    start it again), for comparison with the supervised worker's in the same run."""
    splits = []
    for _ in range(SUPERVISED_RESTARTS):
        pipeline.kill9()
        splits.append(_first_ok_split(monitor, pipeline.start()))
    _restarts_row("cold restart (kill -9, start the process again) -> first ok pose", splits, row)


def _supervised_rows(supervised: _Pipeline, monitor: Subscriber, result_ep: str, keys: CurveKeys, row) -> None:
    """The pipeline under --supervise: its start, then ``SUPERVISED_RESTARTS`` kill -9 of its
    worker (each at least ``RestartPolicy.quick_s`` old: no crash-loop delay), the generation
    reported, its recording's segments, and SIGTERM to the supervisor."""
    _start_row("start under --supervise (preparation, fork) -> first ok pose", monitor, supervised.start(), row)
    quick_s = RestartPolicy().quick_s
    splits, last_start = [], time.monotonic()
    for _ in range(SUPERVISED_RESTARTS):
        time.sleep(max(0.0, last_start + quick_s - time.monotonic()))
        killed, last_start = time.time(), time.monotonic()
        supervised.kill9_worker()
        splits.append(_first_ok_split(monitor, killed))
    _restarts_row("pipeline worker killed (kill -9) under --supervise -> first ok pose", splits, row)
    _steps_row("the last worker", result_ep, keys, row)
    generation = None
    with Subscriber(result_ep, topics=("heartbeat",), keys=keys, server_role="pipeline") as sub:
        deadline = time.monotonic() + RESUME_TIMEOUT_S
        while generation is None and time.monotonic() < deadline:
            msg = sub.recv(max(0.0, deadline - time.monotonic()))
            if msg is not None and (msg.stats or {}).get("supervised"):
                generation = msg.stats["generation"]
    row("supervised worker's heartbeat: generation after the kills", generation, str(SUPERVISED_RESTARTS),
        generation == SUPERVISED_RESTARTS)
    segments = len(read_manifest(supervised.record)["segments"])
    row("supervised recording: segments (one per worker, same folder)", segments, str(SUPERVISED_RESTARTS + 1),
        segments == SUPERVISED_RESTARTS + 1)
    workers = supervised.workers()
    supervised.process.send_signal(signal.SIGTERM)
    rc = supervised.process.wait(timeout=60)
    left = [pid for pid in workers if _running(pid)]
    row("SIGTERM to the supervisor: its exit status, workers left", f"{rc}, {len(left)}", "0, 0",
        rc == 0 and not left)


def _steps_row(start: str, result_ep: str, keys: CurveKeys, row) -> None:
    """The start-up steps the running pipeline reports in its heartbeats' stats."""
    steps = None
    with Subscriber(result_ep, topics=("heartbeat",), keys=keys, server_role="pipeline") as sub:
        deadline = time.monotonic() + RESUME_TIMEOUT_S
        while steps is None and time.monotonic() < deadline:
            msg = sub.recv(max(0.0, deadline - time.monotonic()))
            if msg is not None and "startup_ready_s" in (msg.stats or {}):
                steps = msg.stats
    value = None if steps is None else (
        f"{steps['startup_sockets_s']:.2f}, {steps['startup_built_s']:.2f}, {steps['startup_ready_s']:.2f} "
        f"({steps['startup_ready_cpu_s']:.2f} of CPU); {steps['startup_prepared_ct_s']:.2f}, "
        f"{steps['startup_warm_up_s']:.2f}")
    row(f"{start}: pipeline's own steps: sockets up, built, warmed up (s after its exec; CPU s used by then); of "
        "which prepared CT, warm-up (s)", value)


def _restart_rows(source, pipeline, display, monitor, frame_ep, result_ep, keys, phantom, out, row):
    def first_ok(after_s: float) -> float | None:
        return _first_ok_pose(monitor, int(after_s * 1e9), START_TIMEOUT_S)

    t = pipeline.start()  # after kill -9: same recording folder, a new segment
    _start_row("restart pipeline -> first ok pose", monitor, t, row)
    _steps_row("restart pipeline", result_ep, keys["monitor"], row)
    segments = len(read_manifest(pipeline.record)["segments"])
    row("recording segments after the restart (same folder)", segments, "2", segments == 2)
    source.stop()
    source.start()
    row("restart C-arm/tracker -> first ok pose (s)", _round(first_ok(time.time())))
    display.close()
    display = _Display(frame_ep, result_ep, phantom.ct, phantom.plan, keys["display"], out / "screens")
    t = time.time()
    row("restart display -> first ok screen (s)", _round(display.first("ok", t, RESUME_TIMEOUT_S)))
    for order in (("pipeline", "sim"), ("sim", "pipeline")):
        source.stop()
        pipeline.stop()
        for name in order:
            (pipeline.start if name == "pipeline" else source.start)()
        _start_row(f"stop C-arm and pipeline, start {' then '.join(order)} -> first ok pose", monitor,
                   time.time(), row)
        _steps_row(f"start {' then '.join(order)}", result_ep, keys["monitor"], row)
    return display


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _bind_conflict_row(out: Path, frame_ep: str, result_ep: str, keys_dir: Path, row) -> None:
    """A second pipeline on the same result port: it must exit with a clear error."""
    second = _Pipeline(out, frame_ep, result_ep, keys_dir, out / "second-recording")
    second.log_path = out / "second-pipeline.log"
    second.start()
    rc = second.process.wait(timeout=START_TIMEOUT_S)
    message = next((line for line in second.log_path.read_text().splitlines() if "cannot bind" in line), "")
    row("second pipeline on a taken port: exit code, message", f"{rc}: {message[:160]}", "2: names port and pid",
        rc == 2 and result_ep.rsplit(":", 1)[1] in message)


def format_rows(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| measure | value | target | met |", "|---|---|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['measure']} | {r['value']} | {r['target']} | {met} |")
    return "\n".join(lines)
