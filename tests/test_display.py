import logging

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.live.display import (
    DisplayError,
    RESLICE_FOV_MM,
    HeadlessWriter,
    NavigationState,
    WindowSink,
    compose_screen,
    reslice,
    screen_layout,
)
from guidance.core.geometry import make_rigid, project, rotation_about_axis, transform_points
from guidance.navigation.overlay import COLOURS
from guidance.core.views import carm_view
from guidance.core.volume import Volume
from guidance.live.wire import Frame, Heartbeat, InstrumentState, PoseResult, TargetPose

T0 = 1_700_000_000.0
VIEW = carm_view(detector_size_px=(128, 128), pixel_spacing_mm=(2.0, 2.0))
TIP_INDEX = (40, 30, 34)  # i, j, k: a voxel centre


def ct_volume() -> Volume:
    """64^3 at 2 mm of 0 HU, centred on the origin, a 2000 HU 10 mm cube at the tip."""
    T = np.diag([2.0, 2.0, 2.0, 1.0])
    T[:3, 3] = -63.0
    data = np.zeros((64, 64, 64), np.float32)
    i, j, k = TIP_INDEX
    data[k - 2: k + 3, j - 2: j + 3, i - 2: i + 3] = 2000.0
    return Volume(data, T, "HU")


CT = ct_volume()
TIP = CT.index_to_world(np.array(TIP_INDEX))[0]
AXIS = np.array([0.0, -1.0, 0.0])  # advancing anteriorly
# Planned 20 mm to the left of the instrument (so its markers stay off the pane centres).
PLAN = [{"level": "L3", "label": 29, "side": "left", "entry_world": (TIP + [20, 30, 0]).tolist(),
         "target_world": (TIP + [20, -20, 0]).tolist(), "screw_diameter_mm": 6.5}]


def frame(frame_id: int = 1) -> Frame:
    pixels = np.linspace(0.0, 3.0, 128 * 128, dtype=np.float32).reshape(128, 128)
    return Frame(frame_id=frame_id, acquired_ns=int(T0 * 1e9), view=VIEW, pixels=pixels)


def pose(status: str = "ok", T=None, acquired_s: float = T0, frame_id: int = 1,
         source: str = "pipeline") -> PoseResult:
    T = np.eye(4) if T is None and status == "ok" else T
    return PoseResult(frame_id=frame_id, status=status, reason="" if status == "ok" else "lost",
                      T_world_corrected_from_world=T, confidence=0.9, mode="tracking",
                      latency_ms={"total": 40.0}, level_poses={"L3": np.eye(4)},
                      frame_acquired_ns=int(acquired_s * 1e9), source=source)


def instrument(status: str = "ok", acquired_s: float = 0.0) -> InstrumentState:
    return InstrumentState(frame_id=1, tool_id="kwire", tip_world=TIP, axis_world=AXIS,
                           status=status, plan_level="L3", plan_side="left", source="pipeline",
                           acquired_ns=int(acquired_s * 1e9))


def live_state(pose_status: str = "ok") -> NavigationState:
    state = NavigationState()
    state.on_frame(frame(), T0)
    state.on_pose(pose(pose_status), T0 + 0.05)
    state.on_instrument(instrument(), T0 + 0.05)
    return state


def test_status_waiting_ok_stale_invalid():
    state = NavigationState()
    assert state.status(T0) == "waiting"
    state.on_pose(pose(), T0)
    assert state.status(T0 + 0.3) == "ok"
    assert state.status(T0 + 0.5) == "ok"
    assert state.status(T0 + 0.51) == "stale"
    state.on_pose(pose("failed", acquired_s=T0 + 1.0), T0 + 1.0)
    assert state.status(T0 + 1.1) == "invalid"
    assert state.status(T0 + 2.0) == "stale"
    state.on_pose(pose(acquired_s=T0 + 2.0), T0 + 2.0)
    assert state.status(T0 + 2.1) == "ok"


