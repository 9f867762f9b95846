"""OpenIGTLink edge: byte-exact codec tests (no sockets), then a real pyigtl client on loopback."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.core.geometry import invert_rigid, make_rigid, project
from guidance.core.views import carm_view
from guidance.core.volume import Volume
from guidance.live import igtl
from guidance.live.wire import Frame, InstrumentState, PoseResult

pyigtl = pytest.importorskip("pyigtl", reason="pyigtl (the reference OpenIGTLink client) is a test dependency")


def crc64_bitwise(data: bytes) -> int:
    """Slow reference CRC-64/ECMA-182: MSB first, polynomial 0x42F0E1EBA9EA3693, init 0."""
    crc = 0
    for byte in data:
        crc ^= byte << 56
        for _ in range(8):
            crc = ((crc << 1) ^ 0x42F0E1EBA9EA3693) if crc & (1 << 63) else (crc << 1)
            crc &= (1 << 64) - 1
    return crc


def rotation(seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def flip_xy_rows(T: np.ndarray) -> np.ndarray:
    """LPS -> RAS written out independently: negate the first two rows."""
    out = np.array(T, dtype=float)
    out[:2] *= -1
    return out


# ------------------------------------------------------------------------ codec, no sockets


def test_crc64_matches_the_ecma182_check_value_and_a_bitwise_reference():
    assert igtl.crc64(b"123456789") == 0x6C40DF5F0B497347
    data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    assert igtl.crc64(data) == crc64_bitwise(data)


def test_header_layout_is_the_58_byte_big_endian_openigtlink_header():
    T = make_rigid(rotation(1), (1.0, -2.0, 3.5))
    data = igtl.encode(igtl.Transform("CArmToCT", T), stamp_ns=1_700_000_000_500_000_000)
    assert len(data) == 58 + 48
    version, = struct.unpack(">H", data[0:2])
    assert version == 1
    assert data[2:14] == b"TRANSFORM\0\0\0"
    assert data[14:34] == b"CArmToCT" + b"\0" * 12
    seconds, fraction = struct.unpack(">II", data[34:42])
    assert (seconds, fraction) == (1_700_000_000, 1 << 31)  # half a second = 2**31 / 2**32
    body_size, crc = struct.unpack(">QQ", data[42:58])
    assert body_size == 48 and crc == crc64_bitwise(data[58:])


def test_transform_body_is_the_upper_3x4_column_major():
    T = make_rigid(rotation(2), (10.0, 20.0, 30.0))
    body = igtl.Transform("X", T).body()
    values = np.array(struct.unpack(">12f", body))
    expected = [T[0, 0], T[1, 0], T[2, 0], T[0, 1], T[1, 1], T[2, 1], T[0, 2], T[1, 2], T[2, 2], 10, 20, 30]
    assert_allclose(values, expected, rtol=1e-6)


def test_transform_bytes_equal_pyigtl_packing():
    T = make_rigid(rotation(3), (-5.0, 7.25, 100.0))
    ours = igtl.encode(igtl.Transform("KwireToCT", T), stamp_ns=1_650_000_000 * 10**9)
    theirs = pyigtl.TransformMessage(T, timestamp=1_650_000_000.0, device_name="KwireToCT").pack()
    assert ours == theirs


def test_image_header_centre_and_big_endian_voxels():
    voxels = np.arange(4 * 3 * 2, dtype=np.int16).reshape(2, 3, 4) - 7  # k, j, i
    T = make_rigid(rotation(4), (10.0, 20.0, 30.0)) @ np.diag([0.5, 0.75, 2.0, 1.0])
    body = igtl.Image("CT", voxels, T).body()
    head = struct.unpack(">HBBBB3H12f3H3H", body[:72])
    assert head[:5] == (1, 1, 4, 1, 1)  # version, scalar, int16, big endian, RAS
    assert head[5:8] == (4, 3, 2)
    assert_allclose(np.reshape(head[8:17], (3, 3)).T, T[:3, :3], rtol=1e-6, atol=1e-6)
    centre = T @ [1.5, 1.0, 0.5, 1.0]
    assert_allclose(head[17:20], centre[:3], rtol=1e-6)
    assert head[20:] == (0, 0, 0, 4, 3, 2)
    assert body[72:] == voxels.astype(">i2").tobytes()


@pytest.mark.parametrize("message", [
    igtl.Transform("CArmToCT", make_rigid(rotation(5), (1.0, 2.0, 3.0))),
    igtl.Image("Fluoro", np.arange(12, dtype=np.float32).reshape(3, 4), np.diag([0.5, 0.5, 1.0, 1.0])),
    igtl.Image("CT", np.arange(24, dtype=np.uint16).reshape(2, 3, 4), make_rigid(rotation(6), (4.0, 5.0, 6.0))),
    igtl.Status("CArmToCT", 7, "stale", "no update for 1.2 s"),
])
def test_every_kind_round_trips_byte_exact(message):
    data = igtl.encode(message, stamp_ns=1_700_000_123_250_000_000)
    decoded, stamp_ns = igtl.decode(data)
    assert type(decoded) is type(message) and decoded.device_name == message.device_name
    assert abs(stamp_ns - 1_700_000_123_250_000_000) <= 1
    assert igtl.encode(decoded, stamp_ns) == data


def test_decode_rejects_a_corrupted_body_and_a_wrong_size():
    data = bytearray(igtl.encode(igtl.Status("X", 1, "ok", "fine"), stamp_ns=10**18))
    data[-3] ^= 0xFF
    with pytest.raises(igtl.IgtlError, match="CRC"):
        igtl.decode(bytes(data))
    with pytest.raises(igtl.IgtlError, match="body bytes"):
        igtl.decode(igtl.encode(igtl.Status("X", 1), stamp_ns=10**18)[:-1])


def test_device_names_longer_than_20_bytes_are_refused():
    with pytest.raises(igtl.IgtlError, match="device name"):
        igtl.encode(igtl.Status("A" * 21, 1), stamp_ns=0)


def test_detector_plane_pixels_project_back_onto_themselves():
    view = carm_view(lao_deg=20.0, cranial_deg=-10.0, detector_size_px=(64, 48), pixel_spacing_mm=(0.8, 0.8),
                     patient_position="prone", principal_point_px=(30.0, 25.0))
    T = igtl.detector_T_lps_from_ijk(view)
    uv = np.array([[0.0, 0.0], [63.0, 0.0], [10.0, 40.0], [30.0, 25.0]])
    world = (T @ np.column_stack([uv, np.zeros(4), np.ones(4)]).T).T[:, :3]
    assert_allclose(project(view.P, world), uv, atol=1e-9)
    depth = (view.T_cam_from_world @ np.append(world[3], 1.0))[2]
    assert depth == pytest.approx(view.source_to_detector_mm)
    assert_allclose(np.linalg.norm(T[:3, :2], axis=0), view.pixel_spacing_mm)


# --------------------------------------------------------------------- pyigtl on loopback


class PyigtlStatus(pyigtl.messages.MessageBase):
    """STATUS for pyigtl's client (pyigtl has no STATUS class), written from the spec."""

    def __init__(self, timestamp=None, device_name=None):
        super().__init__(timestamp=timestamp, device_name=device_name)
        self._message_type = "STATUS"
        self._valid_message = True

    def _unpack_content(self, content):
        self.code, self.subcode, name = struct.unpack(">Hq20s", content[:30])
        self.error_name = name.rstrip(b"\0").decode()
        self.status_message = content[30:].rstrip(b"\0").decode()


