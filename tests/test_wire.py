"""guidance.live.wire: socket-free round trips of every kind and rejection of malformed input."""

import json
import zlib

import numpy as np
import pytest

from guidance.live import wire
from guidance.core.geometry import make_rigid, rotation_about_axis
from guidance.core.views import carm_view, view_to_dict
from guidance.live.wire import WireError, decode, encode

W, H = 24, 16


def _pose(angle_deg: float, t: tuple[float, float, float]) -> np.ndarray:
    return make_rigid(rotation_about_axis([0.3, -0.5, 0.8], angle_deg), np.array(t))


def _frame(dtype: str = "uint16", ground_truth: bool = True) -> wire.Frame:
    view = carm_view(lao_deg=12.5, cranial_deg=-7.0, detector_size_px=(W, H),
                     intensity="raw" if dtype == "uint16" else "line_integral",
                     I0=4095.0 if dtype == "uint16" else None)
    rng = np.random.default_rng(3)
    pixels = (rng.random((H, W)) * 200).astype(dtype)
    gt = {"T_cam_from_world": view.T_cam_from_world,
          "T_world_corrected_from_world": _pose(2.5, (1.0, -2.0, 0.5))} if ground_truth else None
    return wire.Frame(seq=7, stamp_ns=1_700_000_000_123_456_789, source="sim", frame_id=42,
                      acquired_ns=1_700_000_000_100_000_000, view=view, pixels=pixels,
                      ground_truth=gt)


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))

