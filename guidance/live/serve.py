"""The pipeline's socket loop (``run_pipeline``): frames and tracker samples in, the
``guidance.live.pipeline.Pipeline``'s poses, instruments and overlays out, heartbeats.

Its work per loop is bounded: at most ``MAX_LOOP_MESSAGES`` messages are read, tracker
samples are coalesced to the latest per tool before instruments are computed, and only
the newest frame is handed to a worker thread that registers it (older ones counted as
skipped; one of an orientation the multi-shot book lacks is kept there as a shot, with
the tracker samples paired when it arrived); intra-op volumes are registered in that
worker too, so heartbeats (with the true state: "starting", "no_frames", "registering",
"tracking", "failed") and instruments keep flowing during a long registration. Every
accepted input and every output is recorded; refused inputs go to the recording's
quarantine. Hook points: ``sink`` (handed each published message, e.g. the OpenIGTLink
bridge) and the kind dispatch in ``_serve``.

Start-up: this module imports only the sockets and the wire, and a pipeline given as a
factory is built (registration imported, CT loaded and prepared) in the worker thread,
so a process beats "starting" within a fraction of a second of its start. The worker
then warms the pipeline up (``Pipeline.warm_up``: the DRR kernels loaded, state
"warming_up") before it takes its first frame, and logs how long each step took, from
the process's start (``process_age_s``), also in every heartbeat's stats (``startup_*``).
The steps run one after the other on purpose: they are imports and numba's set-up, which
hold the GIL, so threads running them side by side took longer in total (measured;
docs/benchmarks.md, reliability, session 5). A worker forked by a supervisor
(``guidance.live.supervisor``, ``pipeline --supervise``) is handed the pipeline built, with
its one-thread kernel loaded: its steps count from the fork, and it is ready within ~0.1 s
(session 6); its heartbeats carry ``heartbeat_stats`` (``supervised``, ``generation``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from guidance.core.errors import GuidanceError
from guidance.core.stop import Stop
from guidance.live.keys import CurveKeys
from guidance.live.recording import Recorder
from guidance.live.throttle import ThrottledLog
from guidance.live.transport import DEFAULT_MAX_FRAME_PX, Publisher, Subscriber, max_message_bytes
from guidance.live.wire import Frame, Heartbeat, Message, TrackerSample, VolumeFrame, encode

if TYPE_CHECKING:
    from guidance.live.pipeline import Pipeline, PipelineStats

__all__ = ["PIPELINE_SOURCE", "MAX_LOOP_MESSAGES", "MAX_SKIPPED_SHOTS", "process_age_s", "run_pipeline"]

log = logging.getLogger(__name__)

PIPELINE_SOURCE = "pipeline"
"""The pipeline's publisher id by default (the display takes poses from this source)."""
MAX_LOOP_MESSAGES = 512
"""Messages read per loop of ``run_pipeline`` before it publishes and beats again."""
MAX_SKIPPED_SHOTS = 4
"""Skipped frames of a new orientation waiting to be kept as shots, at most (memory bound)."""