class _Log(dict):
    """pyigtl's client keeps the latest message per device name; this keeps them all."""

    def __init__(self, received: list):
        super().__init__()
        self.received = received

    def __setitem__(self, key, value):
        self.received.append(value)
        super().__setitem__(key, value)


class Client:
    """A real pyigtl OpenIGTLinkClient on loopback that records every message it decodes."""

    def __init__(self, port: int):
        self.received: list = []
        self.pyigtl = pyigtl.OpenIGTLinkClient(host="127.0.0.1", port=port, start_now=False)
        self.pyigtl.incoming_messages = _Log(self.received)
        self.pyigtl.start()

    def wait(self, message_type: str, device: str, where=lambda m: True, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while True:
            for m in list(self.received):
                if m.message_type == message_type and m.device_name == device and where(m):
                    return m
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {message_type} {device} within {timeout_s} s; got "
                             f"{[(m.message_type, m.device_name) for m in self.received]}")

    def stop(self):
        self.pyigtl.stop()


@pytest.fixture
def status_aware_pyigtl(monkeypatch):
    monkeypatch.setitem(pyigtl.messages.message_type_to_class_constructor, "STATUS", PyigtlStatus)


def small_ct() -> Volume:
    data = np.random.default_rng(7).integers(-1000, 2000, (6, 5, 4)).astype(np.float32)
    T = make_rigid(rotation(8), (-50.0, 30.0, 12.0)) @ np.diag([0.8, 0.9, 2.5, 1.0])
    return Volume(data=data, T_world_from_index=T)


