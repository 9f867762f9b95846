"""Calibration entry points for the main CLI (run_guidance.py): plain functions that
calibrate, write the calibration JSON and a PNG report next to it (same name, ``.png``)
and return a summary dict.

With ``simulate=True`` each function first writes simulated inputs into a folder next to
the output (``<out stem>_inputs/``: images with their nominal ``*.view.json`` files, or a
poses file) and then calibrates from those files exactly as from real ones; the summary
then also holds the errors against the simulated truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from calibration.carm import (
    CarmCalibrationResult,
    build_angle_table,
    calibrate_carm_image,
    interpolate_view,
    sagging_carm_view,
)
from calibration.distortion import (
    calibrate_distortion_image,
    ii_distortion,
    simulate_grid_image,
)
from calibration.errors import CalibrationError
from calibration.files import (
    carm_calibration,
    distortion_calibration,
    distortion_model,
    pivot_calibration_record,
    read_calibration,
    write_calibration,
)
from calibration.phantom_bb import (
    nominal_T_cam_from_phantom,
    read_phantom,
    simulate_bb_image,
    two_plane_phantom,
)
from calibration.pivot import pivot_calibration, read_poses, simulate_pivot_poses, write_poses
from calibration.report import render_pivot, render_residuals, write_png
from guidance.core.geometry import (
    GeometryError,
    check_rigid,
    invert_rigid,
    make_rigid,
    project,
    rotation_about_axis,
)
from guidance.core.images import read_xray
from guidance.core.jsonfile import read_json
from guidance.core.views import View, carm_view, read_view, view_path_for, write_view

__all__ = ["calibrate_carm", "calibrate_distortion", "calibrate_pivot"]

SIM_I0 = 10000.0
PHANTOM_POSE_FILE = "phantom_pose.json"


def _inputs_dir(out: Path) -> Path:
    """``dir/carm.calibration.json`` -> ``dir/carm_inputs/`` (created)."""
    d = out.with_name(out.name.split(".")[0] + "_inputs")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_counts(path: Path, raw: np.ndarray) -> None:
    cv2.imwrite(str(path), np.clip(np.round(raw), 0, 65535).astype(np.uint16))


def _simulate_carm_inputs(out: Path, seed: int, angles: list[tuple[float, float]],
                          missing_fraction: float, spurious_fraction: float,
                          background: str) -> tuple[list[Path], dict]:
    """Simulated phantom exposures of a sagging C-arm; returns image paths and the truth
    (views by angle, T_world_from_phantom, base SDD and principal point)."""
    rng = np.random.default_rng(seed)
    phantom = two_plane_phantom()
    # The phantom lies at the isocentre, roughly aligned with the AP beam.
    placement = make_rigid(rotation_about_axis(rng.standard_normal(3), rng.uniform(0.5, 1.5)),
                           rng.uniform(-5.0, 5.0, 3))
    T_world_from_phantom = invert_rigid(carm_view().T_cam_from_world) @ \
        nominal_T_cam_from_phantom() @ placement
    sdd = 1000.0 + rng.uniform(-15.0, 15.0)
    pp = (255.5 + rng.uniform(-6.0, 6.0), 255.5 + rng.uniform(-6.0, 6.0))
    folder = _inputs_dir(out)
    paths, truth = [], {}
    for k, (lao, cran) in enumerate(angles):
        view = sagging_carm_view(lao, cran, source_to_detector_mm=sdd, principal_point_px=pp,
                                 intensity="raw", I0=SIM_I0)
        sim = simulate_bb_image(phantom, view, view.T_cam_from_world @ T_world_from_phantom,
                                seed=seed * 1000 + k, missing_fraction=missing_fraction,
                                spurious_fraction=spurious_fraction, background=background)
        tag = f"lao{lao:+g}_cran{cran:+g}".replace(".", "p")
        path = folder / f"carm_{tag}.png"
        _write_counts(path, sim.raw)
        nominal = carm_view(lao_deg=lao, cranial_deg=cran, intensity="raw", I0=SIM_I0)
        write_view(View(K=nominal.K, T_cam_from_world=nominal.T_cam_from_world,
                        image_size=nominal.image_size, intensity="raw", I0=SIM_I0,
                        pixel_spacing_mm=nominal.pixel_spacing_mm,
                        source_to_detector_mm=nominal.source_to_detector_mm,
                        extra={"lao_deg": float(lao), "cranial_deg": float(cran)}),
                   view_path_for(path))
        paths.append(path)
        truth[float(lao), float(cran)] = view
    (folder / PHANTOM_POSE_FILE).write_text(json.dumps(
        {"T_world_from_phantom": T_world_from_phantom.tolist()}, indent=1) + "\n")
    return paths, {"views": truth, "T_world_from_phantom": T_world_from_phantom,
                   "sdd_mm": sdd, "pp_px": pp}


def _phantom_pose(value: np.ndarray | str | Path | None, first_image: Path) -> np.ndarray:
    """T_world_from_phantom: given, read from a JSON file (key ``T_world_from_phantom``),
    or from ``phantom_pose.json`` beside the first image; identity if there is none."""
    if value is None:
        found = first_image.parent / PHANTOM_POSE_FILE
        if not found.exists():
            return np.eye(4)
        value = found
    if isinstance(value, (str, Path)):
        try:
            value = read_json(value, what="phantom pose", error=CalibrationError)["T_world_from_phantom"]
        except (KeyError, TypeError) as exc:
            raise CalibrationError(f"cannot read T_world_from_phantom from {value}: "
                                   f"{exc!r}") from None
    try:
        return check_rigid(np.asarray(value, dtype=float), "T_world_from_phantom")
    except (GeometryError, ValueError) as exc:
        raise CalibrationError(str(exc)) from None


def _mosaic(tiles: list[np.ndarray], columns: int = 3) -> np.ndarray:
    """Tiles (same size, BGR) arranged in rows of ``columns``."""
    if len(tiles) == 1:
        return tiles[0]
    blank = np.zeros_like(tiles[0])
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    rows = [np.hstack(r + [blank] * (columns - len(r))) for r in rows]
    return np.vstack(rows)


def calibrate_carm(images: list[str | Path] | None = None, simulate: bool = False,
                   out: str | Path = "carm.calibration.json", seed: int = 0, *,
                   device_id: str = "carm-sim", phantom: str | Path | None = None,
                   angles: list[tuple[float, float]] | None = None,
                   T_world_from_phantom: np.ndarray | str | Path | None = None,
                   source_to_isocenter_mm: float = 600.0,
                   distortion: str | Path | None = None, missing_fraction: float = 0.1,
                   spurious_fraction: float = 0.05, background: str = "plates") -> dict:
    """C-arm geometry calibration from BB-phantom exposures.

    ``images``: exposures (PNG/TIFF counts or any SimpleITK format), each with its nominal
    geometry in ``<name>.view.json`` beside it (K, T_cam_from_world = nominal camera pose,
    intensity/I0, and for several orientations ``lao_deg`` / ``cranial_deg``). One image
    gives a single-orientation calibration (``T_cam_from_phantom``); several give an angle
    table. The phantom (``guidance.bbphantom/1`` file, default: the two-plane design) sits
    at ``T_world_from_phantom`` (a 4x4 matrix or a JSON file with that key; default: the
    ``phantom_pose.json`` beside the first image, else world = phantom frame).
    ``distortion``: a distortion calibration file whose model corrects the detected BB
    centres.

    ``simulate``: make the exposures instead (``angles`` default [(0, 0)]) with
    ``missing_fraction`` / ``spurious_fraction`` BBs and ``background``, with the
    phantom's (known) pose in ``phantom_pose.json``.

    Returns a summary: paths, per-orientation SDD (mm), principal point (px), RMS (px), BB
    counts, and with ``simulate`` the errors against the truth.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth = None
    if simulate:
        images, truth = _simulate_carm_inputs(out, seed, angles or [(0.0, 0.0)],
                                              missing_fraction, spurious_fraction, background)
    if not images:
        raise CalibrationError("give calibration images or simulate=True")
    ph = two_plane_phantom() if phantom is None else read_phantom(phantom)
    T_wp = _phantom_pose(T_world_from_phantom, Path(images[0]))
    undistort = None
    if distortion is not None:
        undistort = distortion_model(read_calibration(distortion)).undistort_points
    results: list[tuple[float | None, float | None, CarmCalibrationResult]] = []
    tiles, entries, spacing = [], [], None
    for path in map(Path, images):
        vpath = view_path_for(path)
        if not vpath.exists():
            raise CalibrationError(f"no nominal view file {vpath} for image {path}")
        nominal = read_view(vpath)
        spacing = nominal.pixel_spacing_mm or spacing
        image = read_xray(path).astype(np.float64)
        res = calibrate_carm_image(image, ph, nominal, nominal.T_cam_from_world @ T_wp,
                                   undistort=undistort, seed=seed)
        lao, cran = nominal.extra.get("lao_deg"), nominal.extra.get("cranial_deg")
        results.append((lao, cran, res))
        sdd = res.source_to_detector_mm(spacing) if spacing else None
        entry = {"image": str(path), "lao_deg": lao, "cranial_deg": cran, "sdd_mm": sdd,
                 "principal_point_px": res.K[:2, 2].tolist(), "rms_px": res.rms_px,
                 "n_bbs": int(len(res.bb_index)), "n_detected": int(len(res.detections)),
                 "n_rejected": int(len(res.outlier_uv))}
        if truth is not None:
            tv = truth["views"][float(lao), float(cran)]
            entry["sdd_error_pct"] = 100.0 * (sdd - tv.source_to_detector_mm) / \
                tv.source_to_detector_mm
            entry["principal_point_error_px"] = float(np.linalg.norm(res.K[:2, 2]
                                                                     - tv.K[:2, 2]))
        entries.append(entry)
        used = set(res.bb_index.tolist())
        pred = project(res.P, ph.positions_mm)
        W, H = res.image_size
        unmatched = [p for i, p in enumerate(pred) if i not in used
                     and 0 <= p[0] < W and 0 <= p[1] < H]
        tiles.append(render_residuals(image, res.uv, res.residuals_px,
                                      unmatched_uv=np.array(unmatched).reshape(-1, 2),
                                      rejected_uv=res.outlier_uv, zoom=1.0 if len(images) > 1
                                      else 2.0, title=path.name))
    if spacing is None:
        raise CalibrationError("the nominal view files must give pixel_spacing_mm")
    table = None
    if len(results) > 1:
        if any(a is None or c is None for a, c, _ in results):
            raise CalibrationError("several images need lao_deg and cranial_deg in their view "
                                   "files to form an angle table")
        table = build_angle_table(results, pixel_spacing_mm=spacing,
                                  source_to_isocenter_mm=source_to_isocenter_mm,
                                  T_world_from_phantom=T_wp)
    cal = carm_calibration(device_id=device_id, pixel_spacing_mm=spacing,
                           result=results[0][2] if table is None else None, table=table,
                           method=f"bb-phantom {ph.name}: Hungarian matching, normalised DLT, "
                                  f"least-squares refinement")
    write_calibration(cal, out)
    png = write_png(out.with_suffix(".png"), _mosaic(tiles))
    summary = {"kind": "carm", "calibration": str(out), "report_png": str(png),
               "device_id": device_id, "n_images": len(results), "simulated": simulate,
               "rms_px": float(max(e["rms_px"] for e in entries)), "entries": entries}
    if truth is not None and table is not None:
        summary["interpolation_mpd_px"] = _interpolation_check(table, truth, seed)
    return summary


