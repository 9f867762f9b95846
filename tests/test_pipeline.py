"""Live pipeline: registration then tracking on a frame stream, bad input rejected while
the next good frame is served, restarts survived, display states, record and replay."""

import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import zmq

from guidance.live.display import HeadlessWriter
from guidance.live.display_client import run_display
from guidance.core.geometry import invert_rigid, make_rigid, rotation_about_axis, transform_points
from guidance.core.errors import GuidanceError
from guidance.live.pipeline import Pipeline, PipelineSettings, TrackerHistory
from guidance.live.serve import run_pipeline
from guidance.live.recording import QUARANTINE_FILE, read_recording, read_segment
from guidance.registration.register import Registrator
from guidance.live.transport import Publisher, Subscriber, free_tcp_endpoint
from guidance.core.views import carm_view, view_to_dict
from guidance.live.wire import Frame, PoseResult, TrackerSample, decode, encode
from sim.xray import XrayParams, simulate_xray


def motion(centre, angle_deg, shift):
    R = rotation_about_axis([0.2, 1.0, 0.3], angle_deg)
    return make_rigid(R, centre + np.asarray(shift, float) - R @ centre)


@pytest.fixture(scope="module")
def frames(phantom, registrator):
    """Four raw 192 px frames of an anatomy misplaced by ~7 mm, then breathing 1 mm."""
    centre = registrator.centre(None)
    nominal = carm_view(isocenter_world=centre, patient_position="prone", detector_size_px=(192, 192),
                        pixel_spacing_mm=(1.6, 1.6))
    out = []
    for i, (angle, shift) in enumerate([(3.0, (4, -4, 3)), (3.0, (4, -3, 3)), (3.2, (4, -3.5, 3.4)),
                                        (3.0, (4.3, -4, 3))]):
        M = motion(centre, angle, shift)
        actual = nominal.with_pose(nominal.T_cam_from_world @ M)
        image, view = simulate_xray(phantom.ct, actual, XrayParams(seed=i), intensity="raw")
        out.append(Frame(frame_id=i + 1, acquired_ns=time.time_ns(), view=nominal.with_intensity("raw", 4095.0),
                         pixels=image, ground_truth={"T_cam_from_world": actual.T_cam_from_world,
                                                     "T_world_corrected_from_world": invert_rigid(M)},
                         source="test"))
    return out


def pose_error_mm(pose: PoseResult, frame: Frame, centre) -> float:
    est = pose.views[0]["T_cam_from_world"]
    return float(np.linalg.norm(transform_points(est, centre) - transform_points(frame.ground_truth["T_cam_from_world"],
                                                                                 centre)))


def projection_error_px(pose: PoseResult, frame: Frame, centre) -> float:
    from guidance.core.geometry import project

    est = frame.view.with_pose(pose.views[0]["T_cam_from_world"])
    gt = frame.view.with_pose(frame.ground_truth["T_cam_from_world"])
    return float(np.linalg.norm(project(est.P, centre[None]) - project(gt.P, centre[None])))


def test_global_then_tracking(registrator, frames, phantom):
    pipeline = Pipeline(registrator, plan=phantom.plan)
    centre = registrator.centre(None)
    modes = []
    for frame in frames:
        (pose,) = pipeline.on_frame(frame)
        assert pose.status == "ok", pose.reason
        # One view: sub-pixel across the image, depth (along the ray) within a few mm.
        assert projection_error_px(pose, frame, centre) < 1.0
        assert pose_error_mm(pose, frame, centre) < 4.0
        assert set(pose.latency_ms) >= {"queue", "preprocess", "registration", "total"}
        modes.append(pose.mode)
    assert modes[0] == "global" and modes[1:].count("tracking") >= 2
    assert pipeline.stats.frames_processed == 4 and pipeline.stats.global_registrations >= 1


