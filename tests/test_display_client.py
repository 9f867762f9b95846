"""guidance.live.display_client over real loopback sockets with CURVE: fake poses never
reach the screen, real ones do."""

import threading
import time

import numpy as np
import pytest

from guidance.core.views import carm_view
from guidance.live.display import HeadlessWriter
from guidance.live.display_client import run_display
from guidance.live.keys import CurveKeys, load_keys, make_keys
from guidance.live.transport import Publisher, free_tcp_endpoint
from guidance.live.wire import Frame, PoseResult
from sim.phantom import make_phantom

VIEW = carm_view(detector_size_px=(64, 64), pixel_spacing_mm=(4.0, 4.0))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=3.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    make_keys(folder)
    outsider = tmp_path_factory.mktemp("outsider")
    make_keys(outsider, roles=("pipeline",))
    own = load_keys(outsider, "pipeline")
    real = {role: load_keys(folder, role) for role in ("sim", "pipeline", "display")}
    # The outsider knows every public key (they are public) but holds no accepted secret key.
    real["outsider"] = CurveKeys(role="pipeline", public=own.public, secret=own.secret,
                                 peers=dict(real["display"].peers))
    return real


def _show_while_publishing(tmp_path, phantom, keys, result_keys, *, source="pipeline", seconds=1.5):
    """Run the display (with the display's keys) while a frame source (sim keys) and a
    result publisher (``result_keys``, None: plain) send fresh frames and ok poses."""
    frame_ep, result_ep = free_tcp_endpoint(), free_tcp_endpoint()
    stop = threading.Event()
    out = {}
    frame_pub = Publisher(frame_ep, keys=keys["sim"])
    result_pub = Publisher(result_ep, keys=result_keys)
    thread = threading.Thread(target=lambda: out.update(run_display(
        frame_endpoint=frame_ep, result_endpoint=result_ep, ct=phantom.ct, plan=phantom.plan,
        sink=HeadlessWriter(tmp_path), stop=stop, refresh_hz=10.0, size=(480, 320), keys=keys["display"])))
    thread.start()
    try:
        end = time.monotonic() + seconds
        frame_id = 0
        while time.monotonic() < end:
            frame_id += 1
            now = time.time_ns()
            frame_pub.send(Frame(frame_id=frame_id, acquired_ns=now, view=VIEW, source="sim",
                                 pixels=np.full((64, 64), 1000, np.uint16)))
            result_pub.send(PoseResult(frame_id=frame_id, status="ok", reason="converged", confidence=1.0,
                                       T_world_corrected_from_world=np.eye(4), mode="tracking",
                                       frame_acquired_ns=now, source=source))
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
        frame_pub.close()
        result_pub.close()
    return out


def test_fake_poses_without_the_key_never_reach_the_display(tmp_path, phantom, keys):
    fake = _show_while_publishing(tmp_path / "fake", phantom, keys, keys["outsider"])
    assert fake["screens"] > 5 and fake["status_counts"].get("ok", 0) == 0
    plain = _show_while_publishing(tmp_path / "plain", phantom, keys, None)
    assert plain["status_counts"].get("ok", 0) == 0
    real = _show_while_publishing(tmp_path / "real", phantom, keys, keys["pipeline"])
    assert real["status_counts"].get("ok", 0) > 3
    # The right key but another publisher id: ignored too.
    other = _show_while_publishing(tmp_path / "other", phantom, keys, keys["pipeline"], source="intruder")
    assert other["status_counts"].get("ok", 0) == 0 and other["ignored"] > 0