def _interpolation_check(table, truth: dict, seed: int) -> float:
    """Mean projection distance (px) between interpolated and true views at five random
    in-between angles, over points in a 120 mm cube at the isocentre."""
    rng = np.random.default_rng(seed)
    laos, crans = table.lao_values, table.cranial_values
    pts = rng.uniform(-60.0, 60.0, (200, 3))
    dists = []
    for _ in range(5):
        a, c = rng.uniform(laos[0], laos[-1]), rng.uniform(crans[0], crans[-1])
        tv = sagging_carm_view(a, c, source_to_detector_mm=truth["sdd_mm"],
                               principal_point_px=truth["pp_px"])
        v = interpolate_view(table, a, c)
        dists.append(np.linalg.norm(project(v.P, pts) - project(tv.P, pts), axis=1).mean())
    return float(np.mean(dists))


def calibrate_distortion(images: str | Path | list[str | Path] | None = None,
                         simulate: bool = False,
                         out: str | Path = "distortion.calibration.json", seed: int = 0, *,
                         device_id: str = "ii-sim", degree: int | None = 5,
                         amplitude_px: float = 10.0, image_size: tuple[int, int] = (512, 512),
                         intensity: str = "raw", I0: float | None = None) -> dict:
    """Image-intensifier distortion calibration from one dot-grid plate exposure.

    ``images``: the exposure (or a one-element list). ``degree``: polynomial degree, None
    to choose by held-out RMS. ``simulate``: make the exposure (``amplitude_px`` of
    pincushion at the image edge, plus S-distortion) of ``image_size``.

    Returns a summary with the held-out RMS (px) by degree, the largest correction and,
    with ``simulate``, the RMS error against the true distortion (px, after the best
    similarity, which the C-arm calibration absorbs).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth = None
    if simulate:
        truth = ii_distortion(image_size, amplitude_px=amplitude_px)
        sim = simulate_grid_image(truth, image_size, seed=seed)
        images = _inputs_dir(out) / "distortion_grid.png"
        _write_counts(images, sim.raw)
    if images is None:
        raise CalibrationError("give a dot-grid image or simulate=True")
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if len(paths) != 1:
        raise CalibrationError(f"distortion calibration takes one dot-grid image, got "
                               f"{len(paths)}")
    image = read_xray(paths[0]).astype(np.float64)
    res = calibrate_distortion_image(image, intensity=intensity, I0=I0, degree=degree,
                                     seed=seed)
    residuals = {"heldout_rms_px": res.heldout_rms_px,
                 "fit_rms_px": float(np.sqrt((res.residuals_px ** 2).sum(axis=1).mean())),
                 "max_correction_px": res.max_correction_px, "n_dots": int(len(res.uv))}
    cal = distortion_calibration(res.model, device_id=device_id, residuals=residuals,
                                 method=f"dot grid, polynomial degree {res.model.degree}, "
                                        f"5-fold held-out residuals")
    write_calibration(cal, out)
    png = write_png(out.with_suffix(".png"), render_residuals(
        image, res.uv, res.residuals_px, scale=100.0, radius_px=4.0,
        title=f"{paths[0].name}: distortion fit residuals"))
    summary = {"kind": "distortion", "calibration": str(out), "report_png": str(png),
               "device_id": device_id, "simulated": simulate, "degree": res.model.degree,
               "heldout_by_degree": {str(k): v for k, v in res.heldout_by_degree.items()},
               "n_outliers": res.n_outliers, **residuals}
    if truth is not None:
        und = res.model.undistort_points(sim.nodes_distorted)
        S, _ = cv2.estimateAffinePartial2D(und, sim.nodes_undistorted)
        err = und @ S[:, :2].T + S[:, 2] - sim.nodes_undistorted
        summary["truth_rms_px"] = float(np.sqrt((err ** 2).sum(axis=1).mean()))
    return summary


def calibrate_pivot(poses_file: str | Path | None = None, simulate: bool = False,
                    out: str | Path = "pivot.calibration.json", seed: int = 0, *,
                    device_id: str = "pointer-sim", method: str = "linear",
                    n_poses: int = 200, noise_mm: float = 0.25) -> dict:
    """Pivot calibration of a tracked tool from a poses file (``read_poses`` formats).

    ``simulate``: make ``n_poses`` noisy poses (``noise_mm`` per marker coordinate).
    Returns a summary with the tip offset (tool frame, mm), pivot point (tracker frame,
    mm), RMS (mm), the other method's tip for comparison and, with ``simulate``, the tip
    error against the truth (mm).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth = None
    if simulate:
        truth = simulate_pivot_poses(n_poses=n_poses, marker_noise_mm=noise_mm, seed=seed)
        poses_file = _inputs_dir(out) / "pivot_poses.json"
        write_poses(truth.T_tracker_from_tool, poses_file)
    if poses_file is None:
        raise CalibrationError("give a poses file or simulate=True")
    T = read_poses(poses_file)
    res = pivot_calibration(T, method=method)
    other = pivot_calibration(T, method="sphere" if method == "linear" else "linear")
    cal = pivot_calibration_record(res, device_id=device_id, n_poses=len(T))
    write_calibration(cal, out)
    png = write_png(out.with_suffix(".png"), render_pivot(
        res.residuals_mm, title=f"{device_id}: pivot ({method})"))
    summary = {"kind": "pivot", "calibration": str(out), "report_png": str(png),
               "device_id": device_id, "simulated": simulate, "n_poses": int(len(T)),
               "method": method, "tip_offset_mm": res.tip_offset_mm.tolist(),
               "pivot_point_mm": res.pivot_point_mm.tolist(), "rms_mm": res.rms_mm,
               f"{other.method}_tip_difference_mm": float(np.linalg.norm(
                   other.tip_offset_mm - res.tip_offset_mm))}
    if truth is not None:
        summary["tip_error_mm"] = float(np.linalg.norm(res.tip_offset_mm - truth.tip_offset_mm))
    return summary