EXAMPLES = {
    "frame_uint16": _frame("uint16"),
    "frame_uint8_no_gt": _frame("uint8", ground_truth=False),
    "frame_float32": _frame("float32"),
    "tracker_sample": wire.TrackerSample(
        source="tracker", tool_id="probe-1", T_tracker_from_tool=_pose(33.0, (10.0, 20.5, -300.0)),
        quality=0.25, acquired_ns=123, T_tracker_from_reference=_pose(-5.0, (0.0, 1.0, 2.0))),
    "tracker_sample_no_reference": wire.TrackerSample(
        tool_id="awl", T_tracker_from_tool=np.eye(4), quality=1, acquired_ns=0),
    "pose_result_ok": wire.PoseResult(
        source="pipeline", frame_id=42, status="ok", reason="converged: xtol",
        T_world_corrected_from_world=_pose(1.5, (0.3, -0.7, 1.1)),
        views=[{"T_cam_from_world": _pose(90.0, (0.0, 0.0, 600.0))},
               {"T_cam_from_world": _pose(0.0, (0.0, 0.0, 650.0))}],
        level_poses={"L3": _pose(0.5, (0.1, 0.0, 0.0)), "L4": _pose(-0.5, (0.0, 0.2, 0.0))},
        similarity=-0.8734, confidence=0.93, mode="tracking",
        latency_ms={"preprocess": 1.25, "register": 48.0}, frame_acquired_ns=99,
        uncertainty_in_plane_mm=0.12, uncertainty_depth_mm=1.5),
    "pose_result_failed": wire.PoseResult(
        frame_id=43, status="failed", reason="image quality gate: frame too dark",
        confidence=0.0, mode="global", frame_acquired_ns=100),
    "instrument_state": wire.InstrumentState(
        frame_id=42, tool_id="probe-1", tip_world=[1.5, -20.0, 300.25],
        axis_world=[0.0, 0.6, 0.8], status="ok", plan_level="L4", plan_side="left",
        distance_to_trajectory_mm=1.2, angle_to_trajectory_deg=3.5,
        depth_along_trajectory_mm=-4.0, tip_to_target_mm=25.0),
    "instrument_state_breach": wire.InstrumentState(
        frame_id=7, tool_id="kwire", tip_world=[1.0, 2.0, 3.0], axis_world=[0.0, -1.0, 0.0], status="ok",
        plan_level="L3", plan_side="left", to_target_along_plan_mm=31.5, breach_mm=2.25, breach_grade="C",
        breach_side="medial", breach_warning=True, clearance_mm=-2.25, travel_to_breach_mm=6.5),
    "target_pose": wire.TargetPose(
        source="pipeline", level="L3", side="left", approach="posterior",
        T_tracker_from_target=_pose(12.0, (5.0, -3.0, 800.0)), length_mm=48.5),
    "target_pose_guide": wire.TargetPose(
        level="L4", side="left", approach="lateral", T_tracker_from_target=np.eye(4), length_mm=22.0,
        guide_tool_id="aiming_guide", guide_entry_error_mm=0.75, guide_angle_error_deg=0.5, guide_aligned=True),
    "instrument_state_image_derived": wire.InstrumentState(
        frame_id=7, tool_id="kwire", tip_world=[1.0, 2.0, 3.0], axis_world=[0.0, 0.0, -1.0], status="ok",
        image_derived=True, uncertainty_in_plane_mm=0.3, uncertainty_depth_mm=2.5, uncertainty_axis_deg=0.5),
    "instrument_state_no_plan": wire.InstrumentState(
        frame_id=1, tool_id="awl", tip_world=np.zeros(3), axis_world=np.array([0.0, 0.0, 1.0]),
        status="stale"),
    "overlay": wire.Overlay(frame_id=42, encoding="png", data=PNG),
    "heartbeat": wire.Heartbeat(source="display", role="display", state="running",
                                stats={"fps": 29.5, "frames": 1200, "gpu": "none", "ok": True,
                                       "last_error": None}),
    "heartbeat_no_stats": wire.Heartbeat(role="sim", state="starting"),
    "volume": wire.VolumeFrame(
        source="scanner", volume_id=3, acquired_ns=7, voxels=np.linspace(-1000, 1500, 24, dtype=np.float32)
        .reshape(2, 3, 4), spacing_mm=[0.5, 0.6, 1.25], origin_mm=[-10.0, 2.5, 30.0],
        direction=_pose(30.0, (0.0, 0.0, 0.0))[:3, :3], T_tracker_from_scanner=_pose(12.0, (5.0, -900.0, 40.0)),
        ground_truth={"T_world_corrected_from_world": _pose(2.0, (1.0, 2.0, 3.0))}),
    "volume_untracked": wire.VolumeFrame(
        volume_id=0, acquired_ns=0, voxels=np.zeros((2, 2, 2), np.float32), spacing_mm=[1, 1, 1],
        origin_mm=[0, 0, 0], direction=np.eye(3), modality="CT"),
    "pose_result_shots": wire.PoseResult(
        frame_id=44, status="ok", reason="converged", T_world_corrected_from_world=np.eye(4),
        views=[{"T_cam_from_world": _pose(0.0, (0.0, 0.0, 600.0))}], confidence=0.9, mode="tracking",
        frame_acquired_ns=101, shots=[12, 9]),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_round_trip_is_byte_exact(name):
    msg = EXAMPLES[name]
    parts = encode(msg)
    assert all(isinstance(p, bytes) for p in parts)
    decoded = decode(parts)
    assert type(decoded) is type(msg)
    assert encode(decoded) == parts
    header = json.loads(parts[0])
    assert (header["schema"], header["version"], header["kind"]) == ("guidance.msg", 1, msg.kind)
    assert (decoded.seq, decoded.stamp_ns, decoded.source) == (msg.seq, msg.stamp_ns, msg.source)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_frame_content_survives(dtype):
    msg = _frame(dtype)
    out = decode(encode(msg))
    assert out.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.pixels, msg.pixels)
    np.testing.assert_array_equal(out.view.K, msg.view.K)
    np.testing.assert_array_equal(out.view.T_cam_from_world, msg.view.T_cam_from_world)
    assert out.view.intensity == msg.view.intensity
    np.testing.assert_array_equal(out.ground_truth["T_world_corrected_from_world"],
                                  msg.ground_truth["T_world_corrected_from_world"])
    assert (out.frame_id, out.acquired_ns) == (42, msg.acquired_ns)


