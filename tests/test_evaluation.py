"""Tests of the evaluation harness: metrics against known answers, start generation,
benchmark folders on disk, the runner and the report (phantom at 2 mm, tiny detectors)."""

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from guidance.evaluation import benchmark as ev
from guidance.evaluation import metrics, runners
from guidance.core.geometry import make_rigid, rotation_angle_deg, transform_points
from guidance.registration.register import RegistrationSettings
from guidance.core.views import carm_view
from sim.phantom import make_phantom

TARGETS = np.array([[0.0, 0.0, 0.0], [20.0, -10.0, 5.0], [-15.0, 30.0, -25.0], [5.0, 5.0, 40.0]])


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0, spacing_mm=2.0)


@pytest.fixture
def view():
    return carm_view(lao_deg=30.0, cranial_deg=10.0, source_to_detector_mm=1100.0, source_to_isocenter_mm=650.0,
                     detector_size_px=(128, 128), pixel_spacing_mm=(2.4, 2.4), patient_position="prone")


# ------------------------------------------------------------------------------ metrics


def test_ground_truth_has_zero_error(view):
    assert metrics.mtre(view.T_cam_from_world, view.T_cam_from_world, TARGETS) == 0.0
    assert metrics.mean_projection_distance(view, view, TARGETS) == (0.0, 0.0)


@pytest.mark.parametrize("t", [(3.0, 0.0, 0.0), (0.0, -4.0, 0.0), (1.0, 2.0, -2.0)])
def test_mtre_of_a_translation_is_its_length(view, t):
    T_est = view.T_cam_from_world @ make_rigid(np.eye(3), t)  # the world moved by t
    assert_allclose(metrics.mtre(T_est, view.T_cam_from_world, TARGETS), np.linalg.norm(t), rtol=1e-12)


@pytest.mark.parametrize("shift", [(1.5, 0.0), (0.0, -2.0), (1.0, 1.0)])
def test_mpd_at_isocenter_of_an_in_plane_shift_is_the_shift(view, shift):
    T_est = make_rigid(np.eye(3), (*shift, 0.0)) @ view.T_cam_from_world  # shift across the image
    detector, iso = metrics.mean_projection_distance(view.with_pose(T_est), view, TARGETS)
    assert_allclose(iso, np.hypot(*shift), rtol=1e-9)
    depth = transform_points(view.T_cam_from_world, TARGETS)[:, 2]
    assert_allclose(detector, np.mean(np.hypot(*shift) * 1100.0 / depth), rtol=1e-9)


def test_mpd_at_detector_needs_a_pixel_pitch(view):
    from dataclasses import replace

    bare = replace(view, pixel_spacing_mm=None, source_to_detector_mm=None)
    T_est = make_rigid(np.eye(3), (1.0, 0.0, 0.0)) @ view.T_cam_from_world
    detector, iso = metrics.mean_projection_distance(bare.with_pose(T_est), bare, TARGETS)
    assert np.isnan(detector) and iso == pytest.approx(1.0)