def test_instrument_mapped_into_ct(registrator, frames, phantom):
    """Tracker calibrated to the C-arm: the tool's CT pose comes out where it really is."""
    pipeline = Pipeline(registrator, plan=phantom.plan)
    frame = frames[0]
    T_tracker_from_cam = make_rigid(rotation_about_axis([1, 0, 0], 90.0), [100.0, -50.0, 1500.0])
    actual = frame.ground_truth["T_cam_from_world"]
    T_world_from_reference = make_rigid(np.eye(3), registrator.centre(None) + [0, 80, 0])
    traj = phantom.plan[4]
    entry, target = np.array(traj["entry_world"]), np.array(traj["target_world"])
    direction = (target - entry) / np.linalg.norm(target - entry)
    # Tool frame: tip at the origin, axis_tool (tip -> handle) along +z, per guidance.navigation.instruments.
    from guidance.core.instrument_models import INSTRUMENTS

    model = INSTRUMENTS["kwire"]
    z = -direction
    x = np.cross([0, 0, 1.0], z)
    x /= np.linalg.norm(x)
    R_world_from_tool = np.column_stack([x, np.cross(z, x), z]) @ _align(model.axis_tool)
    tip_world = entry + 10.0 * direction
    T_world_from_tool = make_rigid(R_world_from_tool, tip_world - R_world_from_tool @ model.tip_offset_tool)

    def sample(tool, T_world_from_x, acquired_ns=frame.acquired_ns):
        return TrackerSample(tool_id=tool, T_tracker_from_tool=T_tracker_from_cam @ actual @ T_world_from_x,
                             quality=0.1, acquired_ns=acquired_ns)

    pipeline.on_tracker(TrackerSample(tool_id="carm", T_tracker_from_tool=T_tracker_from_cam, quality=0.0,
                                      acquired_ns=frame.acquired_ns))
    pipeline.on_tracker(sample("reference", T_world_from_reference))
    assert pipeline.on_tracker(sample("kwire", T_world_from_tool)) == []  # not registered yet
    (pose,) = pipeline.on_frame(frame)
    assert pose.status == "ok"
    (state,) = pipeline.on_tracker(sample("kwire", T_world_from_tool))
    assert state.status == "ok"
    assert state.plan_level == traj["level"] and state.plan_side == traj["side"]
    # The registration error (mostly depth along the AP ray) is the only error left.
    assert np.linalg.norm(state.tip_world - tip_world) < 4.0
    assert state.angle_to_trajectory_deg < 2.0
    assert state.depth_along_trajectory_mm == pytest.approx(10.0, abs=4.0)
    assert state.acquired_ns == frame.acquired_ns
    # Pairing by acquisition time: a reading 15 ms after the last reference sample pairs with
    # it; one 30 ms after it (beyond the 20 ms tolerance) is not tracked rather than paired
    # with that old reference, until a reference sample acquired with it arrives.
    later = frame.acquired_ns + 15_000_000
    (state,) = pipeline.on_tracker(sample("kwire", T_world_from_tool, later))
    assert state.status == "ok" and state.acquired_ns == later
    too_late = frame.acquired_ns + 30_000_000
    (state,) = pipeline.on_tracker(sample("kwire", T_world_from_tool, too_late))
    assert state.status == "not_tracked" and state.tip_world is None
    assert pipeline.stats.instruments_not_tracked == 1
    moved = make_rigid(np.eye(3), [0.0, 0.0, 5.0])  # the patient (and reference) moved 5 mm
    out = pipeline.on_tracker_samples([sample("reference", moved @ T_world_from_reference, too_late),
                                       sample("kwire", moved @ T_world_from_tool, too_late)])
    (state,) = [m for m in out if m.kind == "instrument_state"]  # the reference also brings the target poses
    assert state.status == "ok" and np.linalg.norm(state.tip_world - tip_world) < 4.0
    # The instrument's own reference pose (acquired with it) wins over any separate sample.
    own = TrackerSample(tool_id="kwire", T_tracker_from_tool=T_tracker_from_cam @ actual @ T_world_from_tool,
                        T_tracker_from_reference=T_tracker_from_cam @ actual @ T_world_from_reference,
                        quality=0.1, acquired_ns=frame.acquired_ns + 10**9)
    (state,) = pipeline.on_tracker(own)
    assert state.status == "ok" and np.linalg.norm(state.tip_world - tip_world) < 4.0


def test_tracker_history_pairs_nearest_in_time_and_stays_bounded():
    history = TrackerHistory(keep_s=1.0, max_per_tool=100)

    def s(tool, t_ms):
        return TrackerSample(tool_id=tool, T_tracker_from_tool=np.eye(4), quality=0.0, acquired_ns=int(t_ms * 1e6))

    for t in (0, 10, 20, 30):
        history.add(s("reference", t))
    assert history.nearest("reference", 14_000_000, 5_000_000).acquired_ns == 10_000_000
    assert history.nearest("reference", 16_000_000, 5_000_000).acquired_ns == 20_000_000
    assert history.nearest("reference", 40_000_000, 5_000_000) is None  # newest is 10 ms away
    assert history.nearest("carm", 0, 10**9) is None
    for t in range(1000):
        history.add(s("reference", 100 + t * 5))
    assert history.nearest("reference", 0, 10**10).acquired_ns >= 100_000_000 + 799 * 5_000_000  # 1 s kept
    assert len(history._samples["reference"]) <= 100
    for i in range(100):
        history.add(s(f"tool{i}", 0))
    assert len(history.latest_per_tool()) == 64


def _align(axis_tool):
    """Rotation taking the model's axis_tool onto +z (so the tool frame matches the model)."""
    a = np.asarray(axis_tool, float) / np.linalg.norm(axis_tool)
    v = np.cross(a, [0, 0, 1.0])
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if a[2] > 0 else np.diag([1.0, -1.0, -1.0])
    angle = np.degrees(np.arccos(np.clip(a[2], -1, 1)))
    return rotation_about_axis(v, angle).T