class _FrameWorker:
    """Registers the newest submitted frame in a thread of its own and publishes the
    results with ``send``; a frame submitted while another waits replaces it (skipped; kept
    as a shot when it brings a new orientation, at most ``MAX_SKIPPED_SHOTS`` waiting).
    Intra-op volumes are registered there too (the newest waiting one).
    Given a factory, it first builds the pipeline there (``pipeline`` is None until then)."""

    def __init__(self, pipeline: Pipeline | Callable[[], Pipeline], send: Callable[..., None]) -> None:
        self._factory = pipeline if callable(pipeline) else None
        self.pipeline: Pipeline | None = None if callable(pipeline) else pipeline
        self.error: BaseException | None = None
        """Why the factory failed (the loop then stops)."""
        self.startup: dict[str, float] = {}
        """Start-up steps so far, for the heartbeat's stats: ``startup_sockets_s``,
        ``startup_built_s``, ``startup_ready_s`` (process age when the sockets were up, the
        pipeline built, warmed up), ``startup_prepared_ct_s``, ``startup_warm_up_s`` (durations)
        and ``startup_ready_cpu_s`` (CPU time the process had used when warmed up, all threads:
        the start-up's cost apart from the machine's load)."""
        self._send = send
        self._wake = threading.Condition()
        self._pending: tuple[Frame, int, tuple[TrackerSample, TrackerSample] | None] | None = None
        self._skipped: deque[tuple[Frame, tuple[TrackerSample, TrackerSample] | None]] = deque(
            maxlen=MAX_SKIPPED_SHOTS)
        self._volume: tuple[VolumeFrame, TrackerSample | None] | None = None
        self._closing = False
        self._log = ThrottledLog(log)
        self._thread = threading.Thread(target=self._run, name="pipeline-frames", daemon=True)
        self._thread.start()

    def submit(self, frame: Frame, received_ns: int) -> bool:
        """Queue ``frame`` with its tracker samples paired now, on arrival (a frame waiting
        through a long registration must not outlive the samples' history); True when it
        replaced a frame not yet started (skipped)."""
        paired = self.pipeline.paired_with(frame)
        with self._wake:
            replaced = self._pending
            self._pending = (frame, received_ns, paired)
            self._wake.notify()
        if replaced is not None and self.pipeline.wants_shot(replaced[0]):
            self._keep_shot(replaced[0], replaced[2])
        return replaced is not None

    def skip(self, frame: Frame) -> None:
        """A frame not to be registered: queued as a shot (with its tracker samples paired
        now) when it brings an orientation the shot book lacks."""
        if self.pipeline is not None and self.pipeline.wants_shot(frame):
            self._keep_shot(frame, self.pipeline.paired_with(frame))

    def _keep_shot(self, frame: Frame, paired: tuple[TrackerSample, TrackerSample] | None) -> None:
        with self._wake:
            self._skipped.append((frame, paired))

    def submit_volume(self, volume: VolumeFrame) -> bool:
        """Queue an intra-op volume with its reference array sample paired now, on arrival;
        True when it replaced one not yet started."""
        reference = None if self.pipeline is None else self.pipeline.reference_at(volume.acquired_ns)
        with self._wake:
            replaced = self._volume is not None
            self._volume = (volume, reference)
            self._wake.notify()
        return replaced

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        sockets_s = process_age_s()
        self.startup = {"startup_sockets_s": round(sockets_s, 3)}
        if self._factory is not None:
            try:
                self.pipeline = self._factory()
            except BaseException as exc:  # noqa: BLE001 - reported by run_pipeline, which re-raises it
                self.error = exc
                return
        built_s = process_age_s()
        self.startup = self.startup | {"startup_built_s": round(built_s, 3),
                                       "startup_prepared_ct_s": round(self.pipeline.registrator.prepare_s, 3)}
        warm_s = self.pipeline.warm_up()
        ready_s = process_age_s()
        cpu_s = time.process_time()
        self.startup = self.startup | {"startup_ready_s": round(ready_s, 3), "startup_warm_up_s": round(warm_s, 3),
                                       "startup_ready_cpu_s": round(cpu_s, 3)}
        log.info("pipeline ready %.2f s after the process started (%.2f s of CPU): sockets up at %.2f s, built in "
                 "%.2f s (prepared CT %.2f s), warmed up in %.2f s", ready_s, cpu_s, sockets_s, built_s - sockets_s,
                 self.pipeline.registrator.prepare_s, warm_s)
        while True:
            with self._wake:
                while self._pending is None and self._volume is None and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                volume, self._volume = self._volume, None
                skipped = list(self._skipped)
                self._skipped.clear()
                pending, self._pending = self._pending, None
            if volume is not None:
                self._volume_outputs(volume)
            for frame, paired in skipped:
                self.pipeline.on_skipped_frame(frame, paired)
            if pending is None:
                continue
            frame, received_ns, paired = pending
            try:
                outputs = self.pipeline.on_paired_frame(frame, paired, received_ns)
            except Exception as exc:  # noqa: BLE001 - one frame must never stop the pipeline
                self._log.warning("frame processing error", f"frame {frame.frame_id}: {type(exc).__name__}: {exc}")
                log.debug("frame %d failed", frame.frame_id, exc_info=True)
                outputs = [self.pipeline.failed_pose(frame, f"internal error: {type(exc).__name__}: {exc}")]
            for out in outputs:
                self._send(out, frame)

    def _volume_outputs(self, queued: tuple[VolumeFrame, TrackerSample | None]) -> None:
        volume, reference = queued
        try:
            outputs = self.pipeline.on_volume_frame(volume, reference)
        except Exception as exc:  # noqa: BLE001 - one volume must never stop the pipeline
            self._log.warning("volume processing error", f"volume {volume.volume_id}: {type(exc).__name__}: {exc}")
            return
        for out in outputs:
            self._send(out)