def test_frame_accepts_view_dict_and_big_endian_pixels():
    msg = _frame("uint16")
    swapped = msg.pixels.astype(">u2")
    other = wire.Frame(frame_id=42, acquired_ns=msg.acquired_ns, view=view_to_dict(msg.view),
                       pixels=swapped)
    np.testing.assert_array_equal(decode(encode(other)).pixels, msg.pixels)


def test_pose_result_and_overlay_content_survive():
    out = decode(encode(EXAMPLES["pose_result_ok"]))
    np.testing.assert_array_equal(out.level_poses["L4"], _pose(-0.5, (0.0, 0.2, 0.0)))
    assert out.latency_ms == {"preprocess": 1.25, "register": 48.0}
    assert (out.uncertainty_in_plane_mm, out.uncertainty_depth_mm) == (0.12, 1.5)
    assert decode(encode(EXAMPLES["pose_result_failed"])).uncertainty_depth_mm is None
    assert decode(encode(EXAMPLES["overlay"])).data == PNG


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_registry_covers_all_kinds():
    classes = set(_all_subclasses(wire.Message))
    assert classes == set(wire.KINDS.values())
    for kind, cls in wire.KINDS.items():
        assert cls.kind == kind
    assert {m.kind for m in EXAMPLES.values()} == set(wire.KINDS)
    # Transport filters by topic prefix: no kind may be a prefix of another.
    for a in wire.KINDS:
        assert not any(b != a and b.startswith(a) for b in wire.KINDS)


# ---------------------------------------------------------------------------------------
# Malformed input


def _header(parts):
    return json.loads(parts[0])


def _with_header(parts, header):
    return [json.dumps(header).encode(), *parts[1:]]


def _reject(parts, match):
    with pytest.raises(WireError, match=match):
        decode(parts)


def test_short_and_long_multipart():
    parts = encode(EXAMPLES["frame_uint16"])
    _reject([], "too few parts")
    _reject(parts[:1], "frame from .sim.: too few parts")
    _reject(parts + [b"extra"], "frame from .sim.: too many parts")
    _reject("not a list", "too few parts")


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe\x00garbage", b"not json", b"{\"a\": ",
                                     b"[1, 2]", b"[" * 100_000])
def test_garbage_header(garbage):
    _reject([garbage], "header")


def test_unknown_schema_version_kind():
    parts = encode(EXAMPLES["heartbeat"])
    for key, value, match in [("schema", "guidance.other", "unknown schema"),
                              ("version", 2, "unsupported version 2"),
                              ("version", "1", "unsupported version"),
                              ("kind", "teapot", "unknown kind 'teapot'")]:
        _reject(_with_header(parts, {**_header(parts), key: value}), match)


def test_wrong_dtype():
    parts = encode(EXAMPLES["frame_float32"])
    header = _header(parts)
    header["buffers"][0]["dtype"] = "float64"
    header["buffers"][0]["nbytes"] *= 2
    _reject(_with_header(parts, header), "dtype 'float64' not allowed")
    with pytest.raises(WireError, match="dtype float64 not allowed"):
        wire.Frame(frame_id=1, acquired_ns=0, view=EXAMPLES["frame_float32"].view,
                   pixels=np.zeros((H, W)))


def test_wrong_shape_and_nbytes():
    parts = encode(EXAMPLES["frame_uint16"])
    header = _header(parts)
    header["buffers"][0]["shape"] = [H, W + 1]
    _reject(_with_header(parts, header), r"nbytes 768 != uint16 x shape \[16, 25\]")
    header = _header(parts)
    header["buffers"][0]["nbytes"] = 10
    _reject(_with_header(parts, header), "nbytes 10 != ")
    _reject([parts[0], parts[1][:-2]], "part has 766 bytes, its descriptor says 768")
    header = _header(parts)
    header["buffers"][0]["shape"] = [H * W]
    _reject(_with_header(parts, header), "must be a non-empty 2-D image")
    header = _header(parts)
    header["buffers"] = []
    _reject(_with_header(parts, header), "header lists 0 buffers")


