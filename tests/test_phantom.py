"""Synthetic lumbar phantom: anatomy sizes, orientation, determinism, plan, files."""

import json
import time

import numpy as np
import pytest

from guidance.core.geometry import invert_rigid, transform_points
from guidance.core.volume import load_volume
from guidance.core.levels import LEVEL_LABELS, LUMBAR
from guidance.core.plan import PLAN_SCHEMA, PlanError, plan_from_dict, read_plan, write_plan
from sim.phantom import make_phantom, write_phantom


@pytest.fixture(scope="module")
def timed_build():
    """The default phantom (1 mm, seed 0) and the seconds it took to build."""
    start = time.perf_counter()
    p = make_phantom(seed=0)
    return p, time.perf_counter() - start


@pytest.fixture(scope="module")
def phantom(timed_build):
    return timed_build[0]


@pytest.fixture(scope="module")
def coarse():
    return make_phantom(seed=3, spacing_mm=2.0, include_sacrum=True)


def local_voxels(p, level):
    """Voxel centres (N, 3) of a level's label in that vertebra's own frame (mm)."""
    k, j, i = np.nonzero(p.labels.data == p.levels[level])
    world = p.labels.index_to_world(np.column_stack([i, j, k]))
    return transform_points(invert_rigid(p.T_world_from_vertebra[level]), world)


def extent(values, spacing):
    """Size (mm) covered by voxels: centre-to-centre range plus one voxel."""
    return float(np.ptp(values)) + spacing


def labels_along(p, trajectory, skip_mm=1.5, step_mm=0.25):
    """Labels of the voxels nearest to points on the entry-target segment."""
    entry = np.array(trajectory["entry_world"])
    target = np.array(trajectory["target_world"])
    length = np.linalg.norm(target - entry)
    s = np.arange(skip_mm, length - skip_mm, step_mm)
    pts = entry + s[:, None] * (target - entry) / length
    idx = np.rint(p.labels.world_to_index(pts)).astype(int)
    return p.labels.data[idx[:, 2], idx[:, 1], idx[:, 0]]


def test_grid_size_speed_and_types(timed_build):
    phantom, seconds = timed_build
    ct, labels = phantom.ct, phantom.labels
    assert seconds < 2.0
    assert ct.units == "HU" and labels.units == "label"
    assert ct.data.dtype == np.float32 and labels.data.dtype == np.uint8
    assert ct.data.shape == labels.data.shape
    np.testing.assert_array_equal(ct.T_world_from_index, labels.T_world_from_index)
    np.testing.assert_allclose(ct.direction, np.eye(3))
    np.testing.assert_allclose(ct.spacing, 1.0)
    fov = np.array(ct.size_ijk) * ct.spacing
    assert np.all(fov > [180, 140, 180]) and np.all(fov < [240, 200, 240]), fov
    assert ct.data.nbytes < 40e6
    assert phantom.levels == {n: LEVEL_LABELS[n] for n in LUMBAR}


def test_levels_present_with_plausible_volume(phantom):
    for level in LUMBAR:
        volume_mm3 = np.count_nonzero(phantom.labels.data == phantom.levels[level])
        assert 35e3 < volume_mm3 < 70e3, (level, volume_mm3)
    assert set(np.unique(phantom.labels.data)) == {0, 27, 28, 29, 30, 31}


def test_body_sizes_within_anatomical_ranges(phantom):
    for level in LUMBAR:
        q = local_voxels(phantom, level)
        width = extent(q[q[:, 1] < 0, 0], 1.0)  # anterior half: body only
        depth = extent(q[(np.abs(q[:, 0]) < 4) & (np.abs(q[:, 2]) < 5) & (q[:, 1] < 25), 1], 1.0)
        height = extent(q[(np.abs(q[:, 0]) < 5) & (np.abs(q[:, 1]) < 8), 2], 1.0)
        span = extent(q[:, 0], 1.0)  # transverse process tips
        assert 40.0 <= width <= 50.0, (level, width)
        assert 29.0 <= depth <= 36.0, (level, depth)
        assert 25.0 <= height <= 30.5, (level, height)
        assert 65.0 <= span <= 100.0, (level, span)
        # The spinous process points posteriorly, 50-75 mm behind the body centre.
        assert 50.0 < q[:, 1].max() < 75.0, (level, q[:, 1].max())