def test_target_points_lie_in_the_requested_anatomy(phantom):
    for level in (None, 29):
        X = metrics.target_points(phantom.ct, labels=phantom.labels, level=level, max_points=200, seed=1)
        assert X.shape == (200, 3)
        ijk = np.rint(phantom.labels.world_to_index(X)).astype(int)
        found = phantom.labels.data[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
        assert np.all(found > 0) if level is None else np.all(found == level)
    X = metrics.target_points(phantom.ct, max_points=100)
    ijk = np.rint(phantom.ct.world_to_index(X)).astype(int)
    assert np.all(phantom.ct.data[ijk[:, 2], ijk[:, 1], ijk[:, 0]] > 200.0)
    with pytest.raises(ValueError, match="label map"):
        metrics.target_points(phantom.ct, level=29)


def test_success_rates_and_capture_range_on_known_arrays():
    rng = np.random.default_rng(0)
    initial = np.concatenate([rng.uniform(lo, hi, 10) for lo, hi in ev.DEFAULT_BINS])
    final = np.full(50, 0.5)
    final[40:42] = 5.0  # 2 of 10 fail in 20-30 mm: 80%
    rates = metrics.success_rates(initial, final)
    assert [r["rate"] for r in rates] == [1.0, 1.0, 1.0, 1.0, 0.8]
    assert [r["n"] for r in rates] == [10] * 5 and rates[-1]["n_success"] == 8
    assert metrics.capture_range(initial, final) == 20.0
    assert metrics.capture_range(initial, np.full(50, 2.0)) == 0.0  # 2 mm is not a success
    assert metrics.success_rates([1.0], [0.1], bins=((0, 5), (5, 10)))[1] == {
        "bin_mm": [5.0, 10.0], "n": 0, "n_success": 0, "rate": None}
    with pytest.raises(ValueError, match="differ in length"):
        metrics.success_rates([1.0, 2.0], [1.0])


def test_summarize_counts_the_quality_gate():
    def record(initial, final, status):
        return {"initial_mtre_mm": initial, "final_mtre_mm": final, "mpd_isocenter_mm": final / 2,
                "time_s": 1.0, "status": status, "bin_mm": [0.0, 5.0] if initial < 5 else [5.0, 10.0]}

    records = [record(3, 0.5, "ok"), record(4, 9.0, "failed"), record(6, 1.0, "failed"), record(7, 8.0, "ok")]
    s = ev.summarize(records)
    assert s["n_cases"] == 4 and s["success_rate"] == 0.5
    assert [b["rate"] for b in s["bins"]] == [0.5, 0.5] and s["capture_range_mm"] == 0.0
    assert s["quality_gate"] == {"failed_rate": 0.5, "ok_correct": 1, "ok_wrong": 1, "failed_correct": 1,
                                 "failed_wrong": 1, "wrong_among_ok": 0.5, "ok_among_correct": 0.5}
    assert s["prepare_s"] == {"median": None, "max": None}  # records without a preparation time
    assert s["final_mtre_mm"]["median"] == pytest.approx(4.5)
    assert s["uncertainty_coverage"]["depth"] == {"n": 0, "within_2_sigma": 0, "rate": None}
    # The uncertainty's honesty: errors of 0.5 and 3 mm against 1 mm sigmas (and one unbounded).
    for r, (error, sd) in zip(records, [(0.5, 1.0), (3.0, 1.0), (0.1, None), (1.9, 1.0)]):
        r |= {"centre_error_in_plane_mm": error / 4, "uncertainty_in_plane_mm": 0.25,
              "centre_error_depth_mm": error, "uncertainty_depth_mm": sd}
    coverage = ev.summarize(records)["uncertainty_coverage"]
    assert coverage["depth"] == {"n": 3, "within_2_sigma": 2, "rate": pytest.approx(2 / 3)}
    assert coverage["in_plane"] == {"n": 4, "within_2_sigma": 3, "rate": 0.75}


# ------------------------------------------------------------------------------ starts


def test_perturbation_has_the_requested_mtre_and_bounded_rotation():
    rng = np.random.default_rng(3)
    centre = TARGETS.mean(axis=0)
    for m in (0.5, 7.0, 29.0):
        P = ev.perturbation(TARGETS, centre, m, rng=rng, max_rotation_deg=10.0)
        assert metrics.mtre(P, np.eye(4), TARGETS) == pytest.approx(m, rel=1e-6)
        assert rotation_angle_deg(P) <= 10.0 + 1e-9


@pytest.fixture(scope="module")
def small_set(phantom):
    bins = ((0.0, 5.0), (10.0, 15.0), (20.0, 30.0))
    return bins, ev.make_benchmark_set(phantom.ct, labels=phantom.labels, n_views=2, n_starts_per_bin=3, bins=bins,
                                       intensity="raw", detector_px=64, seed=5)


def test_starts_fall_inside_their_bins(small_set):
    bins, cases = small_set
    assert len(cases) == 2 * 3 * 3
    for case in cases:
        lo, hi = case.bin_mm
        assert lo <= case.initial_mtre() < hi
        # One world-frame perturbation per case: T_init = T_gt @ P.
        P = np.linalg.inv(case.views_gt[0].T_cam_from_world) @ case.views_init[0].T_cam_from_world
        assert rotation_angle_deg(P) <= 15.0 + 1e-9
    counts = [sum(c.bin_mm == b for c in cases) for b in bins]
    assert counts == [6, 6, 6]
    assert cases[0].images[0].dtype == np.uint16 and cases[0].views_gt[0].intensity == "raw"


def test_biplane_cases_share_one_perturbation(phantom):
    cases = ev.make_benchmark_set(phantom.ct, labels=phantom.labels, n_views=1, n_starts_per_bin=1,
                                  bins=((5.0, 10.0),), detector_px=32, biplane=True, intensity="line_integral")
    (case,) = cases
    rays = [v.principal_ray_world for v in case.views_gt]
    assert 75.0 < np.degrees(np.arccos(abs(rays[0] @ rays[1]))) <= 90.0
    P = [np.linalg.inv(g.T_cam_from_world) @ i.T_cam_from_world for g, i in zip(case.views_gt, case.views_init)]
    assert_allclose(P[0], P[1], atol=1e-9)


def test_bad_options_are_rejected(phantom):
    with pytest.raises(ValueError, match="line_integral, raw, display"):
        ev.make_benchmark_set(phantom.ct, intensity="dicom", n_views=1, n_starts_per_bin=1)
    with pytest.raises(ValueError, match="jobs"):
        runners.run_benchmark([], phantom.ct, jobs=0)


# ------------------------------------------------------------------------------ files


@pytest.mark.parametrize("variant, suffix", [("raw", ".png"), ("display", ".png"), ("line_integral", ".mha")])
def test_benchmark_set_round_trips_through_disk(phantom, tmp_path, variant, suffix):
    cases = ev.make_benchmark_set(phantom.ct, labels=phantom.labels, level=29, n_views=2, n_starts_per_bin=2,
                                  bins=((0.0, 5.0),), intensity=variant, detector_px=32, seed=2)
    index = ev.write_benchmark_set(cases, tmp_path)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"view_000{suffix}", f"view_001{suffix}"]
    assert [p.name for p in tmp_path.glob("targets*.json")] == ["targets.json"]
    loaded = ev.load_benchmark_set(tmp_path)
    assert index.name == "cases.json" and len(loaded) == len(cases)
    for a, b in zip(cases, loaded):
        assert (a.case_id, a.view_ids, a.level, a.bin_mm) == (b.case_id, b.view_ids, b.level, b.bin_mm)
        assert_allclose(b.targets_world, a.targets_world)
        for ia, ib in zip(a.images, b.images):
            assert ib.dtype == ia.dtype and np.array_equal(ia, ib)
        for va, vb in zip(a.views_init + a.views_gt, b.views_init + b.views_gt):
            assert_allclose(vb.T_cam_from_world, va.T_cam_from_world, atol=1e-12)
            assert_allclose(vb.K, va.K) and vb.intensity == va.intensity and vb.I0 == va.I0