def test_view_pixel_size_mismatch():
    parts = encode(EXAMPLES["frame_uint8_no_gt"])
    header = _header(parts)
    header["buffers"][0]["shape"] = [W, H]  # same bytes, transposed shape
    _reject(_with_header(parts, header), r"image_size \[24, 16\] does not match .* \[16, 24\]")
    header = _header(parts)
    header["view"]["image_size"] = [W, H + 1]
    _reject(_with_header(parts, header), "does not match the pixels")
    with pytest.raises(WireError, match="does not match the pixels"):
        wire.Frame(frame_id=1, acquired_ns=0, view=EXAMPLES["frame_uint8_no_gt"].view,
                   pixels=np.zeros((H + 1, W), np.uint8))


def test_bad_view_geometry():
    parts = encode(EXAMPLES["frame_uint8_no_gt"])
    header = _header(parts)
    header["view"]["K"][0][0] = -1000.0
    _reject(_with_header(parts, header), "bad view geometry: .*focal")
    header = _header(parts)
    del header["view"]["T_cam_from_world"]
    _reject(_with_header(parts, header), "bad view geometry")


def test_bad_crc():
    parts = encode(EXAMPLES["frame_uint16"])
    corrupted = bytearray(parts[1])
    corrupted[5] ^= 0x01
    _reject([parts[0], bytes(corrupted)], "CRC32 mismatch")


def test_nan_pixels():
    parts = encode(EXAMPLES["frame_float32"])
    pixels = np.frombuffer(parts[1], dtype="<f4").copy()
    pixels[3] = np.nan
    header = _header(parts)
    header["buffers"][0]["crc32"] = zlib.crc32(pixels.tobytes())
    _reject([json.dumps(header).encode(), pixels.tobytes()], "NaN or infinite pixels")
    bad = EXAMPLES["frame_float32"].pixels.copy()
    bad[0, 0] = np.inf
    with pytest.raises(WireError, match="NaN or infinite pixels"):
        wire.Frame(frame_id=1, acquired_ns=0, view=EXAMPLES["frame_float32"].view, pixels=bad)


def test_non_finite_json_numbers():
    parts = encode(EXAMPLES["tracker_sample"])
    assert b'"quality":0.25' in parts[0]
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        _reject([parts[0].replace(b'"quality":0.25', b'"quality":' + literal)], "non-finite")


def test_non_rigid_and_nan_poses():
    parts = encode(EXAMPLES["tracker_sample"])
    header = _header(parts)
    header["T_tracker_from_tool"][0][0] *= 1.1
    _reject(_with_header(parts, header), "tracker_sample from .tracker.: .T_tracker_from_tool. rotation")
    header = _header(parts)
    header["T_tracker_from_tool"][3] = [0.0, 0.0, 1.0, 1.0]
    _reject(_with_header(parts, header), "last row")
    header = _header(parts)
    header["T_tracker_from_tool"] = [[1.0, 0.0], [0.0, 1.0]]
    _reject(_with_header(parts, header), "must be 4x4")
    with pytest.raises(WireError, match="NaN"):
        wire.TrackerSample(tool_id="x", T_tracker_from_tool=np.full((4, 4), np.nan), quality=0,
                           acquired_ns=0)
    parts = encode(EXAMPLES["pose_result_ok"])
    header = _header(parts)
    header["views"][1]["T_cam_from_world"][1][1] = -1.0  # reflection: det < 0
    _reject(_with_header(parts, header), r"views\[1\].T_cam_from_world' rotation")