PLAN = [{"level": "L3", "label": 29, "side": "left", "entry_world": [10.0, 40.0, 0.0],
         "target_world": [2.0, 0.0, 5.0], "screw_diameter_mm": 6.5}]


def make_frame_and_pose():
    view = carm_view(lao_deg=15.0, cranial_deg=5.0, detector_size_px=(40, 32), pixel_spacing_mm=(1.2, 1.2))
    pixels = np.random.default_rng(9).integers(0, 4000, (32, 40)).astype(np.uint16)
    frame = Frame(frame_id=3, acquired_ns=time.time_ns(), view=view, pixels=pixels)
    c, s = np.cos(0.05), np.sin(0.05)
    correction = make_rigid(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), (3.0, -2.0, 1.0))
    pose = PoseResult(frame_id=3, status="ok", reason="converged", T_world_corrected_from_world=correction,
                      views=[{"T_cam_from_world": view.T_cam_from_world @ invert_rigid(correction)}],
                      confidence=0.9, mode="global", frame_acquired_ns=frame.acquired_ns)
    return frame, pose


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_pyigtl_clients_receive_ct_plan_poses_fluoro_and_status(status_aware_pyigtl):
    ct = small_ct()
    frame, pose = make_frame_and_pose()
    T_cam = pose.views[0]["T_cam_from_world"]
    tool = InstrumentState(frame_id=3, tool_id="kwire", tip_world=[1.0, 2.0, 3.0], axis_world=[0.0, 0.6, 0.8],
                           status="ok")
    with igtl.IgtlBridge(0, ct=ct, plan=PLAN, stale_s=0.3) as bridge:
        clients = [Client(bridge.port), Client(bridge.port)]
        try:
            for client in clients:
                image = client.wait("IMAGE", "CT")
                assert image.world_coordinate_system == "ras"
                assert_allclose(image.image, ct.data.astype(np.int16))
                assert_allclose(image.ijk_to_world_matrix, flip_xy_rows(ct.T_world_from_index), atol=1e-3)
                plan = client.wait("TRANSFORM", "PlanL3LeftToCT")
                direction = np.subtract(PLAN[0]["target_world"], PLAN[0]["entry_world"])
                assert_allclose(plan.matrix[:3, 3], np.multiply(PLAN[0]["entry_world"], [-1, -1, 1]), atol=1e-4)
                assert_allclose(plan.matrix[:3, 2], direction * [-1, -1, 1] / np.linalg.norm(direction), atol=1e-6)
            assert wait_until(lambda: len(bridge.server.clients) == 2)
            bridge.publish(pose, frame)
            bridge.publish(tool)
            for client in clients:
                carm = client.wait("TRANSFORM", "CArmToCT")
                assert_allclose(carm.matrix, flip_xy_rows(invert_rigid(T_cam)), atol=1e-4)
                kwire = client.wait("TRANSFORM", "KwireToCT")
                assert_allclose(kwire.matrix[:3, 3], [-1.0, -2.0, 3.0], atol=1e-5)
                assert_allclose(kwire.matrix[:3, 2], [0.0, -0.6, 0.8], atol=1e-6)
                assert_allclose(kwire.matrix[:3, :3].T @ kwire.matrix[:3, :3], np.eye(3), atol=1e-6)
                fluoro = client.wait("IMAGE", "Fluoro")
                assert_allclose(fluoro.image[0], frame.pixels)
                # pixel (u, v) of the received image lies where the registered view projects it
                registered = frame.view.with_pose(T_cam)
                uv = np.array([[0.0, 0.0], [39.0, 31.0], [12.0, 7.0]])
                ras = (fluoro.ijk_to_world_matrix @ np.column_stack([uv, np.zeros(3), np.ones(3)]).T).T[:, :3]
                assert_allclose(project(registered.P, ras * [-1, -1, 1]), uv, atol=2e-3)
                ok = client.wait("STATUS", "CArmToCT")
                assert (ok.code, ok.error_name) == (1, "ok")
                assert client.wait("STATUS", "KwireToCT").code == 1
            # no more poses: the bridge declares them stale
            stale = clients[0].wait("STATUS", "CArmToCT", where=lambda m: m.error_name == "stale")
            assert stale.code == 7
        finally:
            for client in clients:
                client.stop()


