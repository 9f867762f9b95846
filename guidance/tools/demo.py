"""The end-to-end demo (``make demo``): simulator, pipeline and display as three processes
on loopback, a monitor here that scores every pose against the simulator's ground truth.

Each process is the real CLI (``python -m run_guidance sim|pipeline|display``), so the
demo exercises exactly what an operator would start by hand.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guidance.live.display import NavigationState
from guidance.evaluation.benchmark import mean_projection_distance, mtre, target_points
from guidance.live.transport import Subscriber, free_tcp_endpoint
from guidance.live.wire import Frame, Heartbeat, PoseResult

__all__ = ["DemoReport", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoReport:
    """Per-frame pose errors (mm) against ground truth, latencies (ms), counts."""

    rows: list[dict] = field(default_factory=list)
    frames_published: int = 0
    pipeline_stats: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    stale_after_stop_s: float = float("nan")

    def summary(self) -> dict:
        ok = [r for r in self.rows if r["status"] == "ok"]
        lat = np.array([r["latency_ms"] for r in self.rows]) if self.rows else np.zeros(1)
        err = np.array([r["mtre_mm"] for r in ok]) if ok else np.array([np.nan])
        mpd = np.array([r["mpd_iso_mm"] for r in ok]) if ok else np.array([np.nan])
        tracking = [r for r in ok if r["mode"] == "tracking"]
        track_ms = np.array([r["registration_ms"] for r in tracking]) if tracking else np.array([np.nan])
        return {
            "frames_published": self.frames_published,
            "poses": len(self.rows),
            "ok": len(ok),
            "failed": len(self.rows) - len(ok),
            "tracking_updates": len(tracking),
            "tracking_update_p50_ms": float(np.percentile(track_ms, 50)),
            "tracking_update_p95_ms": float(np.percentile(track_ms, 95)),
            "mtre_median_mm": float(np.median(err)),
            "mtre_p95_mm": float(np.percentile(err, 95)),
            "mpd_iso_median_mm": float(np.median(mpd)),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
            "pose_rate_hz": len(self.rows) / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "frames_skipped_by_pipeline": self.pipeline_stats.get("frames_skipped"),
            "frames_lost_in_transport": self.pipeline_stats.get("lost"),
            "stale_shown_after_stop_s": self.stale_after_stop_s,
        }


def _cli(*args: str, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "run_guidance", *args], env=env)


def _stop(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM (clean shutdown), then kill if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def run_demo(out_dir: str | Path, *, duration_s: float = 20.0, fps: float = 15.0, seed: int = 0,
             startup_timeout_s: float = 120.0, print_rows: bool = True, with_display: bool = True,
             record: bool = True, prerender: bool = False) -> DemoReport:
    """Run sim + pipeline (+ display) on loopback for ``duration_s`` of scenario time.

    Screens go to ``out_dir`` (PNG), the pipeline's recording to a new
    ``out_dir/recording-<date>-<time>`` (recordings are never overwritten).
    ``prerender``: the simulator renders its images before streaming (benchmarks).
    At the end the pipeline is stopped first and the time until a navigation state fed
    by the monitor turns STALE is measured (``report.stale_after_stop_s``).
    """
    from sim.phantom import make_phantom

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    phantom = make_phantom(seed=seed)
    targets = target_points(phantom.ct, labels=phantom.labels, max_points=300, seed=seed)
    monitor = Subscriber([frames_ep, results_ep], topics=("frame", "pose_result", "heartbeat"), rcvhwm=1000)
    recording = out / time.strftime("recording-%Y%m%d-%H%M%S")
    record_args = ("--record", str(recording)) if record else ()
    pipeline = _cli("pipeline", "--frames", frames_ep, "--results", results_ep, "--phantom-seed", str(seed),
                    *record_args, threads=2)
    display = None
    if with_display:
        display = _cli("display", "--headless", "--out", str(out), "--frames", frames_ep, "--results", results_ep,
                       "--phantom-seed", str(seed), "--fps", "4", threads=1)
    sim = None
    report = DemoReport()
    try:
        _wait_for_heartbeat(monitor, "pipeline", startup_timeout_s, pipeline)
        sim = _cli("sim", "--frames", frames_ep, "--duration", str(duration_s), "--fps", str(fps),
                   "--phantom-seed", str(seed), *(("--prerender",) if prerender else ()), threads=1)
        frames: dict[int, Frame] = {}
        state = NavigationState()
        t0 = None
        # Score until shortly before the scenario ends (scenario time counts from the first
        # frame), then stop the pipeline while frames still flow, to time the STALE warning.
        while (t0 is None or time.monotonic() - t0 < duration_s - 1.0) and sim.poll() is None:
            msg = monitor.recv(0.2)
            if isinstance(msg, Frame):
                t0 = time.monotonic() if t0 is None else t0
                frames[msg.frame_id] = msg
                report.frames_published += 1
            elif isinstance(msg, PoseResult) and msg.frame_id in frames:
                state.on_pose(msg, time.time())
                row = _score(msg, frames[msg.frame_id], targets)
                report.rows.append(row)
                if print_rows:
                    print(_format_row(row), flush=True)
            elif isinstance(msg, Heartbeat) and msg.role == "pipeline" and msg.stats:
                report.pipeline_stats = dict(msg.stats)
        report.elapsed_s = time.monotonic() - t0 if t0 is not None else 0.0
        report.stale_after_stop_s = _time_to_stale(pipeline, monitor, state)
    finally:
        monitor.close()
        for process in (sim, pipeline, display):
            if process is not None:
                _stop(process)
    return report


def _time_to_stale(pipeline: subprocess.Popen, monitor: Subscriber, state: NavigationState) -> float:
    """Stop the pipeline while poses are fresh; seconds until ``state`` says STALE."""
    deadline = time.monotonic() + 2.0
    while state.status(time.time()) != "ok" and time.monotonic() < deadline:
        msg = monitor.recv(0.05)
        if isinstance(msg, PoseResult):
            state.on_pose(msg, time.time())
    if state.status(time.time()) != "ok":
        return float("nan")  # no fresh pose to go stale from (the sim has ended)
    _stop(pipeline)
    stopped = time.time()  # the pipeline has exited; a pose it finished on the way out may still arrive
    while state.status(time.time()) == "ok":
        msg = monitor.recv(0.01)
        if isinstance(msg, PoseResult):
            state.on_pose(msg, time.time())
            stopped = time.time()
    return time.time() - stopped


def _wait_for_heartbeat(sub: Subscriber, role: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {role} process exited with code {process.returncode} during start-up")
        msg = sub.recv(0.5)
        if isinstance(msg, Heartbeat) and msg.role == role:
            return
    raise RuntimeError(f"no heartbeat from the {role} within {timeout_s:.0f} s")


def _score(pose: PoseResult, frame: Frame, targets: np.ndarray) -> dict:
    row = {"frame_id": pose.frame_id, "status": pose.status, "mode": pose.mode, "reason": pose.reason,
           "latency_ms": pose.latency_ms.get("total", float("nan")),
           "registration_ms": pose.latency_ms.get("registration", float("nan")), "mtre_mm": float("nan"),
           "mpd_iso_mm": float("nan")}
    if pose.status == "ok" and frame.ground_truth:
        T_gt = frame.ground_truth["T_cam_from_world"]
        T_est = pose.views[0]["T_cam_from_world"]
        row["mtre_mm"] = mtre(T_est, T_gt, targets)
        row["mpd_iso_mm"] = mean_projection_distance(frame.view.with_pose(T_est), frame.view.with_pose(T_gt),
                                                     targets)[1]
    return row


def _format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"frame {row['frame_id']:4d}  FAILED ({row['reason']})  latency {row['latency_ms']:6.0f} ms"
    return (f"frame {row['frame_id']:4d}  {row['mode']:8s}  mTRE {row['mtre_mm']:5.2f} mm  "
            f"mPD {row['mpd_iso_mm']:5.2f} mm  latency {row['latency_ms']:6.0f} ms")
