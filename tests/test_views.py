import json
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.core.geometry import project, transform_points
from guidance.core.views import (
    View,
    ViewError,
    carm_view,
    read_view,
    view_from_dict,
    view_path_for,
    view_to_dict,
    write_view,
)


@pytest.mark.parametrize("position", ["supine", "prone"])
@pytest.mark.parametrize("lao,cran", [(0, 0), (90, 0), (-30, 15), (45, -20)])
def test_carm_isocenter_on_principal_ray_at_distance(position, lao, cran):
    iso = np.array([12.0, -40.0, 300.0])
    view = carm_view(lao_deg=lao, cranial_deg=cran, isocenter_world=iso, source_to_isocenter_mm=620.0,
                     source_to_detector_mm=1020.0, detector_size_px=(400, 300), patient_position=position)
    p_cam = transform_points(view.T_cam_from_world, iso)
    assert_allclose(p_cam[:2], [0, 0], atol=1e-9)
    assert p_cam[2] == pytest.approx(620.0)
    assert_allclose(project(view.P, iso[None]), [[199.5, 149.5]], atol=1e-9)
    assert np.linalg.norm(view.source_world - iso) == pytest.approx(620.0)


def test_carm_ap_supine_ray_points_anterior_and_head_up():
    view = carm_view(isocenter_world=(0, 0, 0))
    assert_allclose(view.principal_ray_world, [0, -1, 0], atol=1e-12)
    head = project(view.P, np.array([[0, 0, 50.0]]))[0]
    feet = project(view.P, np.array([[0, 0, -50.0]]))[0]
    assert head[1] < feet[1]  # head towards the top of the image


def test_carm_lateral_and_prone_directions():
    lat = carm_view(lao_deg=90)
    assert_allclose(lat.principal_ray_world, [1, 0, 0], atol=1e-12)  # towards patient's left
    prone = carm_view(patient_position="prone")
    assert_allclose(prone.principal_ray_world, [0, 1, 0], atol=1e-12)  # beam enters anterior
    cran = carm_view(cranial_deg=20)
    assert cran.principal_ray_world[2] == pytest.approx(np.sin(np.deg2rad(20)))


def test_view_file_round_trip(tmp_path):
    view = carm_view(lao_deg=20, intensity="raw", I0=4095.0)
    path = tmp_path / "a.view.json"
    write_view(view, path)
    back = read_view(path)
    assert_allclose(back.K, view.K)
    assert_allclose(back.T_cam_from_world, view.T_cam_from_world)
    assert back.image_size == view.image_size and back.I0 == 4095.0
    assert json.loads(path.read_text())["schema"] == "guidance.view/1"


def test_view_from_projection_matrix():
    view = carm_view(lao_deg=33, cranial_deg=-7)
    d = {"schema": "guidance.view/1", "image_size": [512, 512], "P": (2.5 * view.P).tolist(),
         "intensity": "line_integral"}
    back = view_from_dict(d)
    assert_allclose(back.K, view.K, atol=1e-8)
    assert_allclose(back.T_cam_from_world, view.T_cam_from_world, atol=1e-9)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"schema": "guidance.view/2"}, "schema"),
        ({"image_size": [512]}, "image_size"),
        ({"intensity": "xray"}, "line_integral, raw, display"),
        ({"K": [[1, 0], [0, 1]]}, "'K'"),
        ({"T_cam_from_world": np.diag([2.0, 1, 1, 1]).tolist()}, "rotation"),
        ({"intensity": "raw"}, "I0"),
    ],
)
def test_bad_view_dicts(change, message):
    d = view_to_dict(carm_view())
    d.update(change)
    with pytest.raises(ViewError, match=message):
        view_from_dict(d)


def test_read_view_errors(tmp_path):
    with pytest.raises(ViewError, match="not found"):
        read_view(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ViewError, match="not valid JSON"):
        read_view(bad)


def test_downsampled_and_cropped_views_project_consistently():
    view = carm_view(detector_size_px=(512, 512))
    pts = np.random.default_rng(0).uniform(-50, 50, (20, 3))
    uv = project(view.P, pts)
    half = view.downsampled(2)
    assert half.image_size == (256, 256)
    assert_allclose(project(half.P, pts), (uv - 0.5) / 2.0, atol=1e-9)
    win = view.cropped(100, 50, 64, 32)
    assert win.image_size == (64, 32)
    assert_allclose(project(win.P, pts), uv - [100, 50], atol=1e-9)


def test_view_rejects_bad_k():
    with pytest.raises(ViewError, match="positive"):
        View(K=np.diag([-1.0, 1.0, 1.0]), T_cam_from_world=np.eye(4), image_size=(10, 10))


def test_views_compare_by_value_and_hash_alike():
    a = carm_view(lao_deg=20.0, detector_size_px=(64, 48))
    b = carm_view(lao_deg=20.0, detector_size_px=(64, 48))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert read_view_round_trip(a) == a
    shifted = a.T_cam_from_world.copy()
    shifted[0, 3] += 0.5
    assert a.with_pose(shifted) != a
    assert a.with_intensity("raw", I0=4095.0) != a
    assert a != "a view"


def read_view_round_trip(view):
    return view_from_dict(json.loads(json.dumps(view_to_dict(view))))


def test_view_path_for_strips_the_image_suffix():
    assert view_path_for("out/shot.png") == Path("out/shot.view.json")
    assert view_path_for("ct.nii.gz") == Path("ct.view.json")
    assert view_path_for("shot.v2.tif") == Path("shot.v2.view.json")