def test_orientation_lps(phantom):
    centroids = {}
    for level in LUMBAR:
        k, j, i = np.nonzero(phantom.labels.data == phantom.levels[level])
        centroids[level] = phantom.labels.index_to_world(
            np.array([[i.mean(), j.mean(), k.mean()]]))[0]
    z = [centroids[n][2] for n in LUMBAR]
    assert all(a > b + 25 for a, b in zip(z[:-1], z[1:])), z  # L1 most superior
    for level in LUMBAR:
        T = phantom.T_world_from_vertebra[level]
        assert T[2, 2] > 0.9 and T[1, 1] > 0.9  # vertebra z up, y posterior
        assert abs(centroids[level][0]) < 3.0  # midline


def test_tissue_values(phantom):
    ct, lab = phantom.ct.data, phantom.labels.data
    assert ct[0, -1, 0] == pytest.approx(-1000.0)  # posterior corner: air behind the back
    for level in LUMBAR:
        T = phantom.T_world_from_vertebra[level]
        centre = np.rint(phantom.ct.world_to_index(T[:3, 3])[0]).astype(int)
        assert 200.0 <= ct[centre[2], centre[1], centre[0]] <= 300.0  # cancellous core
        bone = ct[lab == phantom.levels[level]]
        assert 1200.0 <= bone.max() <= 1800.0  # cortical shell
    # Disc between L3 and L4 bodies.
    mid = (phantom.T_world_from_vertebra["L3"][:3, 3] + phantom.T_world_from_vertebra["L4"][:3, 3])
    idx = np.rint(phantom.ct.world_to_index(mid / 2)[0]).astype(int)
    assert 80.0 <= ct[idx[2], idx[1], idx[0]] <= 100.0
    assert lab[idx[2], idx[1], idx[0]] == 0
    soft = ct[(lab == 0) & (ct > -200) & (ct < 200)]
    assert np.median(soft) == pytest.approx(40.0, abs=5)  # muscle
    assert np.count_nonzero(np.abs(ct + 100) < 1) > 1e5  # subcutaneous fat


def test_deterministic_from_seed():
    a = make_phantom(seed=7, spacing_mm=2.0, levels=("L2", "L3"))
    b = make_phantom(seed=7, spacing_mm=2.0, levels=("L2", "L3"))
    c = make_phantom(seed=8, spacing_mm=2.0, levels=("L2", "L3"))
    np.testing.assert_array_equal(a.ct.data, b.ct.data)
    np.testing.assert_array_equal(a.labels.data, b.labels.data)
    assert a.plan == b.plan
    assert a.ct.data.shape != c.ct.data.shape or not np.array_equal(a.ct.data, c.ct.data)
    assert a.plan != c.plan
    assert set(np.unique(a.labels.data)) == {0, 29, 30}


def test_plan_lies_in_own_pedicle_and_body(phantom):
    plan = phantom.plan
    expected = [(n, side) for n in LUMBAR for side in ("left", "right")]
    assert [(t["level"], t["side"]) for t in plan] == expected
    for t in plan:
        labels = labels_along(phantom, t)
        assert np.all(labels == t["label"]), (t["level"], t["side"], np.unique(labels))
        assert 4.5 <= t["screw_diameter_mm"] <= 7.5
        # 6 mm behind the posterior body wall the trajectory crosses a pedicle: bone of
        # its label only 6-12.5 mm wide across it (canal medially, soft tissue laterally).
        T = phantom.T_world_from_vertebra[t["level"]]
        q = local_voxels(phantom, t["level"])
        wall = q[(np.abs(q[:, 0]) < 4) & (np.abs(q[:, 2]) < 5) & (q[:, 1] < 25), 1].max()
        e, g = transform_points(invert_rigid(T), np.array([t["entry_world"], t["target_world"]]))
        point = e + (g - e) * (wall + 6.0 - e[1]) / (g[1] - e[1])
        offsets = np.arange(-10.0, 10.01, 0.25)
        across = transform_points(T, point + offsets[:, None] * [1.0, 0.0, 0.0])
        idx = np.rint(phantom.labels.world_to_index(across)).astype(int)
        inside = phantom.labels.data[idx[:, 2], idx[:, 1], idx[:, 0]] == t["label"]
        assert inside[40] and not inside[0] and not inside[-1]
        width = 0.25 * (np.argmin(inside[40:]) + np.argmin(inside[40::-1]))
        assert 6.0 <= width <= 12.5, (t["level"], t["side"], width)