def test_stale_by_data_age_not_arrival():
    """A pose that arrives now but was computed from a frame acquired 0.6 s ago (a slow
    registration, or a replay) is stale on arrival; a fresh one is ok; a pose from the future
    (clock error or forgery) is not current either."""
    state = NavigationState()
    state.on_pose(pose(acquired_s=T0 - 0.6), T0)
    assert state.status(T0) == "stale" and state.data_age_s(T0) == pytest.approx(0.6)
    state.on_pose(pose(acquired_s=T0 - 0.1), T0)
    assert state.status(T0) == "ok"
    assert state.status(T0 + 0.41) == "stale"  # the data behind it is now 0.51 s old
    state.on_pose(pose(acquired_s=T0 + 5.0), T0)
    assert state.status(T0) == "stale"


def test_only_the_expected_publisher_is_believed():
    state = NavigationState(expected_source="pipeline")
    assert not state.on_pose(pose(source="intruder"), T0)
    assert state.status(T0) == "waiting" and state.ignored == 1
    assert state.on_pose(pose(), T0)
    fake_instrument = InstrumentState(frame_id=1, tool_id="kwire", tip_world=TIP, axis_world=AXIS, status="ok",
                                      source="intruder")
    assert not state.on_instrument(fake_instrument, T0)
    assert state.instrument is None and state.ignored == 2


def test_heartbeat_watch_and_no_frames_and_fps_decay():
    state = NavigationState()
    assert state.pipeline_text(T0) == "pipeline: no heartbeat"
    state.on_heartbeat(Heartbeat(role="pipeline", state="registering", source="pipeline"), T0)
    assert state.pipeline_alive(T0 + 1.0) and state.pipeline_text(T0 + 1.0) == "pipeline: registering"
    assert not state.pipeline_alive(T0 + 2.0) and state.pipeline_text(T0 + 2.0) == "PIPELINE LOST 2.0 s"
    assert state.no_frames(T0)
    for n in range(31):
        state.on_frame(frame(n), T0 + n / 15)
    now = T0 + 2.0
    assert state.fps(now) == pytest.approx(15.0, abs=0.6) and not state.no_frames(now)
    assert state.fps(now + 1.0) == pytest.approx(7.5, abs=0.6)  # frames stopped: the rate decays
    assert state.fps(now + 2.1) == 0.0 and state.no_frames(now + 2.1)
    screen = compose_screen(state, CT, PLAN, now + 2.1, size=(640, 360))
    assert screen.shape == (360, 640, 3)


def test_pose_drawn_only_over_its_own_frame():
    state = NavigationState()
    state.on_frame(frame(1), T0)
    state.on_pose(pose(T=make_rigid(np.eye(3), [3.0, 0, 0])), T0 + 0.05)
    state.on_frame(frame(2), T0 + 0.07)  # a newer frame arrives before its pose
    assert state.pose_frame().frame_id == 1
    assert state.registered_view() is not None
    state.on_pose(pose(frame_id=99), T0 + 0.08)  # the pose's frame never arrived here
    assert state.pose_frame() is None and state.registered_view() is None
    layout = screen_layout((1280, 720))
    screen = compose_screen(state, CT, PLAN, T0 + 0.1)
    assert count_colour(pane(screen, layout, "fluoro"), COLOURS["left"]) == 0  # no overlay


def test_stale_after_is_configurable():
    state = NavigationState(stale_after_s=0.2)
    state.on_pose(pose(), T0)
    assert state.status(T0 + 0.25) == "stale"
    with pytest.raises(DisplayError):
        NavigationState(stale_after_s=0)


def test_instrument_visible_only_with_current_ok_pose_and_fresh_state():
    state = live_state()
    assert state.visible_instrument(T0 + 0.1) is not None
    assert state.visible_instrument(T0 + 0.6) is None  # pose and instrument stale
    state.on_pose(pose(acquired_s=T0 + 0.6), T0 + 0.6)
    assert state.visible_instrument(T0 + 0.61) is None  # instrument stale alone
    state.on_instrument(instrument("not_tracked"), T0 + 0.6)
    assert state.visible_instrument(T0 + 0.61) is None
    state.on_instrument(instrument(acquired_s=T0 - 0.5), T0 + 0.6)  # arrived now, acquired long ago
    assert state.visible_instrument(T0 + 0.61) is None
    state.on_instrument(instrument(acquired_s=T0 + 0.55), T0 + 0.6)
    assert state.visible_instrument(T0 + 0.61) is not None
    state.on_pose(pose("failed", acquired_s=T0 + 0.6), T0 + 0.62)
    assert state.visible_instrument(T0 + 0.63) is None