def run_pipeline(
    pipeline: Pipeline | Callable[[], Pipeline],
    *,
    frame_endpoints: list[str],
    result_endpoint: str,
    stop: Stop,
    record_dir: str | Path | None = None,
    heartbeat_s: float = 0.5,
    keys: CurveKeys | None = None,
    frame_source_role: str = "sim",
    sink=None,
    max_frame_px: int | None = None,
    source: str | None = None,
    heartbeat_stats: dict | None = None,
) -> PipelineStats:
    """Serve until ``stop`` is set: SUB frames/tracker samples/intra-op volumes (connecting to
    ``frame_endpoints``), PUB results (bound on ``result_endpoint``).

    ``pipeline``: a ``guidance.live.pipeline.Pipeline``, or a function that builds one
    (importing the registration and loading a CT take seconds): it is then built in the
    worker thread while the loop already beats (state "starting"). ``max_frame_px`` (the
    subscriber's ``ZMQ_MAXMSGSIZE``) and ``source`` (the publisher id of heartbeats) are
    needed before that: by default the pipeline's settings' (``DEFAULT_MAX_FRAME_PX`` and
    ``PIPELINE_SOURCE`` for a factory); a built pipeline whose settings differ is an error.
    ``keys``: CURVE identity of the pipeline (None: plain sockets); the frame endpoints must
    then be bound by the holder of ``frame_source_role``'s key. ``record_dir``: record into
    this folder (a restart appends a segment). ``sink``: also hands every message published
    to ``sink.publish(message, frame)`` (e.g. the OpenIGTLink bridge,
    ``guidance.live.igtl.IgtlBridge``); ``frame`` is the frame a PoseResult came from, else
    None; a sink that raises is logged and skipped. ``heartbeat_stats``: added to every
    heartbeat's stats (a supervised worker's ``supervised`` and ``generation``,
    ``guidance.live.supervisor``).
    """
    if callable(pipeline):
        max_frame_px = DEFAULT_MAX_FRAME_PX if max_frame_px is None else max_frame_px
        source = PIPELINE_SOURCE if source is None else source
        factory = pipeline

        def checked_factory() -> Pipeline:
            return _fitting(factory(), max_frame_px, source)

        pipeline = checked_factory
    else:
        max_frame_px = pipeline.settings.max_frame_px if max_frame_px is None else max_frame_px
        source = pipeline.settings.source if source is None else source
        _fitting(pipeline, max_frame_px, source)
    sub = pub = worker = recorder = None
    try:
        pub = Publisher(result_endpoint, bind=True, keys=keys)  # first: a taken port fails before anything is made
        recorder = Recorder(record_dir, source=source) if record_dir is not None else None
        sub = Subscriber(frame_endpoints, topics=("frame", "tracker_sample", "heartbeat", "volume"), rcvhwm=64,
                         tap=(lambda parts: recorder.write("in", parts, time.time_ns())) if recorder else None,
                         reject_tap=(lambda parts, why: recorder.quarantine(parts, why, time.time_ns()))
                         if recorder else None,
                         keys=keys, server_role=frame_source_role,
                         max_message_bytes=max_message_bytes(max_frame_px))
        send = _sender(pub, recorder, sink)
        worker = _FrameWorker(pipeline, send)
        _serve(worker, source, sub, send, stop, heartbeat_s, heartbeat_stats or {})
    finally:
        if worker is not None:
            worker.close()
        for closable in (sub, pub, recorder):
            if closable is not None:
                closable.close()
    if worker.error is not None:
        raise worker.error
    return worker.pipeline.stats