class Loop:
    """run_pipeline in a thread on free loopback ports, with a frame publisher and a
    result subscriber for the test."""

    def __init__(self, registrator, plan, record_dir=None, frame_endpoint=None, result_endpoint=None):
        self.frame_endpoint = frame_endpoint or free_tcp_endpoint()
        self.result_endpoint = result_endpoint or free_tcp_endpoint()
        self.registrator, self.plan, self.record_dir = registrator, plan, record_dir
        self.stop = threading.Event()
        self.thread = None

    def start(self):
        self.stop.clear()
        pipeline = Pipeline(self.registrator, plan=self.plan)
        self.thread = threading.Thread(target=run_pipeline, args=(pipeline,), kwargs=dict(
            frame_endpoints=[self.frame_endpoint], result_endpoint=self.result_endpoint, stop=self.stop,
            record_dir=self.record_dir, heartbeat_s=0.2), daemon=True)
        self.thread.start()
        return pipeline

    def halt(self):
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


WAIT_S = 180.0
"""Longest wait for a result: a first global registration takes seconds on an idle machine,
minutes on a loaded one; waits end as soon as the result arrives."""


def wait_for(sub, predicate, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = sub.recv(0.2)
        if msg is not None and predicate(msg):
            return msg
    raise AssertionError("message did not arrive in time")


def send_until(pub, frame, sub, predicate, timeout_s=WAIT_S):
    """Publish ``frame`` (again every 0.5 s, slow joiners miss the first) until a match."""
    return resend_until(lambda: pub.send(frame), sub, predicate, timeout_s)


def resend_until(send, sub, predicate, timeout_s=WAIT_S):
    """Call ``send()`` (again every 0.5 s) until ``sub`` receives a match."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        send()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            msg = sub.recv(0.1)
            if msg is not None and predicate(msg):
                return msg
    raise AssertionError("no matching result")


def is_pose_for(frame_id):
    return lambda m: isinstance(m, PoseResult) and m.frame_id == frame_id


def test_malformed_input_is_rejected_and_the_next_good_frame_served(tmp_path, registrator, frames, phantom):
    loop = Loop(registrator, phantom.plan, record_dir=tmp_path / "rec")
    pipeline = loop.start()
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    raw.bind(loop.frame_endpoint)
    results = Subscriber(loop.result_endpoint)
    try:
        good = encode(frames[0])
        header = json.loads(good[0])
        bad_version = json.dumps(header | {"version": 99}).encode()
        wrong_dtype = json.loads(good[0])
        wrong_dtype["buffers"][0]["dtype"] = "float64"
        nan_frame = encode(Frame(frame_id=7, acquired_ns=1, view=frames[0].view,
                                 pixels=np.zeros((192, 192), np.float32)))
        nan_pixels = np.frombuffer(nan_frame[1], np.float32).copy()
        nan_pixels[5] = np.nan
        malformed = [
            [b"frame", good[0]],  # short multipart
            [b"frame", json.dumps(wrong_dtype).encode(), good[1]],  # wrong dtype
            [b"frame", good[0], good[1][:-8]],  # wrong shape / size
            [b"frame", nan_frame[0], nan_pixels.tobytes()],  # NaN pixels (and CRC)
            [b"frame", bad_version, good[1]],  # unknown schema version
            [b"frame", b"\x00\xffgarbage", b"\x01"],  # garbage bytes
        ]
        # Wrong geometry: a view that looks away from the CT decodes fine but is rejected.
        away = frames[0].view.with_pose(frames[0].view.T_cam_from_world @ make_rigid(np.eye(3), [500.0, 0, 0]))
        wrong_geometry = Frame(frame_id=50, acquired_ns=time.time_ns(), view=away, pixels=frames[0].pixels)

        # A good frame first: once it is served the connection is up, so nothing sent after
        # it is lost to the slow-joiner window (which once swallowed the malformed batch).
        def send_fresh():
            raw.send_multipart([b"frame", *encode(replace(frames[0], stamp_ns=time.time_ns()))])

        assert resend_until(send_fresh, results, is_pose_for(1)).status == "ok"
        for parts in malformed:
            raw.send_multipart(parts)
        now_ns = time.time_ns()
        raw.send_multipart([b"frame", *encode(replace(wrong_geometry, stamp_ns=now_ns, acquired_ns=now_ns))])
        seen_geometry = wait_for(results, is_pose_for(50))
        assert seen_geometry.status == "failed"
        assert "wrong geometry" in seen_geometry.reason
        beat = wait_for(results, lambda m: m.kind == "heartbeat" and m.stats["malformed"] >= 6)
        pose = resend_until(send_fresh, results, is_pose_for(1))
        assert pose.status == "ok"
        assert beat.stats["frames_rejected"] >= 1
    finally:
        raw.close(linger=0)
        results.close()
        loop.halt()
    assert pipeline.stats.frames_rejected >= 1
    # Only valid messages are recorded; the refused ones, with their reasons, are quarantined.
    for direction, _, parts in read_recording(tmp_path / "rec"):
        decode(parts)
    reasons = [parts[0].decode() for _, _, parts in read_segment(tmp_path / "rec" / QUARANTINE_FILE)]
    assert len(reasons) >= 6 and any("unsupported version 99" in r for r in reasons)


def test_a_setup_error_is_not_reported_as_a_bad_frame(phantom, frames):
    """A pipeline asked for one vertebra without a label map is misconfigured: the error
    propagates instead of rejecting every frame as "bad frame"."""
    from guidance.registration.register import RegistrationError

    pipeline = Pipeline(Registrator(phantom.ct), plan=phantom.plan, settings=PipelineSettings(level=29))
    with pytest.raises(RegistrationError, match="label map"):
        pipeline.on_frame(frames[0])


def test_pipeline_and_sim_restarts_are_survived(registrator, frames, phantom):
    loop = Loop(registrator, phantom.plan)
    loop.start()
    results = Subscriber(loop.result_endpoint)
    pub = Publisher(loop.frame_endpoint)
    try:
        # Heartbeats from the start, telling the truth: no frames yet, then registering
        # while the first (global) registration runs, then tracking.
        wait_for(results, lambda m: m.kind == "heartbeat" and m.state == "no_frames")
        seen = []
        send_until(pub, replace(frames[0], acquired_ns=time.time_ns()), results,
                   lambda m: seen.append(m) or is_pose_for(1)(m))
        states = [m.state for m in seen if m.kind == "heartbeat"]
        assert "registering" in states
        wait_for(results, lambda m: m.kind == "heartbeat" and m.state == "tracking")
        loop.halt()  # the pipeline goes away ...
        loop.start()  # ... and comes back on the same endpoints
        send_until(pub, frames[1], results, is_pose_for(2))
        pub.close()  # the simulator restarts
        pub = Publisher(loop.frame_endpoint)
        send_until(pub, frames[2], results, is_pose_for(3))
    finally:
        pub.close()
        results.close()
        loop.halt()


def test_display_shows_stale_and_invalid(tmp_path, phantom, frames):
    frame_endpoint, result_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    stop = threading.Event()
    sink = HeadlessWriter(tmp_path / "screens")
    out = {}
    thread = threading.Thread(target=lambda: out.update(run_display(
        frame_endpoint=frame_endpoint, result_endpoint=result_endpoint, ct=phantom.ct, plan=phantom.plan,
        sink=sink, stop=stop, refresh_hz=20.0, size=(640, 360))), daemon=True)
    frame_pub, result_pub = Publisher(frame_endpoint), Publisher(result_endpoint)
    thread.start()
    ok = PoseResult(frame_id=1, status="ok", reason="converged", T_world_corrected_from_world=np.eye(4),
                    views=[{"T_cam_from_world": frames[0].view.T_cam_from_world}], confidence=0.9,
                    mode="tracking", frame_acquired_ns=time.time_ns(), source="pipeline")
    failed = PoseResult(frame_id=2, status="failed", reason="similarity below threshold", confidence=0.0,
                        mode="global", frame_acquired_ns=time.time_ns(), source="pipeline")
    try:
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:  # fresh poses: ok
            frame_pub.send(frames[0])
            result_pub.send(replace(ok, frame_acquired_ns=time.time_ns()))
            time.sleep(0.05)
        stop_ok = time.monotonic()
        time.sleep(1.2)  # the pipeline went quiet: stale
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # failures: invalid
            result_pub.send(replace(failed, frame_acquired_ns=time.time_ns()))
            time.sleep(0.05)
        assert time.monotonic() - stop_ok > 1.0
    finally:
        stop.set()
        thread.join(timeout=10)
        frame_pub.close()
        result_pub.close()
    counts = out["status_counts"]
    assert counts.get("ok", 0) > 0 and counts.get("stale", 0) > 0 and counts.get("invalid", 0) > 0
    assert len(list((tmp_path / "screens").glob("screen_*.png"))) == out["screens"]


def test_recording_replays_to_the_same_poses(tmp_path, registrator, frames, phantom):
    loop = Loop(registrator, phantom.plan, record_dir=tmp_path / "rec")
    loop.start()
    results = Subscriber(loop.result_endpoint)
    pub = Publisher(loop.frame_endpoint)
    try:
        send_until(pub, frames[0], results, is_pose_for(1))
        send_until(pub, frames[1], results, is_pose_for(2))
    finally:
        pub.close()
        results.close()
        loop.halt()
    records = list(read_recording(tmp_path / "rec"))
    inputs = [decode(parts) for direction, _, parts in records if direction == "in"]
    outputs = [decode(parts) for direction, _, parts in records if direction == "out"]
    recorded = {m.frame_id: m for m in outputs if isinstance(m, PoseResult)}
    assert {1, 2} <= set(recorded)
    # Replay the recorded inputs through a fresh pipeline, in the recorded order.
    replayed = {}
    pipeline = Pipeline(registrator, plan=phantom.plan)
    processed = [m for m in outputs if isinstance(m, PoseResult)]
    for pose in processed:
        frame = next(m for m in inputs if isinstance(m, Frame) and m.frame_id == pose.frame_id)
        (replayed[pose.frame_id],) = pipeline.on_frame(frame)
    for frame_id, pose in recorded.items():
        assert replayed[frame_id].status == pose.status
        np.testing.assert_allclose(replayed[frame_id].T_world_corrected_from_world,
                                   pose.T_world_corrected_from_world, atol=1e-9)
    assert view_to_dict(inputs[0].view)["schema"] == "guidance.view/1"


def test_distortion_calibration_is_applied_and_mismatches_refused(registrator, frames, phantom):
    from calibration.distortion import DistortionModel
    from calibration.files import distortion_calibration

    n_terms = 6  # degree 2
    shift = np.zeros((2, n_terms))
    shift[0, 0] = 1.5  # undistorted = distorted + 1.5 px in u
    model = DistortionModel(image_size=(192, 192), degree=2, center_px=(95.5, 95.5), scale_px=96.0,
                            forward=shift, inverse=-shift)
    cal = distortion_calibration(model, device_id="test")
    pipeline = Pipeline(registrator, plan=phantom.plan, settings=PipelineSettings(distortion=cal))
    (pose,) = pipeline.on_frame(frames[0])  # source "test", 192 x 192: accepted
    assert pose.status == "ok", pose.reason
    other = Frame(frame_id=9, acquired_ns=frames[0].acquired_ns, view=frames[0].view, pixels=frames[0].pixels,
                  source="another-carm")
    (refused,) = pipeline.on_frame(other)
    assert refused.status == "failed"
    assert "calibration is for 192x192 frames from device test" in refused.reason
    assert "another-carm" in refused.reason


def test_overlay_is_published_as_png_of_the_frame(registrator, frames, phantom):
    import cv2

    pipeline = Pipeline(registrator, plan=phantom.plan, settings=PipelineSettings(overlay=True))
    pose, overlay = pipeline.on_frame(frames[0])
    assert pose.status == "ok" and overlay.frame_id == frames[0].frame_id and overlay.encoding == "png"
    picture = cv2.imdecode(np.frombuffer(overlay.data, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (192, 192, 3)
    # The planned trajectories are drawn in colour on the grey frame.
    assert (np.ptp(picture.astype(int), axis=2) > 40).sum() > 50


class GatedWarmUp(Pipeline):
    """A real pipeline whose warm-up first waits for ``gate`` (so its heartbeat state can be seen)."""

    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def warm_up(self) -> float:
        self.warming_up = True
        self.gate.wait(20)
        return super().warm_up()


def test_a_slow_start_beats_starting_then_warming_up_then_no_frames(registrator, phantom):
    """Built by a factory (loading a CT takes a while), the pipeline beats from its first
    loop: "starting" until it is built, "warming_up" while its kernels load, then
    "no_frames" while no frame comes; its heartbeats then carry the start-up steps."""
    frame_endpoint, result_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    release, warm, stop = threading.Event(), threading.Event(), threading.Event()

    def build():
        release.wait(20)
        return GatedWarmUp(registrator, plan=phantom.plan, gate=warm)

    results = Subscriber(result_endpoint)
    thread = threading.Thread(target=run_pipeline, args=(build,), kwargs=dict(
        frame_endpoints=[frame_endpoint], result_endpoint=result_endpoint, stop=stop, heartbeat_s=0.1), daemon=True)
    thread.start()
    try:
        wait_for(results, lambda m: m.kind == "heartbeat" and m.state == "starting")
        release.set()
        wait_for(results, lambda m: m.kind == "heartbeat" and m.state == "warming_up")
        warm.set()
        ready = wait_for(results, lambda m: m.kind == "heartbeat" and m.state == "no_frames")
    finally:
        release.set()
        warm.set()
        stop.set()
        thread.join(timeout=10)
        results.close()
    assert not thread.is_alive()
    steps = ready.stats  # this process's start-up steps (process age, s), then durations (s)
    assert 0 < steps["startup_sockets_s"] <= steps["startup_built_s"] <= steps["startup_ready_s"]
    assert steps["startup_warm_up_s"] <= steps["startup_ready_s"] - steps["startup_built_s"] + 0.02  # /proc: 10 ms
    assert steps["startup_prepared_ct_s"] == pytest.approx(registrator.prepare_s, abs=1e-3)
    assert 0 < steps["startup_ready_cpu_s"] <= time.process_time()
    with pytest.raises(GuidanceError, match=r"pipeline's settings \(max_frame_px 2048, source 'pipeline'\) differ "
                                            r"from the loop's \(max_frame_px 512"):
        run_pipeline(build, frame_endpoints=[frame_endpoint], result_endpoint=result_endpoint, stop=stop,
                     max_frame_px=512)


STARTUP_SNIPPET = """
import json, pickle, sys
import guidance.live.calibrations, guidance.live.pipeline, guidance.live.serve, run_guidance
import sim.subject
heavy = [m for m in ("scipy.optimize", "scipy.ndimage", "scipy.spatial", "SimpleITK", "pydicom") if m in sys.modules]
later = [m for m in ("calibration.files", "guidance.navigation.detection", "guidance.navigation.overlay", "sim.phantom",
                     "psutil") if m in sys.modules]
from guidance.core import drr
from guidance.live.pipeline import Pipeline
from guidance.live.wire import decode
from guidance.registration.register import Registrator
from sim.phantom import make_phantom

def loaded():
    return [len(drr._cast_serial.signatures), len(drr._cast_parallel.signatures)]

phantom = make_phantom(seed=0, spacing_mm=1.5)
pipeline = Pipeline(Registrator(phantom.ct, labels=phantom.labels), plan=phantom.plan)
before = loaded()
pipeline.warm_up()
warmed = loaded()
pose = pipeline.on_frame(decode(pickle.load(open(sys.argv[1], "rb"))))[0]
print(json.dumps({"heavy": heavy, "later": later, "from_cache": pipeline.registrator.prepared.from_cache,
                  "before": before, "warmed": warmed, "after": loaded(), "mode": pose.mode}))
"""


def test_a_started_pipeline_imports_no_scipy_and_its_warm_up_loads_the_registration_kernels(
        frames, registrator, tmp_path):
    """In a fresh process, as a started pipeline: its modules import neither scipy's
    optimizers, ndimage and spatial, nor SimpleITK nor pydicom (seconds of start-up it does
    not need), nor, before they are used, the calibration files' modules, instrument
    detection, the overlay drawing, the phantom's maker (the CLI reads it from the cache)
    or psutil; its prepared CT comes from the cache; ``warm_up`` loads both DRR kernels,
    and the first global registration then needs no other compiled variant of them."""
    import pickle
    import subprocess
    import sys

    frame_file = tmp_path / "frame.pkl"
    frame_file.write_bytes(pickle.dumps(encode(frames[0])))
    assert registrator.prepared is not None  # the prepared CT is in the session's cache folder
    result = subprocess.run([sys.executable, "-c", STARTUP_SNIPPET, str(frame_file)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["later"] == []
    assert report["from_cache"]
    assert report["before"] == [0, 0]
    assert min(report["warmed"]) >= 1
    assert report["after"] == report["warmed"]
    assert report["mode"] == "global"


def test_instruments_found_in_the_image_without_a_tracker(phantom, registrator):
    """With detection on and no instrument tracked, the K-wire found in the registered frame
    is published as an image-derived instrument state near its true tip (in-plane: the
    depth of one view comes from the anatomy); once the tracker reports it, it is not."""
    from guidance.core.geometry import backproject, project
    from guidance.core.instrument_models import get_instrument
    from guidance.live.wire import InstrumentState
    from guidance.navigation.instruments import tip_and_axis
    from sim.scenario import Scenario, ScenarioPlayer

    scenario = Scenario(detector_px=256, pixel_spacing_mm=1.2, initial_misalignment_mm=3.0,
                        initial_misalignment_deg=1.0, breathing_amplitude_mm=0.0, target_level="L3", seed=2)
    player = ScenarioPlayer(scenario, phantom)
    sim_frame = player.frame_at(10.0)
    pipeline = Pipeline(registrator, plan=phantom.plan, labels=phantom.labels,
                        settings=PipelineSettings(detect_instruments=("kwire",)))
    frame = Frame(frame_id=1, acquired_ns=time.time_ns(), view=sim_frame.view, pixels=sim_frame.pixels)
    out = pipeline.on_frame(frame)
    assert out[0].status == "ok"
    states = [m for m in out if isinstance(m, InstrumentState)]
    assert len(states) == 1 and states[0].image_derived and states[0].tool_id == "kwire"
    tip, _ = tip_and_axis(sim_frame.T_world_from_tool, get_instrument("kwire"))
    view = sim_frame.view.with_pose(out[0].views[0]["T_cam_from_world"])
    source, rays = backproject(view.K, view.T_cam_from_world, project(view.P, states[0].tip_world[None]))
    assert np.linalg.norm(np.cross(tip - source, rays[0])) < 2.0
    assert states[0].plan_level == "L3"
    pipeline.on_tracker(TrackerSample(tool_id="kwire", T_tracker_from_tool=np.eye(4), quality=0.1,
                                      acquired_ns=time.time_ns()))
    assert not any(isinstance(m, InstrumentState) for m in pipeline.on_frame(frame))


def test_instruments_found_in_two_shots_of_different_orientation_are_placed_in_3d(phantom, registrator):
    """No tracker: a lateral shot, then an AP frame after the K-wire advanced 20 mm. The
    pipeline keeps both shots (multi-shot registration) and combines the AP detection with
    the lateral one (shaft planes of the two registered views): the published tip is within
    5 mm of the truth in 3D at this coarse detector (2.8-4.0 mm measured as the
    registration changed) and a quarter of the error of the AP frame's detection alone
    (the depth of the bone surface), within 3 sigma of its published uncertainty, which is a
    fraction of the lateral shot's own (depth from the anatomy)."""
    from guidance.core.images import preprocess
    from guidance.core.instrument_models import get_instrument
    from guidance.live.wire import InstrumentState
    from guidance.navigation.detection import detect_instruments
    from guidance.navigation.instruments import tip_and_axis
    from sim.scenario import START_OUTSIDE_MM, Scenario, ScenarioPlayer

    scenario = Scenario(detector_px=256, pixel_spacing_mm=1.2, initial_misalignment_mm=3.0,
                        initial_misalignment_deg=1.0, breathing_amplitude_mm=0.0, target_level="L4",
                        target_side="right", seed=4, tracked=False)
    player = ScenarioPlayer(scenario, phantom)
    pipeline = Pipeline(registrator, plan=phantom.plan, labels=phantom.labels,
                        settings=PipelineSettings(detect_instruments=("kwire",)))
    states = []
    for frame_id, (depth_mm, angles) in enumerate(((5.0, (90.0, 0.0)), (25.0, (0.0, 0.0))), start=1):
        t_s = (depth_mm + START_OUTSIDE_MM) / scenario.advance_mm_per_s
        sim_frame, _ = player.shot_at(t_s, *angles)
        frame = Frame(frame_id=frame_id, acquired_ns=10**12 + int(t_s * 1e9), view=sim_frame.view,
                      pixels=sim_frame.pixels)
        out = pipeline.on_frame(frame)
        assert out[0].status == "ok"
        (state,) = [m for m in out if isinstance(m, InstrumentState)]
        states.append(state)
    assert pipeline.shots.book.frame_ids == (1, 2)
    kwire = get_instrument("kwire")
    tip, axis = tip_and_axis(player.state_at(t_s).T_world_from_tool, kwire)
    ap_view = sim_frame.view.with_pose(out[0].views[0]["T_cam_from_world"])
    (alone,) = detect_instruments([preprocess(sim_frame.pixels, ap_view).image], [ap_view], [kwire],
                                  focus_world=registrator.centre(None), bone=phantom.labels)
    lateral, ap = states
    error_mm = float(np.linalg.norm(ap.tip_world - tip))
    assert ap.image_derived and error_mm <= 5.0 and error_mm <= 0.25 * np.linalg.norm(alone.tip_world - tip)
    assert error_mm <= 3.0 * ap.uncertainty_depth_mm
    axis_error_deg = np.degrees(np.arccos(min(1.0, float(ap.axis_world @ axis))))
    assert axis_error_deg <= 2.0 and axis_error_deg <= 3.0 * ap.uncertainty_axis_deg
    assert 3.0 * ap.uncertainty_depth_mm < lateral.uncertainty_depth_mm


def test_a_wire_resting_for_the_ap_and_lateral_shots_is_placed_from_the_two(phantom, registrator):
    """No tracker, the demo's K-wire (L3 left, 8 deg medial: near the C-arm's rotation
    plane, where the two shots' shaft planes nearly coincide) resting in the soft tissue
    for an AP shot, a lateral shot and the first AP fluoroscopy frame (``rest_at_shots_s``),
    then advancing 6 mm. At rest the pipeline combines the AP frame with the lateral shot
    by the tip rays (the AP shot, of the AP frame's orientation and taken before the
    lateral, bounds the travel): within 1 mm (the biplane target), where the anatomy's
    depth for the frame alone (the tip docked on the bone surface) is over 10 mm off.
    After the advance the published tip lies within 3 published sigmas."""
    from guidance.core.images import preprocess
    from guidance.core.instrument_models import get_instrument
    from guidance.live.wire import InstrumentState
    from guidance.navigation.detection import detect_instruments
    from guidance.navigation.instruments import tip_and_axis
    from sim.scenario import Scenario, ScenarioPlayer

    scenario = Scenario(detector_px=512, pixel_spacing_mm=0.6, lead_shots=((0.0, 0.0), (90.0, 0.0)),
                        target_level="L3", target_side="left", instrument_medial_deg=8.0, tracked=False,
                        rest_at_shots_s=3.0)
    player = ScenarioPlayer(scenario, phantom)
    pipeline = Pipeline(registrator, plan=phantom.plan, labels=phantom.labels,
                        settings=PipelineSettings(detect_instruments=("kwire",)))
    kwire = get_instrument("kwire")
    published, views = {}, {}
    for t_s in (0.0, 2.0, 4.0, 9.0):  # AP shot, lateral shot, AP at rest, AP after 6 mm
        sim_frame = player.frame_at(t_s)
        frame = Frame(frame_id=sim_frame.frame_id, acquired_ns=10**12 + int(t_s * 1e9), view=sim_frame.view,
                      pixels=sim_frame.pixels)
        out = pipeline.on_frame(frame)
        assert out[0].status == "ok"
        (published[t_s],) = [m for m in out if isinstance(m, InstrumentState)]
        views[t_s] = (sim_frame, sim_frame.view.with_pose(out[0].views[0]["T_cam_from_world"]))
    assert player.tip_depth_mm(0.0) == player.tip_depth_mm(4.0) == player.tip_depth_mm(9.0) - 6.0
    tips = {t_s: tip_and_axis(player.state_at(t_s).T_world_from_tool, kwire)[0] for t_s in published}
    errors = {t_s: float(np.linalg.norm(state.tip_world - tips[t_s])) for t_s, state in published.items()}
    assert errors[4.0] <= 1.0
    for t_s in (4.0, 9.0):
        state = published[t_s]
        assert errors[t_s] <= 3.0 * np.hypot(state.uncertainty_in_plane_mm, state.uncertainty_depth_mm), t_s
    sim_frame, ap_view = views[4.0]
    (alone,) = detect_instruments([preprocess(sim_frame.pixels, ap_view).image], [ap_view], [kwire],
                                  focus_world=registrator.centre(None), bone=phantom.labels)
    assert np.linalg.norm(alone.tip_world - tips[4.0]) > 10.0


def test_a_single_view_axis_is_taken_along_the_plan_of_its_two_mirror_poses(phantom, registrator):
    """The demo's scenario (K-wire docked at the entry, at rest for the AP and lateral shots)
    far into the advance, where the AP frame alone is published: its view shows how far the
    shaft leaves the image plane, not to which side, and the fit had picked the side that
    points the wire 167 deg from the plan (it came out of the patient on the screen). Of the
    two mirror poses the pipeline publishes the one along a planned trajectory: within 20 deg
    of the true axis."""
    from guidance.core.instrument_models import get_instrument
    from guidance.live.wire import InstrumentState
    from guidance.navigation.instruments import tip_and_axis
    from sim.scenario import Scenario, ScenarioPlayer

    scenario = Scenario(detector_px=512, pixel_spacing_mm=0.6, lead_shots=((0.0, 0.0), (90.0, 0.0)), seed=0,
                        target_level="L3", target_side="left", instrument_medial_deg=8.0, tracked=False,
                        rest_at_shots_s=4.0, start_depth_mm=0.0)
    player = ScenarioPlayer(scenario, phantom)
    pipeline = Pipeline(registrator, plan=phantom.plan, labels=phantom.labels,
                        settings=PipelineSettings(detect_instruments=("kwire",)))
    for t_s in (0.0, 2.0, 4.0, 18.0):  # AP shot, lateral shot, AP at rest, AP 14 mm deeper
        sim_frame = player.frame_at(t_s)
        out = pipeline.on_frame(Frame(frame_id=sim_frame.frame_id, acquired_ns=10**12 + int(t_s * 1e9),
                                      view=sim_frame.view, pixels=sim_frame.pixels))
    (state,) = [m for m in out if isinstance(m, InstrumentState)]
    _, axis = tip_and_axis(player.state_at(18.0).T_world_from_tool, get_instrument("kwire"))
    assert state.image_derived and state.uncertainty_depth_mm > 10.0  # one view: depth from the anatomy
    assert state.angle_to_trajectory_deg < 20.0
    assert np.degrees(np.arccos(np.clip(float(state.axis_world @ axis), -1.0, 1.0))) < 20.0


def test_a_skipped_frame_is_kept_as_a_shot_with_the_samples_of_its_acquisition(frames, registrator, phantom):
    """A frame skipped for a newer one (a new orientation) becomes a shot tracked by the
    C-arm and reference samples acquired nearest to it, not by the latest ones; without
    samples within the tolerance it is kept untracked."""
    pipeline = Pipeline(registrator, plan=phantom.plan)
    frame = replace(frames[0], acquired_ns=10**12)
    at_frame = {"carm": make_rigid(np.eye(3), [1.0, 2.0, 3.0]), "reference": make_rigid(np.eye(3), [0.0, 5.0, 0.0])}
    later = {tool: make_rigid(np.eye(3), [9.0, 0.0, 0.0]) @ T for tool, T in at_frame.items()}
    pipeline.on_tracker_samples([TrackerSample(tool_id=tool, T_tracker_from_tool=poses[tool], quality=0.1,
                                               acquired_ns=ns)
                                 for ns, poses in ((frame.acquired_ns - 5_000_000, at_frame),
                                                   (frame.acquired_ns + 60_000_000, later)) for tool in poses])
    pipeline.on_skipped_frame(frame)
    (shot,) = pipeline.shots.book.shots
    assert shot.frame_id == frame.frame_id and shot.tracked
    np.testing.assert_array_equal(shot.T_tracker_from_cam, at_frame["carm"])
    np.testing.assert_array_equal(shot.T_tracker_from_reference, at_frame["reference"])
    untracked = Pipeline(registrator, plan=phantom.plan)
    untracked.on_tracker_samples([TrackerSample(tool_id=tool, T_tracker_from_tool=T, quality=0.1,
                                                acquired_ns=frame.acquired_ns + 60_000_000)
                                  for tool, T in later.items()])
    untracked.on_skipped_frame(frame)
    (shot,) = untracked.shots.book.shots
    assert not shot.tracked
