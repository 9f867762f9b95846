"""Evaluation harness: accuracy metrics, benchmark sets, a parallel runner and reports.

Standard 2D/3D methodology (CONVENTIONS.md, "Accuracy metrics"): a benchmark case is
one registration problem (one view, or a biplane pair) with a ground-truth pose per
view, an initial guess per view and target points X_k (world LPS mm) inside the
anatomy of interest. Errors are measured on the targets, which the optimiser never
sees:

- mTRE: mean over X_k of ``|| T_est X_k - T_gt X_k ||`` (mm, camera frame);
- mPD: mean distance between the projections of X_k under the estimated and the
  true view, in mm at the detector and scaled to the plane of the target;
- success: mTRE < 2 mm; success rate per initial-mTRE bin; capture range: the
  largest initial-mTRE bin whose success rate is at least 95%.

Test images are rendered so that they differ from what registration renders (no
"inverse crime"): from the full CT (soft tissue included; registration renders bone
only), at a finer sampling step, with another effective energy of the HU ->
attenuation map, then through ``sim.xray.form_image`` (Poisson noise, detector blur,
the intensity variant).

A benchmark set on disk is a folder: ``cases.json`` lists the cases; each case names,
per view, its image (raw: 16-bit PNG, display: 8-bit PNG, line integral: float .mha),
its ground-truth view file and its initial-guess view file (``*.view.json``), and a
targets file (JSON list of [x, y, z] world points). Researchers can score their own
data by writing that layout by hand (see ``load_benchmark_set``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
import scipy.optimize

from guidance.core.drr import prepare_volume, render_drr
from guidance.core.geometry import make_rigid, project, rotation_about_axis, transform_points
from guidance.core.images import POLARITIES, preprocess, read_xray, write_xray
from guidance.registration.register import RegistrationSettings, Registrator
from guidance.core.views import View, carm_view, read_view, write_view
from guidance.core.volume import Volume, VolumeError, hu_to_attenuation, load_volume
from guidance.core.levels import LEVEL_LABELS
from sim.phantom import Phantom
from sim.xray import XrayParams, form_image

__all__ = [
    "BENCHMARK_SCHEMA",
    "DEFAULT_BINS",
    "SUCCESS_MM",
    "CAPTURE_MIN_RATE",
    "VARIANTS",
    "BenchmarkCase",
    "mtre",
    "mean_projection_distance",
    "target_points",
    "success_rates",
    "capture_range",
    "perturbation",
    "make_benchmark_set",
    "write_benchmark_set",
    "load_benchmark_set",
    "score_case",
    "run_benchmark",
    "summarize",
    "write_report",
    "evaluate",
    "evaluate_external",
]

log = logging.getLogger(__name__)

BENCHMARK_SCHEMA = "guidance.benchmark/1"
DEFAULT_BINS = ((0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 30.0))
SUCCESS_MM = 2.0
CAPTURE_MIN_RATE = 0.95
VARIANTS = ("raw", "display", "line_integral")

# Test image formation, chosen to differ from registration (RegistrationSettings:
# 60 keV, bone only, one-voxel step).
TEST_ENERGY_KEV = 70.0
TEST_STEP_FRACTION = 0.4
RAW_I0 = 30000.0  # unattenuated level of the 16-bit raw images (headroom for noise)
AEC_PHOTONS = 1000.0  # automatic exposure control: mean photons per pixel behind the patient
BODY_MARGIN_MM = 60.0  # soft tissue added beyond the faces of the CT box that cut the body
SOFT_TISSUE_CAP_HU = 100.0
DETECTOR_MM = 307.2  # detector side: 256 px at 1.2 mm, the lumbar spine fills it at ~1.7x
# C-arm angles of successive views (LAO deg): AP, lateral, obliques; each jittered.
_LAO_ANCHORS = (0.0, 90.0, -45.0, 45.0, -90.0, 20.0, -20.0, 65.0, -65.0)


# ------------------------------------------------------------------------------ metrics


def _points(targets_world: np.ndarray) -> np.ndarray:
    X = np.asarray(targets_world, dtype=float).reshape(-1, 3)
    if len(X) == 0 or not np.all(np.isfinite(X)):
        raise ValueError("target points must be a non-empty (N, 3) array of finite world points (mm)")
    return X


def mtre(T_est_cam_from_world: np.ndarray, T_gt_cam_from_world: np.ndarray, targets_world: np.ndarray) -> float:
    """Mean target registration error (mm): mean over the targets X_k (world, (N, 3) mm)
    of ``|| T_est X_k - T_gt X_k ||``, both poses ``T_cam_from_world``."""
    X = _points(targets_world)
    d = transform_points(T_est_cam_from_world, X) - transform_points(T_gt_cam_from_world, X)
    return float(np.mean(np.linalg.norm(d, axis=1)))


def _pixel_pitch(view: View) -> np.ndarray | None:
    """Detector pixel pitch (du, dv) in mm: from the view, or from its SDD and K."""
    if view.pixel_spacing_mm is not None:
        return np.asarray(view.pixel_spacing_mm, dtype=float)
    if view.source_to_detector_mm is not None:
        return view.source_to_detector_mm / np.array([view.K[0, 0], view.K[1, 1]])
    return None


def mean_projection_distance(view_est: View, view_gt: View, targets_world: np.ndarray) -> tuple[float, float]:
    """Mean projection distance of the targets (world, (N, 3) mm) between two views of
    one detector: ``(mpd_detector_mm, mpd_isocenter_mm)``.

    At the detector: pixel distance between ``P_est X_k`` and ``P_gt X_k`` times the pixel
    pitch (NaN when the view gives neither ``pixel_spacing_mm`` nor
    ``source_to_detector_mm``). At the isocentre: that distance scaled by the target's
    depth in the true camera over the source-to-detector distance (computed as the
    offset in normalised image coordinates times depth, so it needs K only).
    """
    X = _points(targets_world)
    d_px = project(view_est.P, X) - project(view_gt.P, X)
    depth = transform_points(view_gt.T_cam_from_world, X)[:, 2]
    d_norm = np.linalg.solve(view_gt.K[:2, :2], d_px.T).T
    iso = float(np.mean(np.linalg.norm(d_norm, axis=1) * depth))
    pitch = _pixel_pitch(view_gt)
    detector = float("nan") if pitch is None else float(np.mean(np.linalg.norm(d_px * pitch, axis=1)))
    return detector, iso


def target_points(
    ct: Volume,
    *,
    labels: Volume | None = None,
    level: int | None = None,
    max_points: int = 500,
    bone_hu: float = 200.0,
    seed: int = 0,
) -> np.ndarray:
    """Target points (M, 3) world mm: voxel centres inside the anatomy of interest.

    With ``labels``: voxels of label ``level``, or of any label (> 0) when ``level`` is
    None. Without: voxels above ``bone_hu`` HU inside the central half of the grid
    along each axis (the spine of a CT centred on it). At most ``max_points``, drawn
    at random (seeded) without replacement.
    """
    if labels is not None:
        if labels.data.shape != ct.data.shape:
            raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {ct.data.shape}")
        mask = labels.data > 0 if level is None else labels.data == level
    elif level is not None:
        raise ValueError("targets of one level need a label map")
    else:
        mask = np.zeros(ct.data.shape, dtype=bool)
        central = tuple(slice(n // 4, n - n // 4) for n in ct.data.shape)
        mask[central] = ct.data[central] > bone_hu
    kk, jj, ii = np.nonzero(mask)
    if len(ii) == 0:
        what = f"label {level}" if level is not None else "bone"
        raise ValueError(f"no voxels of {what} to place target points in")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ii), size=min(max_points, len(ii)), replace=False)
    return ct.index_to_world(np.column_stack([ii[pick], jj[pick], kk[pick]]).astype(float))


def _bin_index(value: float, bins: Sequence[tuple[float, float]]) -> int | None:
    """Index of the half-open bin [lo, hi) holding ``value``, None if outside all."""
    for i, (lo, hi) in enumerate(bins):
        if lo <= value < hi:
            return i
    return None


def success_rates(
    initial_mtre: Sequence[float],
    final_mtre: Sequence[float],
    *,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    success_mm: float = SUCCESS_MM,
) -> list[dict]:
    """Success rate per initial-mTRE bin: one dict per bin with ``bin_mm`` [lo, hi)
    (mm), ``n`` starts, ``n_success`` (final mTRE < ``success_mm``) and ``rate``
    (None for an empty bin). Starts outside every bin are ignored."""
    initial = np.asarray(initial_mtre, dtype=float)
    final = np.asarray(final_mtre, dtype=float)
    if initial.shape != final.shape:
        raise ValueError(f"initial and final mTRE differ in length: {initial.shape} vs {final.shape}")
    which = np.array([_bin_index(v, bins) for v in initial], dtype=object)
    out = []
    for i, (lo, hi) in enumerate(bins):
        inside = which == i
        n = int(inside.sum())
        k = int(np.sum(final[inside] < success_mm))
        out.append({"bin_mm": [float(lo), float(hi)], "n": n, "n_success": k, "rate": k / n if n else None})
    return out


def _capture_range(rates: list[dict], min_rate: float) -> float:
    """Upper edge (mm) of the largest non-empty bin with rate >= ``min_rate`` (0 if none)."""
    edges = [r["bin_mm"][1] for r in rates if r["rate"] is not None and r["rate"] >= min_rate]
    return float(max(edges, default=0.0))


def capture_range(
    initial_mtre: Sequence[float],
    final_mtre: Sequence[float],
    *,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    success_mm: float = SUCCESS_MM,
    min_rate: float = CAPTURE_MIN_RATE,
) -> float:
    """Capture range (mm): the upper edge of the largest initial-mTRE bin whose success
    rate is at least ``min_rate`` (CONVENTIONS.md; empty bins do not count), 0 if none."""
    return _capture_range(success_rates(initial_mtre, final_mtre, bins=bins, success_mm=success_mm), min_rate)


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class BenchmarkCase:
    """One registration problem with its answer (picklable, for process pools).

    ``images[i]`` is the pixel array seen in view i (as stored: uint16 raw, uint8
    display or float32 line integral); ``views_init[i]`` carries the initial guess and
    ``views_gt[i]`` the ground truth ``T_cam_from_world``; ``view_ids[i]`` names the
    acquisition (cases that share an image share its id). ``targets_world`` (N, 3) mm.
    ``level``: label id registered alone, None for the whole CT. ``bin_mm``: the
    initial-mTRE bin the start was drawn for (None for external sets).
    """

    case_id: str
    view_ids: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    views_init: tuple[View, ...]
    views_gt: tuple[View, ...]
    targets_world: np.ndarray
    level: int | None = None
    bin_mm: tuple[float, float] | None = None
    polarity: str = "bone_dark"

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0 or not len(self.view_ids) == len(self.views_init) == len(self.views_gt) == n:
            raise ValueError(f"case {self.case_id}: need one id, image, initial and true view per view")
        for img, v_init, v_gt in zip(self.images, self.views_init, self.views_gt):
            if not img.shape == v_init.shape == v_gt.shape:
                raise ValueError(f"case {self.case_id}: image {img.shape} does not fit its views "
                                 f"{v_init.shape} (initial), {v_gt.shape} (ground truth)")
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}; got {self.polarity!r}")
        object.__setattr__(self, "targets_world", _points(self.targets_world))

    def initial_mtre(self) -> float:
        """mTRE (mm) of the initial guess, mean over the views."""
        return float(np.mean([mtre(vi.T_cam_from_world, vg.T_cam_from_world, self.targets_world)
                              for vi, vg in zip(self.views_init, self.views_gt)]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def perturbation(
    targets_world: np.ndarray,
    centre_world: np.ndarray,
    mtre_mm: float,
    *,
    rng: np.random.Generator,
    max_rotation_deg: float = 15.0,
) -> np.ndarray:
    """A random rigid motion ``P`` of the world about ``centre_world`` (mm) whose mTRE on
    the targets, mean ||P X_k - X_k||, equals ``mtre_mm``.

    Rotation axis and translation direction are uniform on the sphere; a random share
    of the error comes from the rotation (angle at most ``max_rotation_deg``), the
    rest from the translation. A start is ``T_cam_init = T_cam_gt @ P`` for every view
    of a case, so the correction registration should find is ``P`` itself
    (CONVENTIONS.md) and the initial mTRE is ``mtre_mm`` in every view.
    """
    X = _points(targets_world)
    c = np.asarray(centre_world, dtype=float).reshape(3)
    axis, direction = _unit(rng.normal(size=3)), _unit(rng.normal(size=3))
    rel = X - c
    radius = float(np.mean(np.linalg.norm(np.cross(axis, rel), axis=1)))
    share = rng.uniform()
    half_chord = min(1.0, share * mtre_mm / (2.0 * max(radius, 1e-9)))
    angle = min(np.rad2deg(2.0 * np.arcsin(half_chord)), max_rotation_deg)
    R = rotation_about_axis(axis, angle)
    moved = rel @ (R - np.eye(3)).T

    def excess(tau: float) -> float:
        return float(np.mean(np.linalg.norm(moved + tau * direction, axis=1))) - mtre_mm

    tau = 0.0 if excess(0.0) >= 0 else scipy.optimize.brentq(excess, 0.0, 2.0 * mtre_mm, xtol=1e-9)
    return make_rigid(R, c - R @ c + tau * direction)


def _acquisitions(
    centre: np.ndarray, rng: np.random.Generator, *, n_views: int, detector_px: int, biplane: bool
) -> list[tuple[View, ...]]:
    """C-arm geometries (line-integral views): single views spread over AP, lateral and
    obliques, or biplane pairs (AP-ish + lateral-ish, ~90 deg apart, one isocentre)."""
    pitch = DETECTOR_MM / detector_px
    out = []
    for i in range(n_views):
        iso = centre + np.clip(rng.normal(0.0, 5.0, 3), -10.0, 10.0)
        if biplane:
            lao_a = rng.uniform(-10.0, 10.0)
            angles = [(lao_a, rng.uniform(-10.0, 10.0)),
                      (lao_a - 90.0 if lao_a > 0 else lao_a + 90.0, rng.uniform(-10.0, 10.0))]
        else:
            anchor = _LAO_ANCHORS[i] if i < len(_LAO_ANCHORS) else rng.uniform(-90.0, 90.0)
            angles = [(float(np.clip(anchor + rng.uniform(-5.0, 5.0), -90.0, 90.0)), rng.uniform(-20.0, 20.0))]
        out.append(tuple(
            carm_view(lao_deg=lao, cranial_deg=cranial, source_to_detector_mm=rng.uniform(1000.0, 1200.0),
                      source_to_isocenter_mm=rng.uniform(600.0, 700.0), detector_size_px=(detector_px,) * 2,
                      pixel_spacing_mm=(pitch, pitch), isocenter_world=iso, patient_position="prone")
            for lao, cranial in angles
        ))
    return out


def _extended_body(ct: Volume, margin_mm: float) -> Volume:
    """The CT (HU) grown by ``margin_mm`` beyond each face of its box that cuts through
    the body (more than 5% of the face denser than -500 HU), by repeating the face
    voxels capped at ``SOFT_TISSUE_CAP_HU``: a patient does not end where the scan
    does (above and below the scanned range, or beyond a truncated field of view), and
    test images should not show the edges of the scanned box."""
    widths = []
    for axis, spacing in zip(range(3), ct.spacing[::-1]):  # array axes k, j, i
        n = int(np.ceil(margin_mm / spacing))
        cut = [np.mean(np.take(ct.data, end, axis=axis) > -500.0) > 0.05 for end in (0, -1)]
        widths.append((n * cut[0], n * cut[1]))
    data = np.pad(np.minimum(ct.data, SOFT_TISSUE_CAP_HU), widths, mode="edge")
    (k0, _), (j0, _), (i0, _) = widths
    nk, nj, ni = ct.data.shape
    data[k0: k0 + nk, j0: j0 + nj, i0: i0 + ni] = ct.data
    T = ct.T_world_from_index.copy()
    T[:3, 3] = ct.index_to_world(-np.array([i0, j0, k0], dtype=float))[0]
    return Volume(data=data, T_world_from_index=T, units="HU")


def _exposed(line_integral: np.ndarray, xray: XrayParams, seed: int) -> XrayParams:
    """``xray`` with the dose an automatic exposure control sets: ``AEC_PHOTONS`` photons
    per pixel on average over the central quarter of the detector, and a noise seed."""
    H, W = line_integral.shape
    centre = line_integral[H // 4: H - H // 4, W // 4: W - W // 4]
    transmitted = float(np.mean(np.exp(-centre.astype(np.float64))))
    dose = AEC_PHOTONS / (xray.photons_per_pixel_at_unit_dose * max(transmitted, 1e-6))
    return replace(xray, dose=dose, seed=seed)


def _test_image(line_integral: np.ndarray, variant: str, xray: XrayParams) -> np.ndarray:
    """The stored pixels of a simulated acquisition: uint16 raw, uint8 display or
    float32 line integral."""
    if variant == "raw":
        return form_image(line_integral, xray, variant="raw", dtype="uint16")
    return form_image(line_integral, xray, variant=variant)


def make_benchmark_set(
    ct: Volume,
    *,
    labels: Volume | None = None,
    level: int | None = None,
    n_views: int = 6,
    n_starts_per_bin: int = 5,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    variant: str = "raw",
    seed: int = 0,
    detector_px: int = 256,
    biplane: bool = False,
    xray: XrayParams | None = None,
    max_rotation_deg: float = 15.0,
    n_targets: int = 500,
) -> list[BenchmarkCase]:
    """Simulated benchmark cases of a CT (HU): ``n_views`` acquisitions (biplane: pairs)
    x ``len(bins)`` x ``n_starts_per_bin`` starts, deterministic from ``seed``.

    Views: prone patient, C-arm LAO in [-90, 90] (AP, lateral, obliques), cranial in
    [-20, 20] deg, SDD 1000-1200 mm, source-isocentre 600-700 mm, isocentre at the
    targets' centre plus a few mm; a square detector of ``detector_px`` pixels
    covering ``DETECTOR_MM`` (1.2 mm pitch at 256 px). Images: full CT (extended by
    ``BODY_MARGIN_MM`` of soft tissue where its box cuts the body) at
    ``TEST_ENERGY_KEV``, step ``TEST_STEP_FRACTION`` voxel, then ``form_image`` with
    ``xray`` (default: Poisson noise, 0.7 px blur; raw at I0 = ``RAW_I0``) at the dose
    of an exposure control (``AEC_PHOTONS``) and ``variant`` ("raw", "display" or
    "line_integral"). Starts: ``perturbation`` with
    the initial mTRE uniform in each bin [lo, hi) mm. Targets: ``target_points`` of
    ``labels`` / ``level``; ``level`` cases register that label alone.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if n_views < 1 or n_starts_per_bin < 1 or detector_px < 8:
        raise ValueError("need n_views >= 1, n_starts_per_bin >= 1 and detector_px >= 8")
    rng = np.random.default_rng(seed)
    targets = target_points(ct, labels=labels, level=level, max_points=n_targets, seed=seed)
    centre = targets.mean(axis=0)
    mu = prepare_volume(hu_to_attenuation(_extended_body(ct, BODY_MARGIN_MM), energy_kev=TEST_ENERGY_KEV))
    step = TEST_STEP_FRACTION * mu.step_mm
    xray = XrayParams(I0=RAW_I0) if xray is None else xray
    intensity = {"I0": xray.I0} if variant == "raw" else {}
    cases = []
    for a, views in enumerate(_acquisitions(centre, rng, n_views=n_views, detector_px=detector_px,
                                            biplane=biplane)):
        views = tuple(v.with_intensity(variant, **intensity) for v in views)
        ids = tuple(f"view_{a:03d}" + (f"_{'ab'[k]}" if biplane else "") for k in range(len(views)))
        lines = [render_drr(mu, v, step_mm=step) for v in views]
        images = tuple(_test_image(L, variant, _exposed(L, xray, int(rng.integers(2**31)))) for L in lines)
        for lo, hi in bins:
            for s in range(n_starts_per_bin):
                P = perturbation(targets, centre, rng.uniform(lo, hi), rng=rng, max_rotation_deg=max_rotation_deg)
                cases.append(BenchmarkCase(
                    case_id=f"a{a:03d}_bin{lo:g}-{hi:g}_s{s:02d}",
                    view_ids=ids,
                    images=images,
                    views_init=tuple(v.with_pose(v.T_cam_from_world @ P) for v in views),
                    views_gt=views,
                    targets_world=targets,
                    level=level,
                    bin_mm=(float(lo), float(hi)),
                ))
    return cases


