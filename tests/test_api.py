"""The public API: ``import guidance`` and the README's five-line example, run as written."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

import guidance
from guidance.core.geometry import make_rigid, rotation_about_axis
from guidance.core.images import stretch_raw, write_xray
from guidance.core.views import carm_view, write_view
from guidance.evaluation.metrics import mean_projection_distance, target_points
from sim.phantom import make_phantom, write_phantom
from sim.xray import XrayParams, simulate_xray

README = Path(__file__).resolve().parent.parent / "README.md"


def five_line_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- five-line-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its five-line example"
    return match.group(1)


def test_the_readme_example_has_five_lines():
    assert len(five_line_example().strip().splitlines()) == 5


def test_every_public_name_resolves():
    for name in guidance.__all__:
        assert getattr(guidance, name) is not None
    with pytest.raises(AttributeError):
        guidance.no_such_name


def test_the_readme_example_registers_a_phantom_shot(tmp_path, monkeypatch):
    """A shot of the phantom whose view file is 5 mm / 2 deg off: the example's result
    projects the spine within 1 mm of the truth (mPD at the isocentre; one view sees
    depth only through magnification, so mTRE is not the measure here)."""
    phantom = make_phantom(seed=0, spacing_mm=2.0)
    write_phantom(phantom, tmp_path)
    iso = phantom.T_world_from_vertebra["L3"][:3, 3]
    truth = carm_view(lao_deg=10.0, cranial_deg=5.0, detector_size_px=(128, 128), pixel_spacing_mm=(2.4, 2.4),
                      isocenter_world=iso, patient_position="prone")
    image, view = simulate_xray(phantom.ct, truth, XrayParams(seed=3), intensity="raw")
    image, view = stretch_raw(image, view)
    write_xray(image, tmp_path / "shot.png")
    P = make_rigid(rotation_about_axis([0.0, 0.0, 1.0], 2.0), [4.0, 0.0, 3.0])
    write_view(view.with_pose(view.T_cam_from_world @ P), tmp_path / "shot.view.json")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(five_line_example(), namespace)
    result = namespace["result"]
    targets = target_points(phantom.ct, labels=phantom.labels, seed=0)
    start = view.with_pose(view.T_cam_from_world @ P)
    assert mean_projection_distance(start, truth, targets)[1] > 4.0
    assert result.ok, result.reason
    assert mean_projection_distance(result.views[0], truth, targets)[1] < 1.0


def test_import_changes_nothing_in_the_environment():
    """In a fresh interpreter: importing guidance leaves os.environ as it was."""
    import subprocess
    import sys

    code = "import os; e = dict(os.environ); import guidance; assert dict(os.environ) == e"
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_register_accepts_arrays_and_views(tmp_path):
    """Arrays and View objects in, the same as files: a 1-pixel image that does not fit its
    view is refused with a domain error."""
    ct = make_phantom(seed=0, spacing_mm=2.0).ct
    view = carm_view(detector_size_px=(64, 64), isocenter_world=ct.center_world())
    with pytest.raises(guidance.GuidanceError, match="64x64"):
        guidance.register(ct, [np.zeros((1, 1), np.float32)], [view])