def test_fps_and_latency():
    state = NavigationState()
    assert state.fps() is None
    for n in range(11):
        state.on_frame(frame(n), T0 + 0.1 * n)
    assert state.fps() == pytest.approx(10.0)
    state.on_pose(pose(), T0 + 0.07)
    assert state.pose.latency_ms == pytest.approx(40.0)
    assert state.pose.end_to_end_ms == pytest.approx(70.0, abs=1e-3)


def test_registered_view_applies_the_ct_correction():
    T_corr = make_rigid(rotation_about_axis([0, 0, 1], 3.0), [4.0, -2.0, 1.0])
    state = NavigationState()
    state.on_frame(frame(), T0)
    assert state.registered_view() is None
    state.on_pose(pose("ok", T_corr), T0)
    view = state.registered_view()
    X = np.array([[10.0, 20.0, -5.0]])
    # The corrected CT point seen in the registered view = the point seen by the C-arm.
    assert_allclose(project(view.P, transform_points(T_corr, X)), project(VIEW.P, X), atol=1e-9)


@pytest.mark.parametrize("orientation, direction, screen", [
    ("axial", [1, 0, 0], (1, 0)),      # patient's left -> screen right
    ("axial", [0, -1, 0], (0, -1)),    # anterior -> up
    ("sagittal", [0, -1, 0], (-1, 0)),  # anterior -> left
    ("sagittal", [0, 0, 1], (0, -1)),  # head -> up
    ("coronal", [1, 0, 0], (1, 0)),    # patient's left -> screen right
    ("coronal", [0, 0, 1], (0, -1)),   # head -> up
])
def test_reslice_display_orientation(orientation, direction, screen):
    centre = CT.center_world()
    image, P = reslice(CT, TIP - 8.0 * np.asarray(direction), orientation, (61, 41), 0.5)
    u, v = project(P, TIP[None])[0]
    assert_allclose(project(P, (TIP - 8.0 * np.asarray(direction))[None])[0], [30, 20])
    assert_allclose(np.hypot(u - 30, v - 20), 16.0)  # 8 mm at 0.5 mm per pixel
    assert np.sign(u - 30) == screen[0] and np.sign(v - 20) == screen[1]
    assert image[int(round(v)), int(round(u))] == pytest.approx(2000.0)
    assert image[20, 30] == pytest.approx(0.0)
    _, P_centre = reslice(CT, centre, orientation, (61, 41), 0.5)
    assert_allclose(project(P_centre, centre[None])[0], [30, 20], atol=1e-9)


def pane(screen: np.ndarray, layout: dict, name: str) -> np.ndarray:
    x, y, w, h = layout[name]
    return screen[y: y + h, x: x + w]


@pytest.mark.parametrize("size", [(1280, 720), (800, 480)])
def test_compose_screen_size_and_reslices_centred_on_tip(size):
    screen = compose_screen(live_state(), CT, PLAN, T0 + 0.1, size=size)
    assert screen.shape == (size[1], size[0], 3) and screen.dtype == np.uint8
    layout = screen_layout(size)
    for name in ("axial", "sagittal"):
        p = pane(screen, layout, name)
        h, w = p.shape[:2]
        mm_per_px = RESLICE_FOV_MM / min(w, h)
        cu, cv = (w - 1) / 2, (h - 1) / 2
        near = int(round(2.5 / mm_per_px))  # inside the 10 mm marker block
        far = int(round(9.0 / mm_per_px))   # outside it
        for du, dv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            inside = p[int(round(cv + dv * near)), int(round(cu + du * near))]
            outside = p[int(round(cv + dv * far)), int(round(cu + du * far))]
            assert inside.min() > 240, (name, du, dv)  # 2000 HU: white in the bone window
            assert abs(int(outside[0]) - 85) < 10, (name, du, dv)  # 0 HU: dark grey