# ---------------------------------------------------------------------------- files


def _image_suffix(image: np.ndarray) -> str:
    return ".png" if image.dtype in (np.uint8, np.uint16) else ".mha"


def write_benchmark_set(cases: Sequence[BenchmarkCase], folder: str | Path) -> Path:
    """Write cases as a benchmark folder; returns the path of its ``cases.json``.

    Layout: ``images/<view id>.png|.mha`` and ``views/<view id>.view.json`` (ground
    truth) once per acquisition, ``starts/<case id>.<k>.view.json`` (initial guesses),
    ``targets.json`` (``targets_<n>.json`` for further distinct target sets).
    """
    folder = Path(folder)
    for sub in ("images", "views", "starts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    written: dict[str, tuple[str, str]] = {}
    target_files: dict[bytes, str] = {}
    entries = []
    for case in cases:
        key = hashlib.sha1(case.targets_world.tobytes()).digest()
        if key not in target_files:
            name = "targets.json" if not target_files else f"targets_{len(target_files)}.json"
            (folder / name).write_text(json.dumps(case.targets_world.tolist()) + "\n")
            target_files[key] = name
        views = []
        acquisition = zip(case.view_ids, case.images, case.views_init, case.views_gt)
        for k, (vid, image, v_init, v_gt) in enumerate(acquisition):
            if vid not in written:
                written[vid] = (f"images/{vid}{_image_suffix(image)}", f"views/{vid}.view.json")
                write_xray(image, folder / written[vid][0])
                write_view(v_gt, folder / written[vid][1])
            start = f"starts/{case.case_id}.{k}.view.json"
            write_view(v_init, folder / start)
            views.append({"id": vid, "image": written[vid][0], "ground_truth": written[vid][1], "initial": start})
        entry = {"id": case.case_id, "views": views, "targets": target_files[key], "level": case.level,
                 "polarity": case.polarity}
        if case.bin_mm is not None:
            entry["bin_mm"] = list(case.bin_mm)
        entries.append(entry)
    path = folder / "cases.json"
    path.write_text(json.dumps({"schema": BENCHMARK_SCHEMA, "cases": entries}, indent=1) + "\n")
    return path


def load_benchmark_set(folder: str | Path) -> list[BenchmarkCase]:
    """Read a benchmark folder (``write_benchmark_set``'s, or one written by hand).

    ``cases.json``: ``{"schema": "guidance.benchmark/1", "targets": "targets.json",
    "cases": [{"id": ..., "views": [{"image": ..., "ground_truth": ..., "initial": ...,
    "id": optional}], "targets": optional (else the top-level file), "level": optional
    label id, "polarity": optional ("bone_dark" | "bone_bright", display images),
    "bin_mm": optional [lo, hi]}]}``. Paths are relative to the folder; images in any
    format ``read_xray`` reads, views as guidance.view/1 files, targets a JSON list of
    [x, y, z] world points (mm).
    """
    folder = Path(folder)
    try:
        index = json.loads((folder / "cases.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"no cases.json in benchmark folder {folder}") from None
    if not isinstance(index, dict) or index.get("schema") != BENCHMARK_SCHEMA:
        raise ValueError(f"{folder / 'cases.json'}: expected schema {BENCHMARK_SCHEMA!r}")
    cache: dict[str, object] = {}

    def cached(name: str, reader):
        if name not in cache:
            cache[name] = reader(folder / name)
        return cache[name]

    def targets(path: Path) -> np.ndarray:
        return _points(json.loads(path.read_text()))

    cases = []
    for i, entry in enumerate(index.get("cases", [])):
        where = f"{folder / 'cases.json'}: cases[{i}]"
        try:
            views = entry["views"]
            target_file = entry.get("targets", index.get("targets"))
            if target_file is None:
                raise KeyError("targets")
            cases.append(BenchmarkCase(
                case_id=str(entry["id"]),
                view_ids=tuple(str(v.get("id", Path(v["image"]).stem)) for v in views),
                images=tuple(cached(v["image"], read_xray) for v in views),
                views_init=tuple(read_view(folder / v["initial"]) for v in views),
                views_gt=tuple(cached(v["ground_truth"], read_view) for v in views),
                targets_world=cached(target_file, targets),
                level=entry.get("level"),
                bin_mm=tuple(entry["bin_mm"]) if entry.get("bin_mm") is not None else None,
                polarity=entry.get("polarity", "bone_dark"),
            ))
        except KeyError as exc:
            raise ValueError(f"{where} is missing {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not cases:
        raise ValueError(f"{folder / 'cases.json'} lists no cases")
    return cases


# ---------------------------------------------------------------------------- runner


def score_case(registrator: Registrator, case: BenchmarkCase) -> dict:
    """Register one case and measure it: a JSON-ready record with the initial and final
    mTRE (mm), the final mPD (mm, detector and isocentre; means over the views), the
    registration status, reason, similarity, time (s) and success (mTRE < 2 mm)."""
    images = [preprocess(img, v, polarity=case.polarity) for img, v in zip(case.images, case.views_init)]
    result = registrator.register(images, list(case.views_init), level=case.level)
    final = [mtre(ve.T_cam_from_world, vg.T_cam_from_world, case.targets_world)
             for ve, vg in zip(result.views, case.views_gt)]
    mpd = np.array([mean_projection_distance(ve, vg, case.targets_world)
                    for ve, vg in zip(result.views, case.views_gt)])
    final_mtre = float(np.mean(final))
    return {
        "case_id": case.case_id,
        "level": case.level,
        "bin_mm": None if case.bin_mm is None else list(case.bin_mm),
        "n_views": len(case.images),
        "intensity": case.views_init[0].intensity,
        "initial_mtre_mm": case.initial_mtre(),
        "final_mtre_mm": final_mtre,
        "mpd_detector_mm": float(mpd[:, 0].mean()),
        "mpd_isocenter_mm": float(mpd[:, 1].mean()),
        "status": result.status,
        "reason": result.reason,
        "similarity": float(result.similarity),
        "time_s": float(result.time_s),
        "success": bool(final_mtre < SUCCESS_MM),
    }


_worker_registrator: Registrator | None = None


def _init_worker(ct: Volume, labels: Volume | None, settings: RegistrationSettings | None, threads: int) -> None:
    """Process-pool initializer: one Registrator (the CT prepared once) per worker."""
    global _worker_registrator
    numba.set_num_threads(threads)
    _worker_registrator = Registrator(ct, labels=labels, settings=settings)


def _score_in_worker(case: BenchmarkCase) -> dict:
    return score_case(_worker_registrator, case)


def _progress_line(done: int, total: int, elapsed_s: float, width: int = 30) -> str:
    """``\\r[#####.....] 5/10 cases  12 s, ~12 s left`` (no estimate before the first case)."""
    filled = int(width * done / max(total, 1))
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} cases  {elapsed_s:.0f} s"
    return line + (f", ~{elapsed_s / done * (total - done):.0f} s left" if done else "")


def run_benchmark(
    cases: Sequence[BenchmarkCase],
    ct: Volume,
    *,
    labels: Volume | None = None,
    settings: RegistrationSettings | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Register every case against ``ct`` (HU) and return their records (``score_case``),
    in the order of ``cases``.

    ``jobs`` > 1 uses a pool of that many processes (spawned; each builds one
    Registrator and gets its share of the numba threads); ``jobs`` = 1 runs in this
    process. ``progress`` draws a text bar on stderr.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}")
    records: list[dict | None] = [None] * len(cases)
    t0 = time.perf_counter()

    def report(done: int) -> None:
        if progress:
            sys.stderr.write(_progress_line(done, len(cases), time.perf_counter() - t0))
            sys.stderr.flush()

    report(0)
    if jobs == 1:
        registrator = Registrator(ct, labels=labels, settings=settings)
        for i, case in enumerate(cases):
            records[i] = score_case(registrator, case)
            report(i + 1)
    else:
        threads = max(1, numba.config.NUMBA_NUM_THREADS // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(ct, labels, settings, threads)) as pool:
            futures = {pool.submit(_score_in_worker, case): i for i, case in enumerate(cases)}
            for done, future in enumerate(as_completed(futures), start=1):
                records[futures[future]] = future.result()
                report(done)
    if progress:
        sys.stderr.write("\n")
    return records


# ---------------------------------------------------------------------------- report


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if len(values) else None


def summarize(
    records: Sequence[dict],
    *,
    bins: Sequence[tuple[float, float]] | None = None,
    success_mm: float = SUCCESS_MM,
) -> dict:
    """Aggregate records: success rate overall and per initial-mTRE bin (with counts),
    capture range (mm), median and 95th percentile of the final mTRE (mm), median mPD at
    the isocentre (mm), median and 95th percentile time (s), and the quality gate:
    how often it said ``failed`` and its confusion counts against real failure
    (mTRE >= ``success_mm``): true positives (failed, really failed), false positives
    (failed, actually fine), false negatives (``ok`` but wrong: silent failures) and
    true negatives. ``bins`` defaults to the records' own bins (else DEFAULT_BINS)."""
    if bins is None:
        bins = sorted({tuple(r["bin_mm"]) for r in records if r.get("bin_mm") is not None}) or DEFAULT_BINS
    initial = np.array([r["initial_mtre_mm"] for r in records], dtype=float)
    final = np.array([r["final_mtre_mm"] for r in records], dtype=float)
    mpd_iso = np.array([r["mpd_isocenter_mm"] for r in records], dtype=float)
    times = np.array([r["time_s"] for r in records], dtype=float)
    flagged = np.array([r["status"] != "ok" for r in records], dtype=bool)
    wrong = final >= success_mm
    rates = success_rates(initial, final, bins=bins, success_mm=success_mm)
    return {
        "n_cases": len(records),
        "success_mm": success_mm,
        "success_rate": float(np.mean(~wrong)) if len(records) else None,
        "bins": rates,
        "capture_range_mm": _capture_range(rates, CAPTURE_MIN_RATE),
        "final_mtre_mm": {"median": _quantile(final, 0.5), "p95": _quantile(final, 0.95)},
        "mpd_isocenter_mm": {"median": _quantile(mpd_iso, 0.5)},
        "time_s": {"median": _quantile(times, 0.5), "p95": _quantile(times, 0.95)},
        "quality_gate": {
            "failed_rate": float(np.mean(flagged)) if len(records) else None,
            "true_positive": int(np.sum(flagged & wrong)),
            "false_positive": int(np.sum(flagged & ~wrong)),
            "false_negative": int(np.sum(~flagged & wrong)),
            "true_negative": int(np.sum(~flagged & ~wrong)),
        },
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(summary: dict, title: str) -> str:
    gate = summary["quality_gate"]
    lines = [
        f"# {title}",
        "",
        f"{summary['n_cases']} cases; success = final mTRE < {summary['success_mm']:g} mm.",
        "",
        "| initial mTRE (mm) | starts | successes | success rate |",
        "|---|---|---|---|",
    ]
    for b in summary["bins"]:
        rate = "n/a" if b["rate"] is None else f"{100 * b['rate']:.0f}%"
        lines.append(f"| {b['bin_mm'][0]:g}-{b['bin_mm'][1]:g} | {b['n']} | {b['n_success']} | {rate} |")
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| success rate (all starts) | {_fmt(summary['success_rate'], 3)} |",
        f"| capture range (mm, bins >= {100 * CAPTURE_MIN_RATE:.0f}%) | {summary['capture_range_mm']:g} |",
        f"| final mTRE median / p95 (mm) | {_fmt(summary['final_mtre_mm']['median'])} / "
        f"{_fmt(summary['final_mtre_mm']['p95'])} |",
        f"| mPD at isocentre, median (mm) | {_fmt(summary['mpd_isocenter_mm']['median'])} |",
        f"| time median / p95 (s) | {_fmt(summary['time_s']['median'])} / {_fmt(summary['time_s']['p95'])} |",
        f"| quality gate: failed rate | {_fmt(gate['failed_rate'], 3)} |",
        f"| gate failed & really wrong (TP) / failed but right (FP) | {gate['true_positive']} / "
        f"{gate['false_positive']} |",
        f"| gate ok but wrong (FN, silent) / ok & right (TN) | {gate['false_negative']} / {gate['true_negative']} |",
        "",
    ]
    return "\n".join(lines)


def _plots(summary: dict, records: Sequence[dict], out_dir: Path, title: str) -> list[Path]:
    """success_rate.png (per initial-mTRE bin) and final_mtre.png (histogram, log x)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: report plots skipped")
        return []
    labels = [f"{b['bin_mm'][0]:g}-{b['bin_mm'][1]:g}" for b in summary["bins"]]
    rates = [np.nan if b["rate"] is None else 100 * b["rate"] for b in summary["bins"]]
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(labels, rates, color="tab:blue")
    ax.bar_label(bars, labels=[f"n={b['n']}" for b in summary["bins"]], fontsize=8)
    ax.axhline(100 * CAPTURE_MIN_RATE, color="tab:red", ls="--", lw=1, label=f"{100 * CAPTURE_MIN_RATE:.0f}%")
    ax.set(xlabel="initial mTRE (mm)", ylabel="success rate (%)", ylim=(0, 110), title=title)
    ax.legend(loc="lower left", fontsize=8)
    paths = [out_dir / "success_rate.png", out_dir / "final_mtre.png"]
    fig.savefig(paths[0], dpi=120)
    final = np.array([r["final_mtre_mm"] for r in records], dtype=float)
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    if len(final):
        lo, hi = max(final.min(), 1e-2), max(final.max(), summary["success_mm"] * 2)
        ax.hist(np.clip(final, lo, None), bins=np.geomspace(lo, hi * 1.01, 30), color="tab:gray")
    ax.axvline(summary["success_mm"], color="tab:red", ls="--", lw=1, label="success threshold")
    ax.set(xscale="log", xlabel="final mTRE (mm)", ylabel="starts", title=title)
    ax.legend(fontsize=8)
    fig.savefig(paths[1], dpi=120)
    return paths


def write_report(summary: dict, records: Sequence[dict], out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write ``summary.json``, ``records.json``, ``report.md`` and (with matplotlib) the
    PNG plots ``success_rate.png`` and ``final_mtre.png`` into ``out_dir``; returns
    name -> path of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "records": out / "records.json", "report": out / "report.md"}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["records"].write_text(json.dumps(list(records), indent=1) + "\n")
    paths["report"].write_text(_markdown(summary, title))
    paths.update({p.stem: p for p in _plots(summary, records, out, title)})
    return paths


# ---------------------------------------------------------------------------- entry points


def _resolve_level(level: int | str | None, phantom: Phantom | None) -> int | None:
    """A label id from an id or a level name (the phantom's, else TotalSegmentator's)."""
    if level is None or isinstance(level, (int, np.integer)):
        return None if level is None else int(level)
    names = phantom.levels if phantom is not None else LEVEL_LABELS
    if level not in names:
        raise ValueError(f"level must be a label id or one of {', '.join(names)}; got {level!r}")
    return int(names[level])


def _inputs(
    ct: str | Path | Phantom, labels_path: str | Path | None, level: int | str | None
) -> tuple[Volume, Volume | None, int | None]:
    """(CT in HU, label map or None, label id or None) from a path or a phantom."""
    phantom = ct if isinstance(ct, Phantom) else None
    volume = phantom.ct if phantom is not None else load_volume(ct)
    labels = load_volume(labels_path, units="label") if labels_path is not None else None
    if labels is None and phantom is not None:
        labels = phantom.labels
    return volume, labels, _resolve_level(level, phantom)


def evaluate(
    ct_path_or_phantom: str | Path | Phantom,
    *,
    out_dir: str | Path,
    labels_path: str | Path | None = None,
    level: int | str | None = None,
    variants: Sequence[str] = ("raw", "display"),
    biplane: bool = False,
    n_views: int = 6,
    n_starts_per_bin: int = 5,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    detector_px: int = 256,
    settings: RegistrationSettings | None = None,
    jobs: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Simulate, register and report one benchmark per intensity variant.

    For each variant: the set is written to ``out_dir/<variant>/set`` (re-usable with
    ``evaluate_external``) and the report to ``out_dir/<variant>``; ``out_dir/summary.json``
    holds every variant's summary. ``level``: label id or level name ("L3") registered
    alone. Returns variant -> summary (``summarize``).
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {v!r}")
    ct, labels, level_id = _inputs(ct_path_or_phantom, labels_path, level)
    out = Path(out_dir)
    summaries = {}
    for variant in variants:
        cases = make_benchmark_set(ct, labels=labels, level=level_id, n_views=n_views,
                                   n_starts_per_bin=n_starts_per_bin, bins=bins, variant=variant, seed=seed,
                                   detector_px=detector_px, biplane=biplane)
        write_benchmark_set(cases, out / variant / "set")
        records = run_benchmark(cases, ct, labels=labels, settings=settings, jobs=jobs, progress=progress)
        summaries[variant] = summarize(records, bins=bins)
        kind = "biplane" if biplane else "single view"
        where = "whole CT" if level_id is None else f"label {level_id}"
        write_report(summaries[variant], records, out / variant, title=f"{variant}, {kind}, {where}")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


def evaluate_external(
    folder: str | Path,
    ct_path: str | Path,
    *,
    labels_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    settings: RegistrationSettings | None = None,
    jobs: int = 1,
    progress: bool = True,
    title: str | None = None,
) -> dict:
    """Register and score a benchmark folder (``load_benchmark_set``) against a CT; the
    report goes to ``out_dir`` (default ``<folder>/report``). Returns the summary."""
    cases = load_benchmark_set(folder)
    ct, labels, _ = _inputs(ct_path, labels_path, None)
    records = run_benchmark(cases, ct, labels=labels, settings=settings, jobs=jobs, progress=progress)
    summary = summarize(records)
    write_report(summary, records, Path(folder) / "report" if out_dir is None else out_dir,
                 title=title or f"benchmark {Path(folder).name}")
    return summary
