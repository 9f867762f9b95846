"""guidance.tools.demo: the image-derived instrument's score, and a short demo without a tracker."""

import time
from dataclasses import replace

import numpy as np
import pytest

from guidance.core.geometry import invert_rigid, make_rigid
from guidance.core.instrument_models import get_instrument
from guidance.core.views import carm_view
from guidance.live.wire import Frame, InstrumentState
from guidance.navigation.instruments import tip_and_axis
from guidance.tools.demo import DemoReport, _score_instrument, run_demo


def _frame_with_tool(T_world_from_tool: np.ndarray) -> Frame:
    view = carm_view(detector_size_px=(32, 32), intensity="raw", I0=4095.0)
    return Frame(frame_id=7, acquired_ns=time.time_ns(), view=view, pixels=np.zeros((32, 32), np.uint16),
                 ground_truth={"T_cam_from_world": view.T_cam_from_world, "T_world_from_tool": T_world_from_tool})


@pytest.mark.parametrize("along_ray_mm, across_mm, tilt_deg", [(0.0, 0.0, 0.0), (12.0, 0.0, 0.0),
                                                               (0.0, 1.5, 0.0), (-5.0, 2.0, 7.0)])
def test_instrument_score_splits_depth_from_in_plane(along_ray_mm, across_mm, tilt_deg):
    """An estimate moved along the viewing ray of the true tip has only a depth error; one
    moved across it an in-plane error of that size (to first order); the axis error is the
    angle between the axes."""
    T_world_from_tool = make_rigid(np.eye(3), [5.0, 20.0, -10.0])
    frame = _frame_with_tool(T_world_from_tool)
    tip, axis = tip_and_axis(T_world_from_tool, get_instrument("kwire"))
    source = invert_rigid(frame.view.T_cam_from_world)[:3, 3]
    ray = (tip - source) / np.linalg.norm(tip - source)
    across = np.cross(ray, [0.0, 0.0, 1.0])
    across /= np.linalg.norm(across)
    turn = np.radians(tilt_deg)
    other = np.cross(axis, across)
    estimate_axis = np.cos(turn) * axis + np.sin(turn) * other / np.linalg.norm(other)
    estimate = tip + along_ray_mm * ray + across_mm * across
    state = InstrumentState(frame_id=7, tool_id="kwire", tip_world=estimate, axis_world=estimate_axis, status="ok",
                            image_derived=True)
    row = _score_instrument(state, frame)
    assert row["tip_error_mm"] == pytest.approx(np.hypot(along_ray_mm, across_mm), abs=1e-9)
    assert row["in_plane_mm"] == pytest.approx(across_mm, rel=2e-2, abs=1e-9)
    assert row["axis_error_deg"] == pytest.approx(tilt_deg, abs=1e-6)
    assert row["within_3_sigma"] is None  # no uncertainty published
    published = replace(state, uncertainty_in_plane_mm=1.0, uncertainty_depth_mm=2.0)
    assert _score_instrument(published, frame)["within_3_sigma"] == (row["tip_error_mm"] <= 3.0 * np.sqrt(5.0))
    without_tool = Frame(frame_id=7, acquired_ns=1, view=frame.view, pixels=frame.pixels,
                         ground_truth={"T_cam_from_world": frame.view.T_cam_from_world})
    assert _score_instrument(state, without_tool) is None


def test_an_instrument_where_every_shot_saw_it_is_scored_at_rest():
    """``at_rest``: the frame's true tool pose equals that of each lead shot (None without
    shots); the summary's at-rest rows are those, its "moved" rate the others."""
    T_world_from_tool = make_rigid(np.eye(3), [5.0, 20.0, -10.0])
    moved = make_rigid(np.eye(3), [5.0, 19.0, -10.0])
    frame, shot, earlier = (_frame_with_tool(T) for T in (T_world_from_tool, T_world_from_tool, moved))
    tip, axis = tip_and_axis(T_world_from_tool, get_instrument("kwire"))
    state = InstrumentState(frame_id=7, tool_id="kwire", tip_world=tip + [0.0, 0.0, 0.5], axis_world=axis,
                            status="ok", image_derived=True, uncertainty_in_plane_mm=0.1, uncertainty_depth_mm=0.1)
    assert _score_instrument(state, frame)["at_rest"] is None
    assert _score_instrument(state, frame, [shot, shot])["at_rest"] is True
    assert _score_instrument(state, frame, [shot, earlier])["at_rest"] is False
    report = DemoReport(instrument_rows=[_score_instrument(state, frame, [shot]),
                                         _score_instrument(state, frame, [earlier])])
    summary = report.summary()
    assert summary["image_states_at_rest"] == 1
    assert summary["image_tip_error_at_rest_median_mm"] == pytest.approx(0.5)
    assert summary["image_tip_within_3_sigma_moved"] == 0.0  # 0.5 mm against 3 x 0.14 mm


@pytest.mark.slow
def test_demo_without_a_tracker_finds_the_kwire_in_the_images(tmp_path):
    """Fluoroscopy alone, AP, 8 s at 2 fps (at 0.6 x real time, so a loaded machine still
    registers in time): the pipeline publishes image-derived K-wire states and the demo
    scores them against the simulator's tool pose (in-plane within 2 mm; the
    depth of one view comes from the anatomy and is only reported)."""
    report = run_demo(tmp_path, duration_s=8.0, fps=2.0, with_display=False, record=False, print_rows=False,
                      lead_shots=(), plain=True, tracked=False, medial_deg=8.0, speed=0.6)
    summary = report.summary()
    assert summary["ok"] >= 1
    assert summary["image_instrument_states"] >= 1
    assert summary["image_tip_in_plane_median_mm"] < 2.0
    assert np.isfinite(summary["image_tip_error_median_mm"])