def test_fluoro_overlay_uses_the_registered_view_at_pane_scale():
    T_corr = make_rigid(rotation_about_axis([0, 0, 1], 2.0), [6.0, 0.0, -3.0])
    state = live_state()
    state.on_pose(pose("ok", T_corr), T0 + 0.05)
    screen = compose_screen(state, CT, PLAN, T0 + 0.1)
    x, y, w, h = screen_layout((1280, 720))["fluoro"]
    view = state.registered_view().downsampled(128 / min(w, h))
    ox, oy = (w - view.width) // 2, (h - view.height) // 2
    for key in ("entry_world", "target_world"):
        u, v = project(view.P, np.array([PLAN[0][key]]))[0]
        u_plain, _ = project(VIEW.downsampled(128 / min(w, h)).P, np.array([PLAN[0][key]]))[0]
        assert abs(u - u_plain) > 5  # the correction moves the overlay visibly
        got = screen[y + oy + int(round(v)), x + ox + int(round(u))]
        assert_allclose(got, COLOURS["left"], atol=40)


def count_colour(img: np.ndarray, colour) -> int:
    return int(np.count_nonzero(np.all(img == np.array(colour, np.uint8), axis=2)))


def test_stale_screen_hides_instrument_and_pose_overlays():
    state = live_state()
    layout = screen_layout((1280, 720))
    ok = compose_screen(state, CT, PLAN, T0 + 0.1)
    assert count_colour(ok, COLOURS["shaft"]) > 50
    assert count_colour(pane(ok, layout, "fluoro"), COLOURS["left"]) > 5
    stale = compose_screen(state, CT, PLAN, T0 + 0.7)
    assert count_colour(stale, COLOURS["shaft"]) == 0
    assert count_colour(pane(stale, layout, "fluoro"), COLOURS["left"]) == 0
    assert count_colour(stale, COLOURS["stale"]) > 1000  # status box and frame
    # The state is said in the status bar and a frame, not written over the CT panes.
    for name in ("axial", "sagittal"):
        inner = pane(stale, layout, name)[40:-40, 40:-40]
        assert count_colour(inner, COLOURS["stale"]) == 0
    assert pane(stale, layout, "fluoro").mean() < pane(ok, layout, "fluoro").mean()  # dimmed
    invalid = compose_screen(live_state("failed"), CT, PLAN, T0 + 0.1)
    assert count_colour(invalid, COLOURS["shaft"]) == 0
    assert count_colour(invalid, COLOURS["invalid"]) > 1000


def test_compose_screen_waiting_without_frame_and_with_labels():
    screen = compose_screen(NavigationState(), CT, None, T0)
    assert screen.shape == (720, 1280, 3)
    labels = CT.with_data((CT.data > 1000).astype(np.uint8) * 29, units="label")
    screen = compose_screen(live_state(), CT, PLAN, T0 + 0.1, labels=labels)
    assert count_colour(pane(screen, screen_layout((1280, 720)), "fluoro"),
                        COLOURS["outline"]) > 10


def test_compose_screen_rejects_bad_input():
    with pytest.raises(DisplayError, match="HU"):
        compose_screen(NavigationState(), CT.with_data(CT.data, units="mu_per_mm"), None, T0)
    with pytest.raises(DisplayError, match="at least"):
        compose_screen(NavigationState(), CT, None, T0, size=(100, 100))


def test_headless_writer_writes_every_nth_png(tmp_path):
    writer = HeadlessWriter(tmp_path / "screens", every_n=2)
    screens = [np.full((24, 32, 3), n * 40, np.uint8) for n in range(4)]
    written = [writer.show(s) for s in screens]
    assert [p.name if p else None for p in written] == \
        ["screen_000000.png", None, "screen_000002.png", None]
    assert_allclose(cv2.imread(str(written[2])), screens[2])
    with pytest.raises(DisplayError):
        HeadlessWriter(tmp_path, every_n=0)


