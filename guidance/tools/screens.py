"""Reference navigation screens from the simulator, without sockets or timing.

The scenario's K-wire advances on a path turned medially off the plan; the live pipeline
maps its tracker samples into the CT (with the registration taken from the simulator's
ground truth, so the pictures do not depend on the machine's speed) and predicts the
breach; the display composes the screen. Used for the screenshots in docs/.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from guidance.core.geometry import invert_rigid
from guidance.live.display import NavigationState, compose_screen
from guidance.live.pipeline import Pipeline
from guidance.live.wire import Frame, InstrumentState, PoseResult, TrackerSample
from guidance.registration.register import Registrator

__all__ = ["reference_screens"]


def reference_screens(out_dir: str | Path, *, seed: int = 0, medial_deg: float = 8.0,
                      size: tuple[int, int] = (1280, 720)) -> list[Path]:
    """Write three PNG screens into ``out_dir``: the K-wire at the entry with the breach
    warning raised ahead (AP view), deeper in the pedicle (lateral view), and the same
    after the registration went stale (colours posterised to 16 levels per channel, so
    the files stay small). Returns the files written."""
    from sim.phantom import make_phantom
    from sim.scenario import Scenario, ScenarioPlayer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed=seed)
    pipeline = Pipeline(Registrator(phantom.ct, labels=phantom.labels), plan=phantom.plan, labels=phantom.labels,
                        ct=phantom.ct)
    shots = [("breach_warning_ap.png", 7.0, (0.0, 0.0), "ok"), ("breach_lateral.png", 13.0, (90.0, 0.0), "ok"),
             ("registration_stale.png", 13.0, (90.0, 0.0), "stale")]
    written = []
    for name, t_s, angles, status in shots:
        scenario = Scenario(detector_px=384, pixel_spacing_mm=0.8, fluoro_angles=angles, seed=seed,
                            instrument_medial_deg=medial_deg)
        player = ScenarioPlayer(scenario, phantom)
        frame = player.frame_at(t_s)
        # The registration as the pipeline would find it: the CT in the reference array's frame.
        T_tracker_from_world = frame.T_tracker_from_cam @ frame.T_cam_from_world
        pipeline.T_reference_from_world = invert_rigid(frame.tracker["reference"]) @ T_tracker_from_world
        pipeline.last_ok = True
        acquired_ns = int(t_s * 1e9)
        for tool_id in ("reference", "kwire"):
            messages = pipeline.on_tracker(TrackerSample(tool_id=tool_id, T_tracker_from_tool=frame.tracker[tool_id],
                                                         quality=0.2, acquired_ns=acquired_ns))
        (instrument,) = [m for m in messages if isinstance(m, InstrumentState)]
        now_s = 1000.0 + t_s
        state = NavigationState()
        state.on_frame(Frame(frame_id=frame.frame_id, acquired_ns=acquired_ns, view=frame.view, pixels=frame.pixels),
                       now_s)
        state.on_pose(PoseResult(frame_id=frame.frame_id, status="ok", reason="", confidence=0.93, mode="tracking",
                                 T_world_corrected_from_world=frame.T_world_corrected_from_world,
                                 level_poses={"L3": np.eye(4)}, latency_ms={"total": 60.0},
                                 frame_acquired_ns=0), now_s)
        state.on_instrument(instrument, now_s)
        shown_s = now_s + (0.1 if status == "ok" else 1.5)
        path = out / name
        screen = compose_screen(state, phantom.ct, phantom.plan, shown_s, size=size, labels=phantom.labels)
        # 16 levels per channel: the PNG shrinks about five times and still reads the same.
        if not cv2.imwrite(str(path), screen // 16 * 16 + 8, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"cannot write {path}")
        written.append(path)
    return written