def process_age_s() -> float:
    """Seconds since this process was started (exec'd), for start-up logs: on Linux from
    /proc (10 ms ticks, the same clock for both readings); elsewhere from psutil, whose
    start time rests on a boot time rounded to the second (up to ~1 s off)."""
    if sys.platform.startswith("linux"):
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        with open(f"/proc/{os.getpid()}/stat") as f:  # field 22, starttime: after the ")" of the name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    import psutil

    return time.time() - psutil.Process().create_time()


def _fitting(pipeline: Pipeline, max_frame_px: int, source: str) -> Pipeline:
    """``pipeline``, if its settings agree with the loop's frame size limit and source id."""
    settings = pipeline.settings
    if (settings.max_frame_px, settings.source) != (max_frame_px, source):
        raise GuidanceError(f"the pipeline's settings (max_frame_px {settings.max_frame_px}, source "
                            f"{settings.source!r}) differ from the loop's (max_frame_px {max_frame_px}, "
                            f"source {source!r})")
    return pipeline


def _sender(pub: Publisher, recorder: Recorder | None, sink) -> Callable[..., None]:
    """A thread-safe ``send(message, frame=None)``: publish, record, then hand to the sink."""
    lock = threading.Lock()
    throttled = ThrottledLog(log)

    def send(msg: Message, frame: Frame | None = None) -> None:
        with lock:  # the socket is used by the loop and the frame worker
            sent = pub.send(msg)
        if recorder is not None:
            recorder.write("out", encode(sent), time.time_ns())
        if sink is not None:
            try:
                sink.publish(sent, frame)
            except Exception as exc:  # noqa: BLE001 - a broken sink must not stop guidance
                throttled.warning(f"sink {type(sink).__name__} failed", f"{type(exc).__name__}: {exc}")

    return send


def _serve(worker: _FrameWorker, source: str, sub: Subscriber, send: Callable[[Message], None],
           stop: Stop, heartbeat_s: float, heartbeat_stats: dict) -> None:
    """The socket loop: bounded drain, kind dispatch, coalesced tracker samples, the
    newest frame to the worker, heartbeats on time (state "starting" until the worker
    has built the pipeline: input read meanwhile is recorded, not processed; then
    "warming_up" while the worker warms it up: a frame submitted meanwhile waits for it)."""
    next_heartbeat = 0.0
    while not stop.is_set() and worker.error is None:
        messages = _drain(sub, timeout_s=0.02, limit=MAX_LOOP_MESSAGES)
        received_ns = time.time_ns()
        pipeline = worker.pipeline
        frames: list[Frame] = []
        samples: list[TrackerSample] = []
        volumes: list[VolumeFrame] = []
        for msg in messages:  # new input kinds get their branch here
            if isinstance(msg, Frame):
                frames.append(msg)
            elif isinstance(msg, TrackerSample):
                samples.append(msg)
            elif isinstance(msg, VolumeFrame):
                volumes.append(msg)
        if pipeline is not None and samples:
            for out in pipeline.on_tracker_samples(samples):
                send(out)
        if pipeline is not None and frames:
            pipeline.last_frame_ns = received_ns
            pipeline.stats.frames_received += len(frames)
            for frame in frames[:-1]:
                worker.skip(frame)
            pipeline.stats.frames_skipped += len(frames) - 1 + worker.submit(frames[-1], received_ns)
        if pipeline is not None and volumes:
            pipeline.stats.volumes_skipped += len(volumes) - 1 + worker.submit_volume(volumes[-1])
        now = time.monotonic()
        if now >= next_heartbeat:
            stats = {"lost": sub.lost, "malformed": sub.malformed, "replayed": sub.replayed} | worker.startup
            stats |= heartbeat_stats
            state = "starting"
            if pipeline is not None:
                stats |= pipeline.stats.as_dict()
                state = pipeline.heartbeat_state()
            send(Heartbeat(role="pipeline", state=state, stats=stats, source=source))
            next_heartbeat = now + heartbeat_s


def _drain(sub: Subscriber, *, timeout_s: float, limit: int) -> list[Message]:
    """The messages queued now, in order (waiting up to ``timeout_s`` for the first), at
    most ``limit``."""
    first = sub.recv(timeout_s)
    if first is None:
        return []
    messages = [first]
    while len(messages) < limit and (msg := sub.recv(0.0)) is not None:
        messages.append(msg)
    return messages