def test_window_sink_falls_back_to_png_without_display(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("DISPLAY", raising=False)
    with caplog.at_level(logging.WARNING, logger="guidance.live.display"):
        sink = WindowSink(fallback_dir=tmp_path)
    assert "no DISPLAY" in caplog.text
    sink.show(np.zeros((24, 32, 3), np.uint8))
    sink.close()
    assert (tmp_path / "screen_000000.png").is_file()
    assert not sink.quit_requested


def test_screen_shows_breach_warning_guide_and_fluoro_legend():
    state = live_state()
    state.on_instrument(InstrumentState(
        frame_id=1, tool_id="kwire", tip_world=TIP, axis_world=AXIS, status="ok", plan_level="L3",
        plan_side="left", to_target_along_plan_mm=20.0, breach_mm=2.5, breach_grade="C", breach_side="medial",
        breach_warning=True, clearance_mm=-2.5, travel_to_breach_mm=6.0), T0 + 0.05)
    state.on_target(TargetPose(level="L3", side="left", approach="posterior", T_tracker_from_target=np.eye(4),
                               length_mm=50.0, guide_tool_id="aiming_guide", guide_entry_error_mm=0.4,
                               guide_angle_error_deg=0.3, guide_aligned=True), T0 + 0.05)
    assert state.instrument.metrics["breach_side"] == "medial" and state.guide.aligned
    screen = compose_screen(state, CT, PLAN, T0 + 0.1)
    layout = screen_layout((1280, 720))
    assert set(layout) == {"status", "fluoro", "axial", "sagittal", "trajectory", "numbers"}
    numbers = pane(screen, layout, "numbers")
    assert count_colour(numbers, COLOURS["invalid"]) > 3000  # the red breach banner
    assert count_colour(numbers, COLOURS["ok"]) > 30  # "ALIGNED"
    trajectory = pane(screen, layout, "trajectory")
    assert count_colour(trajectory, COLOURS["invalid"]) > 30  # the screw outline ahead, in red
    th, tw = trajectory.shape[:2]
    size = int(min(tw, th) * 0.42)
    probe_eye = trajectory[th - size - 6: th - 6, 6: 6 + size]
    assert count_colour(probe_eye, COLOURS["invalid"]) > 20  # the screw's cross-section, in red
    fluoro = pane(screen, layout, "fluoro")
    h = fluoro.shape[0]
    corner = fluoro[h - 120:, :260]  # the legend
    for colour in (COLOURS["left"], COLOURS["shaft"], COLOURS["extension"]):
        assert count_colour(corner, colour) > 20
    # Without breach fields the banner is grey (no prediction), not red.
    plain = pane(compose_screen(live_state(), CT, PLAN, T0 + 0.1), layout, "numbers")
    assert count_colour(plain[40:91], COLOURS["invalid"]) == 0
    assert count_colour(plain[40:91], COLOURS["waiting"]) > 3000


def test_status_line_shows_the_pose_uncertainty():
    from dataclasses import replace

    from guidance.live.display import _status_lines

    state = NavigationState()
    state.on_pose(replace(pose(), uncertainty_in_plane_mm=0.31, uncertainty_depth_mm=2.4), T0)
    assert state.pose.uncertainty_mm == (0.31, 2.4)
    line = _status_lines(state, "ok", T0 + 0.1, None, None, "")[0]
    assert "+-0.3 mm in-plane, +-2.4 mm depth" in line
    state.on_pose(pose(), T0 + 0.2)
    assert "in-plane" not in _status_lines(state, "ok", T0 + 0.3, None, None, "")[0]


def test_an_instrument_found_in_the_image_is_labelled_so():
    """An image-derived instrument (no tracker) is kept as such, and its banner says where
    it comes from instead of asking for the CT and labels."""
    from guidance.live.display import _banner

    state = live_state()
    state.on_instrument(InstrumentState(frame_id=1, tool_id="kwire", tip_world=TIP, axis_world=AXIS, status="ok",
                                        image_derived=True), T0 + 0.05)
    assert state.instrument.image_derived
    assert _banner(state.instrument.metrics, state.instrument.image_derived)[0] == "Found in the X-ray (no tracker)"
    assert "unknown" in _banner(state.instrument.metrics, True)[1]
    assert _banner({}, False)[0] == "No breach prediction"
    # Its depth sigma along the view is kept and said (one view: tens of mm; two views: about one).
    state.on_instrument(InstrumentState(frame_id=2, tool_id="kwire", tip_world=TIP, axis_world=AXIS, status="ok",
                                        image_derived=True, uncertainty_depth_mm=12.5), T0 + 0.1)
    assert state.instrument.metrics["uncertainty_depth_mm"] == 12.5
    assert "depth +/-12.5 mm (1 sigma)" in _banner(state.instrument.metrics, True)[1]