@pytest.mark.parametrize("change, match", [
    ({"frame_id": "7"}, "'frame_id' must be an integer, got str"),
    ({"frame_id": True}, "'frame_id' must be an integer, got bool"),
    ({"frame_id": -1}, "'frame_id' must be >= 0"),
    ({"seq": 1.5}, "'seq' must be an integer"),
    ({"confidence": 1.5}, r"'confidence' must lie in \[0.0, 1.0\]"),
    ({"mode": "fast"}, "'mode' must be one of global, tracking"),
    ({"status": "failed"}, "'T_world_corrected_from_world' must be .* null when .* 'failed'"),
    ({"T_world_corrected_from_world": None}, "'T_world_corrected_from_world' must be given"),
    ({"views": [{"T_other": np.eye(4).tolist()}]}, r"'views\[0\]' is missing 'T_cam_from_world'"),
    ({"latency_ms": {"register": -1.0}}, "'latency_ms.register' must lie in"),
    ({"level_poses": [1, 2]}, "'level_poses' must be an object"),
    ({"similarity": "high"}, "'similarity' must be a number"),
    ({"uncertainty_depth_mm": -1.0}, r"'uncertainty_depth_mm' must lie in \[0.0, "),
    ({"extra_field": 1}, "unexpected field"),
])
def test_ill_typed_fields(change, match):
    parts = encode(EXAMPLES["pose_result_ok"])
    _reject(_with_header(parts, {**_header(parts), **change}), "pose_result from .pipeline.: " + match)


def test_missing_fields():
    parts = encode(EXAMPLES["instrument_state"])
    header = _header(parts)
    del header["tool_id"], header["tip_world"]
    _reject(_with_header(parts, header), r"missing field\(s\) tip_world, tool_id")
    header = _header(parts)
    del header["plan_level"]  # optional: defaults to None
    assert decode(_with_header(parts, header)).plan_level is None


def test_instrument_state_checks():
    parts = encode(EXAMPLES["instrument_state"])
    for change, match in [({"axis_world": [0.0, 0.0, 2.0]}, "unit vector"),
                          ({"tip_world": [1.0, 2.0]}, r"shape \(3,\)"),
                          ({"angle_to_trajectory_deg": 190.0}, "angle_to_trajectory_deg"),
                          ({"tool_id": ""}, "'tool_id' must not be empty"),
                          ({"uncertainty_depth_mm": -1.0}, r"'uncertainty_depth_mm' must lie in \[0.0, ")]:
        _reject(_with_header(parts, {**_header(parts), **change}), match)


