"""The end-to-end demo (``make demo``): simulator, pipeline and display as three processes
on loopback, a monitor here that scores every pose against the simulator's ground truth.
Without a tracker (``tracked=False``: fluoroscopy alone) the pipeline finds the K-wire in
the images and the monitor scores those image-derived instrument states too.

Each process runs the library's own entry point (``sim.stream.run_sim``,
``guidance.live.serve.run_pipeline``, ``guidance.live.display_client.run_display``),
the same calls the CLI's ``sim``, ``pipeline`` and ``display`` make. They are processes,
not threads, because the numba kernels hold the GIL; they are spawned, so each starts
a fresh interpreter and sets up its own threads.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guidance.core.threads import configure_threads
from guidance.evaluation.metrics import mean_projection_distance, mtre, target_points
from guidance.live.display import NavigationState
from guidance.live.keys import load_keys, make_keys
from guidance.live.transport import RECONNECT_IVL_MAX_MS, Subscriber, free_tcp_endpoint
from guidance.core.geometry import invert_rigid
from guidance.core.instrument_models import get_instrument
from guidance.navigation.instruments import tip_and_axis
from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult, VolumeFrame

if TYPE_CHECKING:  # the processes import the simulator themselves, after they start
    from sim.phantom import Phantom
    from sim.scenario import Scenario
    from sim.subject import Subject

__all__ = ["DemoReport", "DemoSubject", "clean_demo_outputs", "format_summary", "run_demo"]

log = logging.getLogger(__name__)

DEMO_SHOTS = ((0.0, 0.0), (90.0, 0.0))
"""An AP and a lateral shot (LAO, cranial deg) before the fluoroscopy."""
NO_TRACKER_REST_S = 4.0
"""Without a tracker the K-wire rests from the AP shot until this long (s) after the
fluoroscopy starts (``Scenario.rest_at_shots_s``: this long either side of each change of
C-arm orientation, 2 s apart), as a surgeon stops advancing to take the AP and lateral
shots and looks at the screen, so that both shots see it at one place and the pipeline
places it from the two in the fluoroscopy frames it registers after the shots' joint
registration (measured up to 14 s on a loaded machine, 5.5 s of scenario time at 0.4x)."""
NO_TRACKER_DETECTOR_PX = 512
"""Without a tracker the simulated detector has this many pixels across (the same 307 mm
field as the tracked demo's 256 px, 0.6 mm pixels, as ``bench instruments``): at 1.2 mm the
K-wire's shadow is about 2 px wide, too thin to be found in every frame."""
DEMO_INSTRUMENT = "kwire"
"""The instrument the simulator advances (and the pipeline looks for without a tracker)."""
SIM_STARTUP_S = RECONNECT_IVL_MAX_MS / 1000.0 + 0.5
"""The simulator's heartbeats before its first frame (s): subscribers that kept retrying
while it started (pre-rendering) reconnect within ``RECONNECT_IVL_MAX_MS``; the AP shot at
scenario time 0 must not be lost to them."""


@dataclass
class DemoReport:
    """Per-frame pose errors (mm) against ground truth, latencies (ms), counts; the same
    for intra-op volumes in ``volume_rows``, and for the instruments found in the images
    (image-derived states) in ``instrument_rows``.

    ``stale_after_stop_s``: seconds from the pipeline's exit until the navigation state
    shows STALE; None when it could not be measured (no fresh pose when it was stopped).
    """

    rows: list[dict] = field(default_factory=list)
    volume_rows: list[dict] = field(default_factory=list)
    instrument_rows: list[dict] = field(default_factory=list)
    frames_published: int = 0
    pipeline_stats: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    stale_after_stop_s: float | None = None

    def summary(self) -> dict:
        """Counts, and percentiles of errors (mm), latencies (ms) and rates (Hz); a measure
        with no sample is None."""
        ok = [r for r in self.rows if r["status"] == "ok"]
        tracking = [r["registration_ms"] for r in ok if r["mode"] == "tracking"]
        latency = [r["latency_ms"] for r in self.rows]
        errors = [r["mtre_mm"] for r in ok]
        mpd = [r["mpd_iso_mm"] for r in ok]
        return {
            "frames_published": self.frames_published,
            "poses": len(self.rows),
            "ok": len(ok),
            "failed": len(self.rows) - len(ok),
            "tracking_updates": len(tracking),
            "tracking_update_p50_ms": _percentile(tracking, 50),
            "tracking_update_p95_ms": _percentile(tracking, 95),
            "mtre_median_mm": _percentile(errors, 50),
            "mtre_p95_mm": _percentile(errors, 95),
            "mpd_iso_median_mm": _percentile(mpd, 50),
            "latency_p50_ms": _percentile(latency, 50),
            "latency_p95_ms": _percentile(latency, 95),
            "pose_rate_hz": len(self.rows) / self.elapsed_s if self.elapsed_s > 0 else None,
            "frames_skipped_by_pipeline": self.pipeline_stats.get("frames_skipped"),
            "frames_lost_in_transport": self.pipeline_stats.get("lost"),
            "stale_shown_after_stop_s": self.stale_after_stop_s,
        } | ({"volume_mtre_mm": self.volume_rows[-1]["mtre_mm"]} if self.volume_rows else {}) | self._instruments()

    def _instruments(self) -> dict:
        """The image-derived instruments' errors (mm, deg; empty when none was published); "at
        rest": after the lead shots, the instrument where they all saw it; "moved": after
        them, elsewhere."""
        rows = self.instrument_rows
        if not rows:
            return {}
        at_rest = [r for r in rows if r["at_rest"]]
        return {
            "image_instrument_states": len(rows),
            "image_instrument_frames": len({r["frame_id"] for r in rows}),
            "image_tip_error_median_mm": _percentile([r["tip_error_mm"] for r in rows], 50),
            "image_tip_error_p95_mm": _percentile([r["tip_error_mm"] for r in rows], 95),
            "image_tip_in_plane_median_mm": _percentile([r["in_plane_mm"] for r in rows], 50),
            "image_axis_error_median_deg": _percentile([r["axis_error_deg"] for r in rows], 50),
            "image_depth_sigma_median_mm": _percentile([r["depth_sigma_mm"] for r in rows], 50),
            "image_tip_within_3_sigma": _rate([r["within_3_sigma"] for r in rows]),
            "image_states_at_rest": len(at_rest),
            "image_tip_error_at_rest_median_mm": _percentile([r["tip_error_mm"] for r in at_rest], 50),
            "image_tip_error_at_rest_max_mm": max((r["tip_error_mm"] for r in at_rest), default=None),
            "image_tip_within_3_sigma_moved": _rate([r["within_3_sigma"] for r in rows if r["at_rest"] is False]),
        }


def _rate(flags: list[bool | None]) -> float | None:
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def _percentile(values: list[float], q: float) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


def format_summary(summary: dict) -> str:
    """One line per measure, fixed-point (milliseconds as whole numbers), "n/a" when not measured."""
    def value(key: str, v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.0f}" if key.endswith("_ms") else f"{v:.2f}"
        return str(v)
    return "\n".join(f"{k:28s} {value(k, v)}" for k, v in summary.items())


# ------------------------------------------------------------------ the three processes


def _start_child(numba_threads: int, log_level: int) -> None:
    """First thing in a spawned process: its threads, and logging like the parent's."""
    configure_threads(numba_threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")


def _keys(keys_dir: str | None, role: str):
    """The role's CURVE keys, or None (plain sockets) without a key folder."""
    return None if keys_dir is None else load_keys(keys_dir, role)


@dataclass(frozen=True)
class DemoSubject:
    """The anatomy of a demo, as each process loads it: the phantom of ``seed`` (``ct``
    None), or the CT file ``ct`` with optional ``labels`` and ``plan`` files."""

    seed: int = 0
    ct: str | None = None
    labels: str | None = None
    plan: str | None = None

    def load(self) -> Subject:
        """The ``sim.subject.Subject`` (CT, labels, plan)."""
        from sim.subject import load_subject

        return load_subject(self.ct, labels=self.labels, plan=self.plan, phantom_seed=self.seed)

    def anatomy(self) -> Phantom | Subject:
        """What the simulator plays on: the ``Phantom`` itself (its vertebra frames), or the CT subject."""
        from sim.phantom import make_phantom

        return make_phantom(seed=self.seed) if self.ct is None else self.load()


def _sim_process(frame_endpoint: str, scenario: Scenario, subject: DemoSubject, prerender: bool,
                 intraop_at_s: float | None, speed: float, keys_dir: str | None, log_level: int, stop) -> None:
    """Spawned: the simulator's ``scenario`` on ``subject`` (an intra-op scan at
    ``intraop_at_s``), published at ``speed`` until it ends."""
    _start_child(2 if prerender else 1, log_level)  # pre-rendering: nothing else runs yet
    from sim.stream import run_sim

    run_sim(scenario, subject.anatomy(), frame_endpoint=frame_endpoint, stop=stop, startup_s=SIM_STARTUP_S,
            prerender=prerender, speed=speed, intraop_at_s=intraop_at_s, keys=_keys(keys_dir, "sim"))


def _pipeline_process(frame_endpoint: str, result_endpoint: str, subject: DemoSubject, record_dir: str | None,
                      keys_dir: str | None, log_level: int, igtl_port: int | None, detect: tuple[str, ...],
                      stop) -> None:
    """Spawned: the live pipeline on ``subject``, until ``stop``; with
    ``igtl_port`` it also serves OpenIGTLink there; ``detect``: the instruments it looks for
    in the images while no tracker sample arrives."""
    _start_child(2, log_level)
    from guidance.live.igtl import IgtlBridge
    from guidance.live.pipeline import Pipeline, PipelineSettings
    from guidance.live.serve import run_pipeline
    from guidance.registration.register import Registrator

    subject = subject.load()
    pipeline = Pipeline(Registrator(subject.ct, labels=subject.labels), plan=subject.plan, labels=subject.labels,
                        ct=subject.ct, settings=PipelineSettings(detect_instruments=detect))
    bridge = IgtlBridge(igtl_port, ct=subject.ct, plan=pipeline.plan) if igtl_port is not None else None
    try:
        run_pipeline(pipeline, frame_endpoints=[frame_endpoint], result_endpoint=result_endpoint, stop=stop,
                     record_dir=record_dir, sink=bridge, keys=_keys(keys_dir, "pipeline"))
    finally:
        if bridge is not None:
            bridge.close()


def _display_process(frame_endpoint: str, result_endpoint: str, subject: DemoSubject, out_dir: str,
                     keys_dir: str | None, log_level: int, stop) -> None:
    """Spawned: the headless navigation display of ``subject`` writing screens into ``out_dir``, until ``stop``."""
    _start_child(1, log_level)
    from guidance.live.display import HeadlessWriter
    from guidance.live.display_client import run_display

    subject = subject.load()
    run_display(frame_endpoint=frame_endpoint, result_endpoint=result_endpoint, ct=subject.ct, plan=subject.plan,
                labels=subject.labels, sink=HeadlessWriter(out_dir), stop=stop, refresh_hz=4.0,
                keys=_keys(keys_dir, "display"))


class _Process:
    """A spawned process running ``target(*args, stop)``, stopped through its own event."""

    def __init__(self, context, target, *args) -> None:
        self.stop_event = context.Event()
        self.process = context.Process(target=target, args=(*args, self.stop_event), name=target.__name__)
        self.process.start()

    def exited(self) -> bool:
        return self.process.exitcode is not None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Set its stop event (clean shutdown), then terminate it if it does not exit in time."""
        self.stop_event.set()
        self.process.join(timeout_s)
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join()
        return self.process.exitcode


def clean_demo_outputs(out_dir: Path) -> None:
    """Remove what an earlier demo wrote into ``out_dir`` (screens, recordings), nothing else."""
    for path in out_dir.glob("screen_*.png"):
        path.unlink()
    for path in out_dir.glob("recording-*"):
        if path.is_dir():
            shutil.rmtree(path)


def run_demo(out_dir: str | Path, *, duration_s: float = 20.0, fps: float = 15.0, seed: int = 0,
             startup_timeout_s: float = 120.0, print_rows: bool = True, with_display: bool = True,
             record: bool = True, prerender: bool = True, igtl_port: int | None = None,
             plain: bool = False, lead_shots: tuple[tuple[float, float], ...] = DEMO_SHOTS,
             intraop_at_s: float | None = None, speed: float = 1.0, medial_deg: float = 0.0,
             tracked: bool = True, subject: DemoSubject | None = None,
             target_world: tuple[float, float, float] | None = None,
             rest_at_shots_s: float | None = None) -> DemoReport:
    """Run sim + pipeline (+ display) on loopback for ``duration_s`` of scenario time.

    ``out_dir`` is cleaned of an earlier demo's screens and recordings first; screens go
    there (PNG), the pipeline's recording to ``out_dir/recording-<date>-<time>``.
    ``prerender``: the simulator renders its images before streaming, so that the
    simulated C-arm (a device of its own in an operating room) takes no CPU from the
    pipeline while it streams (a few seconds: each breathing pose's anatomy is rendered
    once); False renders each frame when due (measured 160 ms per frame on 2 loaded
    cores: about 5 frames/s reach the pipeline, each 160 ms old).
    ``igtl_port``: the pipeline also serves OpenIGTLink there (watch it in 3D Slicer).
    ``lead_shots``: (LAO, cranial) of the single shots taken before continuous AP
    fluoroscopy, registered jointly by the pipeline (default: an AP and a lateral).
    ``intraop_at_s``: the simulator also sends an intra-op CBCT-like scan at this scenario
    time; the pipeline registers it and maps instruments through it. ``speed``: the
    simulator's pace (1.0 real time; below 1 on a machine too loaded to keep up).
    ``medial_deg``: the K-wire's path is turned medially by this angle about the entry
    point, so the display's breach warning builds up as it advances. ``tracked``: False
    for fluoroscopy alone: the simulator sends no tracker sample, the pipeline looks for
    the K-wire in each registered frame and the report scores what it finds
    (``report.instrument_rows``); its detector then has ``NO_TRACKER_DETECTOR_PX`` pixels
    across and the K-wire starts docked on the bone at the planned entry point (as a
    surgeon docks it before the AP and lateral shots). ``rest_at_shots_s``: the K-wire
    rests this long around each change of C-arm orientation
    (``sim.scenario.Scenario.rest_at_shots_s``; default ``NO_TRACKER_REST_S`` without a
    tracker, else 0: it advances throughout). ``subject``: the anatomy every
    process loads (default: the phantom of ``seed``); on a CT the scenario aims at ``target_world`` (LPS mm; see
    ``sim.scenario.scenario_site``) and the pose error is scored at that aim point (on the
    phantom: at up to 300 points of its labelled vertebrae).
    At the end the pipeline is stopped first and the time until a navigation state fed
    by the monitor turns STALE is measured (``report.stale_after_stop_s``).
    The sockets use CURVE with the keys in ``out_dir/keys`` (made on the first run) unless
    ``plain``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_demo_outputs(out)
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    from sim.scenario import Scenario, scenario_site

    subject = subject or DemoSubject(seed=seed)
    if rest_at_shots_s is None:
        rest_at_shots_s = 0.0 if tracked else NO_TRACKER_REST_S
    no_tracker = {} if tracked else {"detector_px": NO_TRACKER_DETECTOR_PX,
                                     "pixel_spacing_mm": Scenario.pixel_spacing_mm * Scenario.detector_px
                                     / NO_TRACKER_DETECTOR_PX, "start_depth_mm": 0.0}
    scenario = Scenario(duration_s=duration_s, fps=fps, seed=0, lead_shots=tuple(lead_shots),
                        instrument=DEMO_INSTRUMENT, instrument_medial_deg=medial_deg, tracked=tracked,
                        target_world=target_world, rest_at_shots_s=rest_at_shots_s, **no_tracker)
    anatomy = subject.anatomy()
    if subject.ct is None:
        targets = target_points(anatomy.ct, labels=anatomy.labels, max_points=300, seed=seed)
    else:
        targets = scenario_site(scenario, anatomy).T_world_from_vertebra[None, :3, 3]
    del anatomy
    keys_dir = None if plain else str(out / "keys")
    if keys_dir is not None and not (out / "keys" / "monitor.key_secret").exists():
        make_keys(keys_dir)
    monitor = Subscriber([frames_ep, results_ep],
                         topics=("frame", "pose_result", "heartbeat", "volume", "instrument_state"),
                         rcvhwm=1000, keys=_keys(keys_dir, "monitor"), server_role=("sim", "pipeline"))
    recording = str(out / time.strftime("recording-%Y%m%d-%H%M%S")) if record else None
    spawn = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    detect = () if tracked else (DEMO_INSTRUMENT,)
    pipeline = _Process(spawn, _pipeline_process, frames_ep, results_ep, subject, recording, keys_dir, level,
                        igtl_port, detect)
    display = (_Process(spawn, _display_process, frames_ep, results_ep, subject, str(out), keys_dir, level)
               if with_display else None)
    sim = None
    report = DemoReport()
    try:
        _wait_for_heartbeat(monitor, "pipeline", startup_timeout_s, pipeline)
        sim = _Process(spawn, _sim_process, frames_ep, scenario, subject, prerender, intraop_at_s, speed, keys_dir,
                       level)
        frames: dict[int, Frame] = {}
        volumes: dict[int, VolumeFrame] = {}
        state = NavigationState(expected_source="pipeline")
        t0 = None
        # Score until shortly before the scenario ends (scenario time counts from the first
        # frame), then stop the pipeline while frames still flow, to time the STALE warning.
        while (t0 is None or time.monotonic() - t0 < (duration_s - 1.0) / speed) and not sim.exited():
            msg = monitor.recv(0.2)
            if isinstance(msg, Frame):
                t0 = time.monotonic() if t0 is None else t0
                frames[msg.frame_id] = msg
                report.frames_published += 1
            elif isinstance(msg, VolumeFrame):
                volumes[msg.volume_id] = msg
            elif isinstance(msg, PoseResult) and msg.mode == "volume":
                if msg.frame_id in volumes:
                    row = _score_volume(msg, volumes[msg.frame_id], targets)
                    report.volume_rows.append(row)
                    if print_rows:
                        print(_format_row(row), flush=True)
            elif isinstance(msg, PoseResult) and msg.frame_id in frames:
                state.on_pose(msg, time.time())
                row = _score(msg, frames[msg.frame_id], targets)
                report.rows.append(row)
                if print_rows:
                    print(_format_row(row), flush=True)
            elif isinstance(msg, InstrumentState) and msg.image_derived and msg.frame_id in frames:
                shots = [frames[i] for i in range(len(lead_shots)) if i in frames]
                row = _score_instrument(msg, frames[msg.frame_id],
                                        shots if msg.frame_id >= len(shots) == len(lead_shots) else ())
                if row is not None:
                    report.instrument_rows.append(row)
                    if print_rows:
                        print(_format_instrument_row(row), flush=True)
            elif isinstance(msg, Heartbeat) and msg.role == "pipeline" and msg.stats:
                report.pipeline_stats = dict(msg.stats)
        report.elapsed_s = time.monotonic() - t0 if t0 is not None else 0.0
        report.stale_after_stop_s = _time_to_stale(pipeline, monitor, state)
    finally:
        monitor.close()
        for process in (sim, pipeline, display):
            if process is not None:
                process.stop()
    return report


def _time_to_stale(pipeline: _Process, monitor: Subscriber, state: NavigationState,
                   wait_s: float = 5.0) -> float | None:
    """Stop the pipeline right after a pose arrives; seconds until ``state`` says STALE.

    None when no pose arrives within ``wait_s`` (the scenario ended, or the pipeline is
    too slow): there is then nothing fresh on the screen to go stale."""
    deadline = time.monotonic() + wait_s
    fresh = False
    while not fresh and time.monotonic() < deadline:
        msg = monitor.recv(0.05)
        if isinstance(msg, PoseResult):
            state.on_pose(msg, time.time())
            fresh = True
    if not fresh:
        log.warning("no pose within %.0f s before stopping the pipeline: time to STALE not measured", wait_s)
        return None
    pipeline.stop()
    stopped = time.time()  # the pipeline has exited; a pose it finished on the way out may still arrive
    while state.status(time.time()) != "stale":
        msg = monitor.recv(0.01)
        if isinstance(msg, PoseResult):
            state.on_pose(msg, time.time())
            stopped = time.time()
    return time.time() - stopped


def _wait_for_heartbeat(sub: Subscriber, role: str, timeout_s: float, process: _Process) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.exited():
            raise RuntimeError(f"the {role} process exited with code {process.process.exitcode} during start-up")
        msg = sub.recv(0.5)
        if isinstance(msg, Heartbeat) and msg.role == role:
            return
    raise RuntimeError(f"no heartbeat from the {role} within {timeout_s:.0f} s")


def _score(pose: PoseResult, frame: Frame, targets: np.ndarray) -> dict:
    row = {"frame_id": pose.frame_id, "status": pose.status, "mode": pose.mode, "reason": pose.reason,
           "shots": list(pose.shots), "latency_ms": pose.latency_ms.get("total", float("nan")),
           "registration_ms": pose.latency_ms.get("registration", float("nan")), "mtre_mm": float("nan"),
           "mpd_iso_mm": float("nan")}
    if pose.status == "ok" and frame.ground_truth:
        T_gt = frame.ground_truth["T_cam_from_world"]
        T_est = pose.views[0]["T_cam_from_world"]
        row["mtre_mm"] = mtre(T_est, T_gt, targets)
        row["mpd_iso_mm"] = mean_projection_distance(frame.view.with_pose(T_est), frame.view.with_pose(T_gt),
                                                     targets)[1]
    return row


def _score_volume(pose: PoseResult, volume: VolumeFrame, targets: np.ndarray) -> dict:
    """An intra-op volume's pose: mTRE of the scanner-frame positions of the targets."""
    row = {"frame_id": pose.frame_id, "status": pose.status, "mode": pose.mode, "reason": pose.reason,
           "shots": [], "latency_ms": pose.latency_ms.get("total", float("nan")),
           "registration_ms": pose.latency_ms.get("registration", float("nan")), "mtre_mm": float("nan"),
           "mpd_iso_mm": float("nan")}
    truth = (volume.ground_truth or {}).get("T_world_corrected_from_world")
    if pose.status == "ok" and truth is not None:
        row["mtre_mm"] = mtre(invert_rigid(pose.T_world_corrected_from_world), invert_rigid(truth), targets)
    return row


def _score_instrument(state: InstrumentState, frame: Frame, shots: tuple[Frame, ...] | list[Frame] = ()
                      ) -> dict | None:
    """An image-derived instrument against the frame's true tool pose: 3D tip error (mm),
    in-plane tip error (mm: the true tip's distance from the line from the X-ray source
    through the estimated tip, true C-arm pose), axis error (deg), the published depth
    sigma (mm), whether the tip error lies within 3 published sigmas (in-plane and
    depth together; None when not published), and ``at_rest``: whether the tool is where
    it was in every one of the earlier ``shots`` (None without them); None without truth
    or a pose."""
    truth = (frame.ground_truth or {}).get("T_world_from_tool")
    if truth is None or state.status != "ok" or state.tip_world is None or state.axis_world is None:
        return None
    at_rest = None
    if shots:
        at_rest = all(np.array_equal((shot.ground_truth or {}).get("T_world_from_tool"), truth) for shot in shots)
    tip, axis = tip_and_axis(truth, get_instrument(state.tool_id))
    source = invert_rigid(frame.ground_truth["T_cam_from_world"])[:3, 3]
    ray = (state.tip_world - source) / np.linalg.norm(state.tip_world - source)
    cos = float(np.clip(np.dot(state.axis_world, axis), -1.0, 1.0))
    tip_error_mm = float(np.linalg.norm(state.tip_world - tip))
    sigmas = (state.uncertainty_in_plane_mm, state.uncertainty_depth_mm)
    return {"frame_id": state.frame_id, "tool_id": state.tool_id, "tip_error_mm": tip_error_mm,
            "in_plane_mm": float(np.linalg.norm(np.cross(tip - source, ray))),
            "axis_error_deg": float(np.degrees(np.arccos(cos))),
            "depth_sigma_mm": state.uncertainty_depth_mm, "at_rest": at_rest,
            "within_3_sigma": None if None in sigmas else tip_error_mm <= 3.0 * math.hypot(*sigmas)}


def _format_instrument_row(row: dict) -> str:
    return (f"frame {row['frame_id']:4d}  {row['tool_id']} found in the image: tip error {row['tip_error_mm']:5.1f} mm "
            f"(in-plane {row['in_plane_mm']:4.2f} mm), axis {row['axis_error_deg']:4.1f} deg")


def _format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"frame {row['frame_id']:4d}  FAILED ({row['reason']})  latency {row['latency_ms']:6.0f} ms"
    if row["mode"] == "volume":
        return (f"volume {row['frame_id']:3d}  intra-op CT registered: mTRE {row['mtre_mm']:5.2f} mm  "
                f"({row['reason']})  {row['registration_ms']:6.0f} ms")
    return (f"frame {row['frame_id']:4d}  {row['mode']:8s}  mTRE {row['mtre_mm']:5.2f} mm  "
            f"mPD {row['mpd_iso_mm']:5.2f} mm  latency {row['latency_ms']:6.0f} ms  shots {row['shots']}")