def test_plan_geometry(phantom):
    for t in phantom.plan:
        T = phantom.T_world_from_vertebra[t["level"]]
        entry, target = np.array(t["entry_world"]), np.array(t["target_world"])
        direction = (target - entry) / np.linalg.norm(target - entry)
        assert 40.0 < np.linalg.norm(target - entry) < 60.0
        # Parallel to the vertebra's endplates (its own tilt), aimed anteriorly.
        assert abs(direction @ T[:3, 2]) < 1e-4
        assert direction @ T[:3, 1] < -0.9
        # Converging medially by 8-18 degrees.
        sign = 1.0 if t["side"] == "left" else -1.0
        lateral = sign * (direction @ T[:3, 0])
        assert 8.0 < np.degrees(np.arcsin(-lateral)) < 18.0, t
        e_local, t_local = transform_points(invert_rigid(T), np.array([entry, target]))
        assert sign * e_local[0] > sign * t_local[0] > 0  # same side of the midline
        # Target in the anterior third of the body, entry behind the canal.
        q = local_voxels(phantom, t["level"])
        y_mid = q[(np.abs(q[:, 0]) < 4) & (np.abs(q[:, 2]) < 5) & (q[:, 1] < 25), 1]
        depth = extent(y_mid, 1.0)
        assert y_mid.min() < t_local[1] < y_mid.min() + depth / 3
        assert e_local[1] > 30.0


def test_lordosis_and_scoliosis_angles():
    def l1_l5_angle(p, drop):
        """Angle (deg) between the L1 and L5 axes projected along world axis ``drop``."""
        a, b = (p.T_world_from_vertebra[n][:3, 2].copy() for n in ("L1", "L5"))
        a[drop] = b[drop] = 0.0
        return np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))

    flat = make_phantom(spacing_mm=3.0, lordosis_deg=0.0, variation=0.0)
    curved = make_phantom(spacing_mm=3.0, lordosis_deg=40.0, variation=0.0)
    scoliotic = make_phantom(spacing_mm=3.0, lordosis_deg=30.0, scoliosis_deg=20.0, variation=0.0)
    assert l1_l5_angle(flat, drop=0) == pytest.approx(0.0, abs=1e-6)
    assert l1_l5_angle(curved, drop=0) == pytest.approx(40.0, abs=0.05)
    assert l1_l5_angle(curved, drop=1) == pytest.approx(0.0, abs=1e-6)
    assert l1_l5_angle(scoliotic, drop=1) == pytest.approx(20.0, abs=0.05)
    # Lordosis: L1 tilts posteriorly, L5 anteriorly; the mid lumbar bodies lie anterior.
    T = curved.T_world_from_vertebra
    assert T["L1"][1, 2] > 0 > T["L5"][1, 2]
    assert T["L3"][1, 3] < min(T["L1"][1, 3], T["L5"][1, 3]) - 5
    # Positive scoliosis: convex to the patient's left (+x) at the apex.
    T = scoliotic.T_world_from_vertebra
    assert T["L3"][0, 3] > max(T["L1"][0, 3], T["L5"][0, 3]) + 2