def test_overlay_checks():
    parts = encode(EXAMPLES["overlay"])
    _reject(_with_header(parts, {**_header(parts), "encoding": "jpeg"}), "jpeg file signature")
    _reject(_with_header(parts, {**_header(parts), "encoding": "gif"}),
            "'encoding' must be one of png, jpeg")
    header = _header(parts)
    header["buffers"][0]["dtype"] = "uint16"
    header["buffers"][0]["shape"] = [len(PNG) // 2]
    _reject(_with_header(parts, header), "'data' must be a 1-D uint8 buffer")


def test_heartbeat_stats_checks():
    with pytest.raises(WireError, match="'stats.fps' must be finite"):
        wire.Heartbeat(role="sim", state="running", stats={"fps": float("inf")})
    with pytest.raises(WireError, match="'stats.list' must be a number, string, bool or null"):
        wire.Heartbeat(role="sim", state="running", stats={"list": [1, 2]})


def test_encode_rejects_unregistered_objects():
    with pytest.raises(WireError, match="not a registered message kind"):
        encode(wire.Message())


# ---------------------------------------------------------------------------------------
# Hostile input: the cases a reliability probe found, then a seeded fuzz


def _set_path(header, path, value):
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return header


@pytest.mark.parametrize("path, value, match", [
    (("view", "pixel_spacing_mm"), ["a", "b"], "frame from 'sim': bad view geometry: 'view'"),
    (("view", "I0"), [1, 2], "frame from 'sim': bad view geometry"),
    (("view", "source_to_detector_mm"), 10 ** 400, "frame from 'sim': bad view geometry"),
    (("buffers", 0, "shape"), [1] * 70, "frame from 'sim': buffer 0: shape must be a list of at most 4"),
    (("buffers", 0, "shape"), [2 ** 63, 0], "frame from 'sim': 'buffer 0 shape' must be <="),
    (("acquired_ns",), 2 ** 64, "frame from 'sim': 'acquired_ns' must be <="),
    (("ground_truth", "T_cam_from_world"), [[10 ** 400] * 4] * 4, "'ground_truth.T_cam_from_world' must be"),
])
def test_probe_cases_are_wire_errors_naming_kind_sender_and_field(path, value, match):
    parts = encode(EXAMPLES["frame_uint16"])
    header = _set_path(_header(parts), path, value)
    with pytest.raises(WireError, match=match) as info:
        decode([json.dumps(header).encode(), *parts[1:]])
    assert (info.value.kind, info.value.sender) == ("frame", "sim")


def test_empty_image_and_huge_strings_are_refused():
    parts = encode(EXAMPLES["frame_uint8_no_gt"])
    header = _header(parts)
    header["buffers"][0].update(shape=[0, 24], nbytes=0, crc32=0)
    _reject([json.dumps(header).encode(), b""], "non-empty 2-D image")
    parts = encode(EXAMPLES["heartbeat"])
    _reject(_with_header(parts, {**_header(parts), "state": "x" * 5000}), "'state' is longer than 4096")


_JUNK = [None, True, -1, 0, 2 ** 63, 2 ** 64, -(2 ** 70), 1e308, 0.5, "", "a", "x" * 5000, [], [1, 2],
         ["a", "b"], [[1] * 4] * 4, [[[0]]] * 3, {}, {"a": 1}, {"T_cam_from_world": 1}, [1] * 70]


def _leaves(value, path=()):
    """Every (path, value) of a JSON tree, containers included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list) and len(value) <= 8:
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))


def _mutate(rng, parts):
    """One random corruption of an encoded message: header JSON edits, byte flips,
    truncation, part count or type changes, or pure noise."""
    parts = list(parts)
    choice = rng.integers(8)
    if choice <= 2:  # replace a value somewhere in the header by junk
        header = _header(parts)
        leaves = list(_leaves(header))[1:]
        path, _ = leaves[rng.integers(len(leaves))]
        _set_path(header, path, _JUNK[rng.integers(len(_JUNK))])
        parts[0] = json.dumps(header).encode()
    elif choice == 3:  # drop or add a header key
        header = _header(parts)
        keys = list(header)
        if rng.random() < 0.5:
            header.pop(keys[rng.integers(len(keys))])
        else:
            header[f"k{rng.integers(5)}"] = _JUNK[rng.integers(len(_JUNK))]
        parts[0] = json.dumps(header).encode()
    elif choice == 4:  # flip bytes in a part
        i = int(rng.integers(len(parts)))
        data = bytearray(parts[i])
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[rng.integers(len(data))] = int(rng.integers(256))
        parts[i] = bytes(data)
    elif choice == 5:  # truncate a part
        i = int(rng.integers(len(parts)))
        parts[i] = parts[i][: int(rng.integers(len(parts[i]) + 1))]
    elif choice == 6:  # too few / too many / non-bytes parts
        parts = [parts[:-1], parts + [b"x"], parts + parts, [None, *parts[1:]], [3.5]][rng.integers(5)]
    else:  # noise
        parts = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
    return parts


def test_fuzz_decode_only_ever_raises_wire_error():
    """Thousands of random and mutated messages (seeded): each decodes to a valid message
    that re-encodes to itself, or raises WireError, never anything else."""
    rng = np.random.default_rng(20240611)
    encoded = [encode(m) for m in EXAMPLES.values()]
    accepted = rejected = 0
    for _ in range(4000):
        parts = _mutate(rng, encoded[rng.integers(len(encoded))])
        try:
            msg = decode(parts)
        except WireError as exc:
            assert str(exc)
            rejected += 1
            continue
        assert decode(encode(msg)).kind == msg.kind
        accepted += 1
    assert rejected > 3000 and accepted > 0  # the fuzz both breaks messages and leaves some valid