def test_failed_registration_sends_status_not_a_transform(status_aware_pyigtl):
    frame, _ = make_frame_and_pose()
    failed = PoseResult(frame_id=4, status="failed", reason="similarity below threshold", confidence=0.0,
                        mode="global", frame_acquired_ns=time.time_ns())
    with igtl.IgtlBridge(0, stale_s=30.0) as bridge:
        client = Client(bridge.port)
        try:
            assert wait_until(lambda: len(bridge.server.clients) == 1)
            bridge.publish(failed, frame)
            msg = client.wait("STATUS", "CArmToCT")
            assert (msg.code, msg.error_name, msg.status_message) == (2, "failed", "similarity below threshold")
            bridge.close()
            assert not [m for m in client.received if m.message_type == "TRANSFORM"]
        finally:
            client.stop()


def test_a_stalled_client_is_bounded_and_others_keep_receiving_and_reconnects_get_the_ct():
    ct = small_ct()
    frame, pose = make_frame_and_pose()
    big = igtl.encode(igtl.Image("Fluoro", np.zeros((512, 512), np.uint16), np.eye(4)), stamp_ns=0)
    with igtl.IgtlBridge(0, ct=ct, max_queue_bytes=4 * len(big)) as bridge:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", bridge.port))  # connects, never reads
        good = Client(bridge.port)
        try:
            assert wait_until(lambda: len(bridge.server.clients) == 2)
            good.wait("IMAGE", "CT")
            stalled_port = stalled.getsockname()[1]
            for _ in range(100):
                bridge.server.broadcast(big)
            stalled_client = [c for c in bridge.server.clients if c.address[1] == stalled_port][0]
            assert wait_until(lambda: stalled_client.dropped > 0)
            assert stalled_client.queued_bytes <= 4 * len(big)
            bridge.publish(pose, frame)
            good.wait("TRANSFORM", "CArmToCT")
            good.stop()
            again = Client(bridge.port)  # a reconnecting client gets the CT again
            try:
                again.wait("IMAGE", "CT")
            finally:
                again.stop()
            stalled.close()
            assert wait_until(lambda: len(bridge.server.clients) == 0)
            assert bridge.server.connections == 3
        finally:
            stalled.close()
            good.stop()