def test_coarse_grid_and_sacrum(coarse):
    np.testing.assert_allclose(coarse.ct.spacing, 2.0)
    assert coarse.levels["sacrum"] == 25
    volumes = {n: np.count_nonzero(coarse.labels.data == i) * 8.0 for n, i in coarse.levels.items()}
    assert all(35e3 < volumes[n] < 70e3 for n in LUMBAR), volumes
    assert volumes["sacrum"] > 60e3
    k_l5 = np.nonzero(coarse.labels.data == 27)[0].mean()
    k_s = np.nonzero(coarse.labels.data == 25)[0].mean()
    assert k_s < k_l5 - 15  # sacrum below L5 (2 mm slices)
    for t in coarse.plan:
        assert np.mean(labels_along(coarse, t) == t["label"]) > 0.95


def test_invalid_arguments():
    with pytest.raises(ValueError, match="L1, L2, L3, L4, L5"):
        make_phantom(levels=("L6",))
    with pytest.raises(ValueError, match="contiguous"):
        make_phantom(levels=("L1", "L3"))
    with pytest.raises(ValueError, match="spacing_mm"):
        make_phantom(spacing_mm=0.0)
    with pytest.raises(ValueError, match="L5"):
        make_phantom(levels=("L2", "L3"), include_sacrum=True)


def test_write_read_round_trip(tmp_path):
    p = make_phantom(seed=2, spacing_mm=2.5, levels=("L4", "L5"))
    paths = write_phantom(p, tmp_path / "case")
    assert {k: v.name for k, v in paths.items()} == {
        "ct": "ct.nii.gz", "labels": "labels.nii.gz", "plan": "plan.json",
        "interbody_plan": "interbody_plan.json"}
    ct = load_volume(paths["ct"])
    labels = load_volume(paths["labels"], units="label")
    np.testing.assert_array_equal(ct.data, p.ct.data)
    np.testing.assert_array_equal(labels.data, p.labels.data)
    assert labels.data.dtype == np.uint8
    np.testing.assert_allclose(ct.T_world_from_index, p.ct.T_world_from_index, atol=1e-6)
    assert read_plan(paths["plan"]) == p.plan
    assert read_plan(paths["interbody_plan"]) == p.interbody_plan
    assert json.loads(paths["plan"].read_text())["schema"] == PLAN_SCHEMA


GOOD = {"level": "L3", "label": 29, "side": "left", "entry_world": [20.0, 40.0, 5.0],
        "target_world": [9.0, -8.0, 5.0], "screw_diameter_mm": 6.5}


@pytest.mark.parametrize("change, message", [
    ({"schema": "guidance.plan/0"}, "unsupported plan schema"),
    ({"trajectories": {}}, "'trajectories' must be a list"),
    ({"trajectories": [{k: v for k, v in GOOD.items() if k != "side"}]},
     r"trajectories\[0\] is missing 'side'"),
    ({"trajectories": [dict(GOOD, side="middle")]}, "'side' must be one of left, right"),
    ({"trajectories": [dict(GOOD, label=28)]}, "label 28 does not match level L3"),
    ({"trajectories": [GOOD, dict(GOOD, entry_world=[1, 2])]},
     r"trajectories\[1\]: 'entry_world' must be 3 finite numbers"),
    ({"trajectories": [dict(GOOD, target_world=GOOD["entry_world"])]}, "less than 1 mm apart"),
    ({"trajectories": [dict(GOOD, screw_diameter_mm="6.5")]}, "'screw_diameter_mm' must be"),
])
def test_bad_plan_files_raise_clear_errors(tmp_path, change, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": PLAN_SCHEMA, "trajectories": [GOOD], **change}))
    with pytest.raises(ValueError, match=message):
        read_plan(path)


def test_plan_file_errors_and_round_trip(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        read_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        read_plan(tmp_path / "bad.json")
    write_plan([GOOD], tmp_path / "ok.json")
    assert read_plan(tmp_path / "ok.json") == [GOOD]
    assert plan_from_dict({"schema": PLAN_SCHEMA, "trajectories": []}) == []