def test_external_set_with_shared_targets_file(small_set, tmp_path):
    _, cases = small_set
    ev.write_benchmark_set(cases[:2], tmp_path)
    index = json.loads((tmp_path / "cases.json").read_text())
    index["targets"] = "targets.json"  # one file for all cases, no bins
    for entry in index["cases"]:
        del entry["targets"], entry["bin_mm"]
    (tmp_path / "cases.json").write_text(json.dumps(index))
    loaded = ev.load_benchmark_set(tmp_path)
    assert [c.bin_mm for c in loaded] == [None, None]
    assert loaded[0].initial_mtre() == pytest.approx(cases[0].initial_mtre())
    del index["targets"]
    (tmp_path / "cases.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing 'targets'"):
        ev.load_benchmark_set(tmp_path)


# ------------------------------------------------------------------------------ runner


def test_run_benchmark_registers_biplane_cases_and_reports(phantom, tmp_path):
    cases = ev.make_benchmark_set(phantom.ct, labels=phantom.labels, n_views=1, n_starts_per_bin=2,
                                  bins=((4.0, 6.0),), intensity="raw", detector_px=128, biplane=True, seed=1)
    records = runners.run_benchmark(cases, phantom.ct, labels=phantom.labels, jobs=1, progress=False)
    assert [r["case_id"] for r in records] == [c.case_id for c in cases]
    for r in records:
        assert 4.0 <= r["initial_mtre_mm"] < 6.0
        assert r["final_mtre_mm"] < 2.0 and r["success"]
        assert r["mpd_isocenter_mm"] < 1.0 and r["n_views"] == 2
        assert r["centre_error_in_plane_mm"] < 1.0 and r["centre_error_depth_mm"] < 2.0
    summary = ev.summarize(records)
    assert summary["bins"][0]["rate"] == 1.0 and summary["capture_range_mm"] == 6.0
    paths = ev.write_report(summary, records, tmp_path, title="test")
    for name in ("summary.json", "records.json", "report.md", "success_rate.png", "final_mtre.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads(paths["summary"].read_text())["n_cases"] == 2
    assert "| 4-6 | 2 | 2 | 100% |" in paths["report"].read_text()
    assert "| centre error within 2 sigma, depth |" in paths["report"].read_text()


def test_evaluate_writes_a_report_per_variant(phantom, tmp_path):
    settings = RegistrationSettings(pyramid=(2, 1), n_candidates=2)
    summaries = ev.evaluate(phantom, out_dir=tmp_path, level="L3", intensities=("display",), n_views=1,
                            n_starts_per_bin=1, bins=((0.0, 5.0),), detector_px=64, settings=settings,
                            progress=False)
    assert list(summaries) == ["display"] and summaries["display"]["n_cases"] == 1
    assert (tmp_path / "display" / "report.md").is_file() and (tmp_path / "display" / "set" / "cases.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["display"]["n_cases"] == 1


def test_progress_line():
    assert runners.progress_line(5, 10, 12.0, width=10) == "\r[#####.....] 5/10 cases  12 s, ~12 s left"
    assert runners.progress_line(0, 10, 0.0, width=10) == "\r[..........] 0/10 cases  0 s"