def test_run_pipeline_publishes_its_poses_to_a_pyigtl_client():
    """The pipeline hook end to end: a simulated frame in, the registered C-arm pose out in RAS."""
    import threading

    from guidance.live.pipeline import Pipeline
    from guidance.live.serve import run_pipeline
    from guidance.live.transport import Publisher, Subscriber, free_tcp_endpoint
    from guidance.registration.register import Registrator
    from sim.phantom import make_phantom
    from sim.xray import XrayParams, simulate_xray

    phantom = make_phantom(seed=0, spacing_mm=2.0)
    registrator = Registrator(phantom.ct, labels=phantom.labels)
    view = carm_view(isocenter_world=registrator.centre(None), patient_position="prone",
                     detector_size_px=(128, 128), pixel_spacing_mm=(2.4, 2.4))
    image, view = simulate_xray(phantom.ct, view, XrayParams(seed=0), intensity="raw")
    frames_ep, results_ep = free_tcp_endpoint(), free_tcp_endpoint()
    stop = threading.Event()
    with igtl.IgtlBridge(0, ct=phantom.ct, plan=phantom.plan) as bridge:
        thread = threading.Thread(target=run_pipeline, args=(Pipeline(registrator, plan=phantom.plan),), kwargs=dict(
            frame_endpoints=[frames_ep], result_endpoint=results_ep, stop=stop, sink=bridge), daemon=True)
        thread.start()
        client = Client(bridge.port)
        results = Subscriber([results_ep], topics=("pose_result",))
        try:
            with Publisher(frames_ep) as pub:
                pose = None
                deadline = time.monotonic() + 60
                while pose is None and time.monotonic() < deadline:
                    pub.send(Frame(frame_id=1, acquired_ns=time.time_ns(), view=view, pixels=image))
                    pose = results.recv(1.0)
            assert pose is not None and pose.status == "ok", pose
            carm = client.wait("TRANSFORM", "CArmToCT")
            assert_allclose(carm.matrix, flip_xy_rows(invert_rigid(pose.views[0]["T_cam_from_world"])), atol=1e-3)
            assert client.wait("IMAGE", "Fluoro").image.shape == (1, 128, 128)
            assert client.wait("IMAGE", "CT").image.shape == phantom.ct.data.shape
        finally:
            stop.set()
            thread.join(10)
            results.close()
            client.stop()


def test_bad_settings_are_named_errors():
    with pytest.raises(igtl.IgtlError, match="port 70000 is not a TCP port"):
        igtl.IgtlBridge(70000)
    with pytest.raises(igtl.IgtlError, match="image_hz and stale_s must be positive"):
        igtl.IgtlBridge(0, image_hz=0.0)


def test_close_sends_what_was_published_just_before():
    """A pose published right before the bridge closes (the pipeline stopping) still reaches the client."""
    frame, pose = make_frame_and_pose()
    bridge = igtl.IgtlBridge(0, stale_s=30.0)
    client = Client(bridge.port)
    try:
        assert wait_until(lambda: len(bridge.server.clients) == 1)
        bridge.publish(pose, frame)
        bridge.close()
        carm = client.wait("TRANSFORM", "CArmToCT", timeout_s=5.0)
        assert_allclose(carm.matrix, flip_xy_rows(invert_rigid(pose.views[0]["T_cam_from_world"])), atol=1e-4)
        assert client.wait("IMAGE", "Fluoro").image.shape == (1, 32, 40)
    finally:
        bridge.close()
        client.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_igtl_port_serves_ct_plan_poses_fluoro_and_status_to_pyigtl(tmp_path, status_aware_pyigtl):
    """``demo --igtl-port``: a pyigtl client (connecting, retrying, before the pipeline
    serves) receives the CT, the plan, the registered C-arm poses with their fluoro frames
    and status; each checked against what the demo's pipeline recorded (its poses and the
    frames they came from) and the phantom's CT and plan."""
    import run_guidance
    from guidance.live.recording import read_recording
    from guidance.live.wire import decode
    from sim.subject import load_subject

    port = free_port()
    client = Client(port)
    try:  # 8 s: the first (AP + lateral) registration can take ~10 s on a loaded machine; 2 fps: less rendering
        rc = run_guidance.main(["demo", "--igtl-port", str(port), "--out", str(tmp_path), "--duration", "8",
                                "--fps", "2", "--no-display"])
    finally:
        client.stop()
    assert rc == 0
    (recording,) = tmp_path.glob("recording-*")
    messages = [decode(parts) for _, _, parts in read_recording(recording)]
    frames = {m.frame_id: m for m in messages if isinstance(m, Frame)}
    poses = [m for m in messages if isinstance(m, PoseResult) and m.status == "ok" and m.mode != "volume"]
    assert poses, "the demo's pipeline registered no frame"
    subject = load_subject(phantom_seed=0)

    ct = client.wait("IMAGE", "CT", timeout_s=0.0)
    assert_allclose(ct.image, np.clip(np.rint(subject.ct.data), -32768, 32767))
    assert_allclose(ct.ijk_to_world_matrix, flip_xy_rows(subject.ct.T_world_from_index), atol=1e-3)
    for t in subject.plan:
        name = f"Plan{t['level']}{t['side'].capitalize()}ToCT"
        plan = client.wait("TRANSFORM", name, timeout_s=0.0)
        direction = np.subtract(t["target_world"], t["entry_world"])
        assert_allclose(plan.matrix[:3, 3], np.multiply(t["entry_world"], [-1, -1, 1]), atol=1e-3)
        assert_allclose(plan.matrix[:3, 2], direction * [-1, -1, 1] / np.linalg.norm(direction), atol=1e-6)

    received = [m for m in client.received if m.message_type == "TRANSFORM" and m.device_name == "CArmToCT"]
    assert received
    pose_of = {}
    for carm in received:  # every C-arm transform is one of the pipeline's poses, in RAS
        errors = [np.abs(carm.matrix - flip_xy_rows(invert_rigid(p.views[0]["T_cam_from_world"]))).max()
                  for p in poses]
        assert min(errors) < 1e-3, min(errors)
        pose_of[carm.timestamp] = poses[int(np.argmin(errors))]
    statuses = [m for m in client.received if m.message_type == "STATUS" and m.device_name == "CArmToCT"]
    for stamp, pose in pose_of.items():  # each pose comes with its OK status (same time stamp)
        assert any((s.timestamp, s.code, s.status_message) == (stamp, 1, pose.reason) for s in statuses)
    tips = [(m.tip_world, m.axis_world) for m in messages if isinstance(m, InstrumentState) and m.tip_world is not None]
    for kwire in [m for m in client.received if m.message_type == "TRANSFORM" and m.device_name == "KwireToCT"]:
        assert min(np.abs(kwire.matrix[:3, 3] - np.multiply(tip, [-1, -1, 1])).max()
                   + np.abs(kwire.matrix[:3, 2] - np.multiply(axis, [-1, -1, 1]) / np.linalg.norm(axis)).max()
                   for tip, axis in tips) < 1e-3
    fluoros = [m for m in client.received if m.message_type == "IMAGE" and m.device_name == "Fluoro"]
    assert fluoros
    for fluoro in fluoros:  # the frame a pose came from, on the detector plane of the registered view
        pose = pose_of[fluoro.timestamp]
        frame = frames[pose.frame_id]
        assert_allclose(fluoro.image[0], frame.pixels)
        registered = frame.view.with_pose(pose.views[0]["T_cam_from_world"])
        W, H = registered.image_size
        uv = np.array([[0.0, 0.0], [W - 1.0, H - 1.0], [W / 3.0, H / 5.0]])
        ras = (fluoro.ijk_to_world_matrix @ np.column_stack([uv, np.zeros(3), np.ones(3)]).T).T[:, :3]
        assert_allclose(project(registered.P, ras * [-1, -1, 1]), uv, atol=2e-2)
