"""2D/3D registration of X-ray views to a CT: single view, multi-view and per vertebra.

Composed from swappable parts named in ``RegistrationSettings``: the DRR renderer
(guidance.core.drr) drawing the bone and soft tissue of a CT prepared once
(prepared.PreparedCT and AnatomyModel, cached on disk), a
similarity (similarity.SIMILARITIES), a pose parameterisation
(pose.PARAMETERIZATIONS), a local optimiser (optimizers.OPTIMIZERS) and a detector /
volume pyramid.

A global registration runs, on the coarsest pyramid level:
1. an exhaustive in-plane search: the DRR at the start pose (turned by a few
   rotations about each axis) is correlated with the image's gradients over every image shift of
   +- ``search_range_mm`` (one FFT correlation per view), which also settles the
   polarity of display images; the best peaks, the best one moved one vertebral
   height up and down the spine, and the start itself are the candidates;
2. a short local refinement of every candidate (several at once, one per thread; each
   Jacobian from the DRR's motion derivative), the best few refined further; when two
   end far apart with nearly equal cost the result is failed as ambiguous (e.g. one
   vertebral level off), unless the next finer level, refining both, tells them apart;
   the best one is refined on the finer levels; one view's depth, its flattest direction,
   is also refined from starts nearer and farther along the ray (on the level binned twice
   the finest's) and, where it stays uncertain, on the finest level again from where the
   cost's profile along the ray has its minimum;
3. the quality gate, which uses the similarity and the pose uncertainty (1 sigma at
   the rotation centre, in-plane and in depth of the first view: the Gauss-Newton
   covariance of the last refinement, and for the depth also the cost's curvature over a
   few millimetres along the ray, on the level binned twice the finest's).

The estimate is the rigid correction ``T_world_corrected_from_world`` shared by all
views (CONVENTIONS.md): ``T_cam_i_from_world = T_cam_i_from_world_init @ inv(T_corr)``.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numba
import numpy as np

from guidance.core.drr import DrrVolume
from guidance.core.geometry import invert_rigid, project
from guidance.core.images import PreparedImage
from guidance.core.views import View
from guidance.core.volume import Volume, VolumeError
from guidance.registration.optimizers import OptimizeOutcome, minimize, profile_sd, profile_vertex
from guidance.registration.pose import PoseParameterization, point_displacement_mm
from guidance.registration.prepared import AnatomyModel, PreparedCT, PrepareSettings, load_or_prepare
from guidance.registration.quality import QualityLimits, assess
from guidance.registration.errors import RegistrationError
from guidance.registration.similarity import get_similarity, patch_agreement

__all__ = ["RegistrationSettings", "RegistrationResult", "LeastSquaresJacobian", "Registrator", "RegistrationError",
           "register_levels"]


@dataclass(frozen=True)
class RegistrationSettings:
    """Every choice of the registration, with units.

    Pyramid: ``pyramid`` bins the detector (after binning it to at most
    ``max_detector_px``), coarse first; level n renders the prepared volume whose
    spacing is at most ``volume_per_footprint[n]`` (the last entry for further levels) x
    the pixel footprint at the anatomy (coarser volumes are faster but bias the depth of
    one view: the finer levels keep 1); each level's image is blurred by ``fixed_blur_px``
    (sigma, px) from its valid pixels only (a plain blur spread the masked pixels' fill into an
    edge along the mask's border: with a third of an image masked, the similarity at the truth
    fell from 0.92-0.97 to 0.41-0.64, and the real CT's near-lateral views scored 0.47-0.73
    at their truth instead of 0.81-0.90).
    ``search_scale`` is the typical step per parameter (rx, ry, rz deg; tx, ty, tz mm)
    of the local optimiser, ``jacobian_step`` its finite-difference step in units of
    it. Global search:
    in-plane shifts up to ``search_range_mm`` at each rotation of
    ``search_rotations_deg`` about each axis (all combinations); ``n_candidates``
    peaks (plus the best one a vertebral height up and down the spine, and the start)
    are refined (an image with more than ``search_mask_share`` of its pixels masked leaves them
    out of each shift's correlation: as zeros they counted the DRR's edges behind them against
    the shift, and a display image clipped black over 40% of its field drew the peaks 24-54 mm
    off: 3 of the real CT's 60 display results still fail without it; below it they count as
    zeros, the same within a few percent and cheaper); with one
    view, the best one after the level binned ``depth_profile_binning`` times the finest is
    also refined from ``search_depths_mm`` along the ray through the
    rotation centre, and the better goes on (one view's depth moves least of all); the finest
    level's result of one view whose depth the profile (below) leaves uncertain (1 sigma over a
    third of ``depth_probe_mm``) is refined again from where the parabola through its cost at
    +-``depth_probe_mm`` along the ray has its minimum, and from twice as far (the cost is
    flattest near the result), when that lies farther than the probe (at most
    ``depth_jump_mm``; None: never), and kept when it fits better (the local derivatives see
    the fine ripples of the cost, not its slope over millimetres); the best one
    and its rivals (those an ambiguity would name, below) go on to
    the finer levels, at most ``n_refined[n]`` after level n, then one (a finer level
    decides again between them), with ``global_iterations[n]`` iterations on level n (the last entry for
    further levels; with ``n_survivors`` only that many distinct candidates get the second half
    of the coarsest level's iterations, None: all); a registration
    without global search (tracking, per vertebra)
    runs ``local_max_fev`` iterations per level. Two
    refined candidates more than ``ambiguity_distance_mm`` apart at the rotation centre
    whose costs differ by less than ``ambiguity_margin`` times the best one's dissimilarity
    (1 - similarity: how much of the image the model does not explain) make the result
    ambiguous.
    ``prior_weight`` weighs a Gaussian prior on the parameters (when a registration is
    given ``prior_sd``) against the image residuals. ``residual_correlation_px2`` is the
    area (pixels) over which residuals of neighbouring pixels are correlated (blur,
    Sobel): the Gauss-Newton covariance is scaled by it. ``depth_profile_mm``: after a
    global search the depth uncertainty is also taken from the cost's curvature over
    +-this distance along the first view's ray (None: Gauss-Newton only), on the pyramid level
    binned ``depth_profile_binning`` times the finest's (its correlation area scaled to that
    level's pixels: the same uncertainty within 0.65-1.21x, median 0.92x, on the real CT's
    single views, for a quarter of the pixels; docs/benchmarks.md session 11). ``model_error_mm``
    (in-plane, depth; 1 sigma) is the error the image residuals cannot show, because the
    rendered anatomy is not the imaged one; it is added in quadrature to theirs. Without it,
    of the phantom's ok results on the clinical grid (where that error dominates) only 53%
    in-plane and 82% in depth lay within 2 sigma; with (0.1, 0.3) mm, 98-100% of the
    phantom's and the real CT's, single views and biplane (docs/benchmarks.md session 8).
    ``parallel_render``: render
    every DRR on all numba threads (True: one registration on an otherwise idle
    machine), or by the DRR's size rule (None; see ``drr.PARALLEL_MIN_PIXELS``).
    ``evaluation_threads``: independent cost evaluations (the local optimiser's finite
    differences, the search's rotations) run on this many threads at once, each rendering on
    one thread (None: numba's thread count; 1: one at a time, by ``parallel_render``'s rule):
    small images do not split well across threads, several images at once do; several
    starts of one level are refined at once, one per thread.
    ``coarse_soft_binning``: the coarsest level of a global registration draws the soft
    tissue on a detector binned at least this much (on a 256 px view: 5.2 instead of 2.6 mm
    pixels; about 9% less time with the same results, docs/benchmarks.md session 8).
    ``analytic_jacobian``: the local optimiser's Jacobian comes from the DRR's motion
    derivative (``AnatomyModel.render_motion``), drawn with every point it evaluates at
    about 1.1x the cost of the DRR alone, instead of six more renders of finite
    differences (False; step ``jacobian_step``). On the clinical grid it made single views
    2.1-2.6x and biplane pairs 2.1x faster, with the same outcomes and an mTRE as good or
    better (docs/benchmarks.md session 9).
    ``bone_threshold_hu``, ``soft_tissue_spacing_mm``, ``fine_soft_tissue_spacing_mm``,
    ``energy_kev``, ``pyramid_spacings_mm``, ``vertebra_height_mm`` and ``soft_continuation_mm``
    shape the prepared CT (prepared.PrepareSettings).
    """

    similarity: str = "gradient_ncc"
    parameterization: str = "camera"
    local_optimizer: str = "lm"
    pyramid: tuple[int, ...] = (4, 2, 1)
    max_detector_px: int = 256
    volume_per_footprint: tuple[float, ...] = (1.4, 1.0)
    search_scale: tuple[float, ...] = (4.0, 4.0, 4.0, 6.0, 6.0, 20.0)
    jacobian_step: float = 0.02
    search_range_mm: float = 45.0
    search_rotations_deg: tuple[float, ...] = (-10.0, 0.0, 10.0)
    n_candidates: int = 6
    search_mask_share: float = 0.02
    search_depths_mm: tuple[float, ...] = (-8.0, 8.0)
    depth_probe_mm: float | None = 3.0
    depth_jump_mm: float = 12.0
    n_refined: tuple[int, ...] = (2,)
    n_survivors: int | None = 3
    global_iterations: tuple[int, ...] = (4, 3, 2)
    local_max_fev: int = 6
    bone_threshold_hu: float | None = 150.0
    soft_tissue_spacing_mm: float | None = 4.0
    energy_kev: float = 60.0
    pyramid_spacings_mm: tuple[float, ...] = (1.0, 2.0, 4.0)
    vertebra_height_mm: float = 30.0
    soft_continuation_mm: float = 60.0
    fine_soft_tissue_spacing_mm: float | None = 2.0
    fixed_blur_px: float = 0.7
    roi_margin_mm: float = 5.0
    prior_weight: float = 0.05
    ambiguity_margin: float = 0.06
    ambiguity_distance_mm: float = 5.0
    residual_correlation_px2: float = 100.0
    depth_profile_mm: float | None = 3.0
    depth_profile_binning: int = 2
    model_error_mm: tuple[float, float] = (0.1, 0.3)
    parallel_render: bool | None = None
    evaluation_threads: int | None = None
    coarse_soft_binning: float = 2.0
    analytic_jacobian: bool = True
    quality: QualityLimits = field(default_factory=QualityLimits)

    def prepare_settings(self) -> PrepareSettings:
        """The part of the settings that shapes the prepared CT (its cache key)."""
        return PrepareSettings(bone_threshold_hu=self.bone_threshold_hu,
                               soft_tissue_spacing_mm=self.soft_tissue_spacing_mm, energy_kev=self.energy_kev,
                               pyramid_spacings_mm=self.pyramid_spacings_mm,
                               vertebra_height_mm=self.vertebra_height_mm,
                               soft_continuation_mm=self.soft_continuation_mm,
                               fine_soft_tissue_spacing_mm=self.fine_soft_tissue_spacing_mm)


@dataclass(frozen=True)
class LeastSquaresJacobian:
    """The least-squares Jacobian of a registration's finest level: ``matrix`` (residuals x
    6, per parameter in units of the search scale), per view the ROI mask whose pixels its
    rows belong to, and the correction ``T_roi`` (``T_world_corrected_from_world``) the
    ROI was placed at. A later registration of the same views' geometry that starts
    within half the ROI margin of ``T_roi`` keeps that ROI and starts from this matrix."""

    matrix: np.ndarray
    roi_masks: tuple[np.ndarray, ...]
    T_roi: np.ndarray


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of one registration: poses, status and its reason, similarity, the pose
    uncertainty (1 sigma, mm, at the rotation centre: in the image plane and along the
    principal ray of the first view), the worst view's ``similarity.patch_agreement``,
    timings (``time_s`` of this call, ``prepare_s`` of the CT preparation or cache load,
    done once per Registrator)."""

    status: str
    reason: str
    T_world_corrected_from_world: np.ndarray
    views: list[View]
    similarity: float
    per_view_similarity: list[float]
    confidence: float
    evaluations: int
    iterations: int
    time_s: float
    stop_reasons: list[str]
    timings_s: dict[str, float]
    uncertainty_in_plane_mm: float = float("inf")
    uncertainty_depth_mm: float = float("inf")
    patch_agreement: float = float("nan")
    prepare_s: float = 0.0
    level: str | None = None
    level_poses: dict[str, np.ndarray] = field(default_factory=dict)
    level_status: dict[str, str] = field(default_factory=dict)
    jacobian: LeastSquaresJacobian | None = None
    """The least-squares Jacobian of the finest level (see ``Registrator.register``'s
    ``local_jacobian``); not part of ``to_dict``."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-ready result (poses as row-major nested lists; an unknown uncertainty is null)."""
        def finite(value: float) -> float | None:
            return float(value) if np.isfinite(value) else None

        return {
            "status": self.status,
            "reason": self.reason,
            "T_world_corrected_from_world": self.T_world_corrected_from_world.tolist(),
            "views": [{"T_cam_from_world": v.T_cam_from_world.tolist()} for v in self.views],
            "similarity": self.similarity,
            "per_view_similarity": self.per_view_similarity,
            "confidence": self.confidence,
            "uncertainty_in_plane_mm": finite(self.uncertainty_in_plane_mm),
            "uncertainty_depth_mm": finite(self.uncertainty_depth_mm),
            "patch_agreement": finite(self.patch_agreement),
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "time_s": self.time_s,
            "prepare_s": self.prepare_s,
            "stop_reasons": self.stop_reasons,
            "timings_s": self.timings_s,
            "level": self.level,
            "level_poses": {k: v.tolist() for k, v in self.level_poses.items()},
            "level_status": self.level_status,
        }


@dataclass(frozen=True)
class _PyramidLevel:
    """One pyramid level of one view: binned image, mask and view."""

    image: np.ndarray
    mask: np.ndarray
    view: View


@dataclass(frozen=True)
class _Candidate:
    """A refined pose hypothesis: parameters, cost and its last optimiser outcome."""

    x: np.ndarray
    outcome: OptimizeOutcome


def _bin_image(image: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``factor`` x ``factor`` blocks (matches View.downsampled pixel centres)."""
    if factor == 1:
        return image, mask
    H, W = image.shape
    h, w = H // factor, W // factor
    img = image[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))
    m = mask[: h * factor, : w * factor].reshape(h, factor, w, factor).all(axis=(1, 3))
    return img.astype(np.float32), m


def _masked_blur(image: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (sigma px) of the valid pixels from valid pixels only (normalised
    convolution); masked pixels stay 0, and their fill never reaches a valid neighbour."""
    valid = mask.astype(np.float32)
    weight = cv2.GaussianBlur(valid, (0, 0), sigma_px)
    blurred = cv2.GaussianBlur(np.where(mask, image, 0.0).astype(np.float32), (0, 0), sigma_px)
    return np.where(mask, blurred / np.maximum(weight, 1e-6), 0.0).astype(np.float32)


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = image.astype(np.float32, copy=False)
    return cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)


def _corners_world(dv: DrrVolume) -> np.ndarray:
    """The 8 corners (world mm) of a rendering volume's voxel-centre box."""
    ni, nj, nk = dv.size_ijk
    ijk = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], dtype=float)
    return ijk @ dv.T_world_from_index[:3, :3].T + dv.T_world_from_index[:3, 3]


def _pose_distance_mm(T_a: np.ndarray, T_b: np.ndarray, centre: np.ndarray, radius_mm: float = 30.0) -> float:
    """Largest distance (mm) between where two rigid transforms put the centre and six
    points ``radius_mm`` around it (so rotations about the centre count too)."""
    points = centre + np.vstack([np.zeros(3), radius_mm * np.eye(3), -radius_mm * np.eye(3)])
    return max(point_displacement_mm(T_a, T_b, p) for p in points)


def _moved_in_plane_mm(T_cam_from_world: np.ndarray, T_corr_from: np.ndarray, T_corr_to: np.ndarray,
                       centre: np.ndarray) -> float:
    """How far (mm) the rotation centre moves across the corrected view (camera x, y of
    ``T_cam_from_world @ inv(T_corr)``) from correction ``T_corr_from`` to ``T_corr_to``.
    Taken in the uncorrected camera's axes instead, a move along the ray leaked into it by
    the correction's rotation (4 mm of depth, 7 deg off, read as 1.2 mm across)."""
    c = np.r_[centre, 1.0]
    moved = T_cam_from_world @ (invert_rigid(T_corr_to) @ c - invert_rigid(T_corr_from) @ c)
    return float(np.linalg.norm(moved[:2]))


def _peaks(score: np.ndarray, radius_px: int, count: int) -> list[tuple[float, int, int]]:
    """Up to ``count`` local maxima (value, row, col) of a map, strongest first, at
    least ``radius_px`` apart."""
    size = 2 * radius_px + 1
    local = score >= cv2.dilate(score, np.ones((size, size), np.uint8))
    rows, cols = np.nonzero(local & (score > 0))
    order = np.argsort(-score[rows, cols])[:count]
    return [(float(score[rows[i], cols[i]]), int(rows[i]), int(cols[i])) for i in order]


class Registrator:
    """A CT prepared for repeated 2D/3D registration.

    ``ct`` is in HU; ``labels`` (same grid, optional) enables per-vertebra registration
    with ``level`` given as a label id. The preparation (prepared.load_or_prepare) is
    read from ``cache_dir`` (default: the user's cache folder, or $GUIDANCE_CACHE_DIR)
    when it was made before; ``use_cache=False`` always rebuilds and writes nothing.
    """

    def __init__(
        self,
        ct: Volume,
        *,
        labels: Volume | None = None,
        settings: RegistrationSettings | None = None,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        self.settings = settings or RegistrationSettings()
        get_similarity(self.settings.similarity)
        if labels is not None and labels.data.shape != ct.data.shape:
            raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {ct.data.shape}")
        self.prepared: PreparedCT = load_or_prepare(ct, labels, self.settings.prepare_settings(),
                                                    cache_dir=cache_dir, use_cache=use_cache)
        self._label_models: dict[tuple[int, int], AnatomyModel] = {}
        self._evaluation_pool: tuple[int, ThreadPoolExecutor] | None = None

    @property
    def prepare_s(self) -> float:
        """Seconds the CT preparation (or its cache load) took."""
        return self.prepared.prepare_s

    # -- volumes -------------------------------------------------------------------------

    def anatomy(self, level: int | None, spacing_mm: float) -> AnatomyModel:
        """What is rendered for one vertebra (label id: its bone and the soft tissue) or
        all (None: all bone and the soft tissue), on the coarsest prepared grid whose
        spacing is at most ``spacing_mm``."""
        index = self.prepared.pyramid_index(spacing_mm)
        if level is None:
            return self.prepared.anatomy(index)
        key = (int(level), index)
        if key not in self._label_models:
            if self.prepared.labels[0] is None:
                raise RegistrationError("per-vertebra registration needs a label map")
            self._label_models[key] = AnatomyModel(self.prepared.volume(index, level), self.prepared.soft_tissue(index))
        return self._label_models[key]

    def centre(self, level: int | None) -> np.ndarray:
        """Rotation centre (world mm): centroid of the rendered bone of that level."""
        if level is not None and self.prepared.labels[0] is None:
            raise RegistrationError("per-vertebra registration needs a label map")
        return self.prepared.centre(level)

    # -- pyramid -------------------------------------------------------------------------

    def detector_binning(self, view: View) -> int:
        """The binning that brings ``view``'s detector to at most ``max_detector_px``
        pixels across; the pyramid's factors multiply it."""
        return max(1, int(np.ceil(max(view.image_size) / self.settings.max_detector_px)))

    def _pyramid(
        self, images: list[PreparedImage], views: list[View], factors: tuple[int, ...]
    ) -> list[list[_PyramidLevel]]:
        """Per pyramid level (coarse first), per view: binned image, mask and view."""
        s = self.settings
        out = []
        for factor in factors:
            per_view = []
            for img, view in zip(images, views):
                f = self.detector_binning(view) * factor
                image, mask = _bin_image(img.image, img.mask, f)
                if s.fixed_blur_px > 0:
                    image = _masked_blur(image, mask, s.fixed_blur_px)
                v = view.downsampled(f) if f > 1 else view
                v = replace(v, image_size=(image.shape[1], image.shape[0]))
                per_view.append(_PyramidLevel(image=image, mask=mask, view=v))
            out.append(per_view)
        return out

    def _footprint_mm(self, stage: _PyramidLevel, centre: np.ndarray) -> float:
        """Detector pixel size back-projected to the anatomy centre (mm)."""
        depth = float(stage.view.T_cam_from_world[2, :3] @ centre + stage.view.T_cam_from_world[2, 3])
        return depth / float(stage.view.K[0, 0])

    # -- cost ----------------------------------------------------------------------------

    def _roi(self, bone: DrrVolume, view: View, mask: np.ndarray, margin_mm: float) -> np.ndarray:
        """Valid pixels inside the projected box of the rendered bone (the spine, or one
        vertebra), grown by ``margin_mm`` on every side; image content outside it (ribs,
        pelvis) is not compared."""
        corners = _corners_world(bone)
        centre = corners.mean(axis=0)
        uv = project(view.P, corners + np.sign(corners - centre) * margin_mm)
        H, W = mask.shape
        u0, v0 = np.clip(np.floor(uv.min(axis=0)).astype(int), 0, [W, H])
        u1, v1 = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 1, 0, [W, H])
        roi = np.zeros_like(mask)
        roi[v0:v1, u0:u1] = mask[v0:v1, u0:u1]
        return roi

    def _objective(
        self, stage: list[_PyramidLevel], model: AnatomyModel, param: PoseParameterization, starts: list[np.ndarray],
        centre: np.ndarray, rois: tuple[np.ndarray, ...] | None = None,
    ) -> "_Objective":
        """The cost of one pyramid level; its ROI is fixed, at the first start's pose, with
        a margin that covers the other starts (or ``rois``, one per view, when given), and so
        is each view's soft-tissue binning, at the level's view (``AnatomyModel.fixed_for``)."""
        similarity = get_similarity(self.settings.similarity)
        if rois is None:
            T_first = param.correction(starts[0])
            spread = max(point_displacement_mm(param.correction(x), T_first, centre) for x in starts)
            margin = self.settings.roi_margin_mm + spread
            T_inv = invert_rigid(T_first)
            rois = tuple(self._roi(model.bone, pl.view.with_pose(pl.view.T_cam_from_world @ T_inv), pl.mask, margin)
                         for pl in stage)
        return _Objective(stage, [model.fixed_for(pl.view) for pl in stage], param,
                          [similarity(pl.image, roi) for pl, roi in zip(stage, rois)],
                          parallel=self.settings.parallel_render, pool=self._pool(),
                          analytic=self.settings.analytic_jacobian)

    def _pool(self) -> ThreadPoolExecutor | None:
        """The threads of concurrent evaluations (``evaluation_threads``), None for one at a
        time. Made again in a forked child, whose copy of the parent's pool has no threads."""
        threads = self.settings.evaluation_threads
        if threads is None:
            threads = numba.get_num_threads()
        if threads <= 1:
            return None
        if self._evaluation_pool is None or self._evaluation_pool[0] != os.getpid():
            self._evaluation_pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="registration"))
        return self._evaluation_pool[1]

    def _render_all(self, scenes: list[tuple[AnatomyModel, View]]) -> list[np.ndarray]:
        """The render of each (model, view), concurrently on the evaluation threads when there are any."""
        pool = self._pool()
        if pool is None:
            return [model.render(v, parallel=self.settings.parallel_render) for model, v in scenes]
        return list(pool.map(lambda scene: scene[0].render(scene[1], parallel=False), scenes))

    def _keeps_roi(self, jacobian: LeastSquaresJacobian, stage: list[_PyramidLevel], T_start: np.ndarray,
                   centre: np.ndarray) -> bool:
        """Whether a registration starting at ``T_start`` may keep ``jacobian``'s ROI (and
        start from its matrix): one ROI per view, of the image's size, on valid pixels only,
        placed within half the ROI margin of the start."""
        return (len(jacobian.roi_masks) == len(stage)
                and all(roi.shape == pl.mask.shape and not np.any(roi & ~pl.mask)
                        for roi, pl in zip(jacobian.roi_masks, stage))
                and point_displacement_mm(T_start, jacobian.T_roi, centre) <= 0.5 * self.settings.roi_margin_mm)

    # -- global search -------------------------------------------------------------------

    def _shift_jacobian(self, view: View, param: PoseParameterization, x: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """d(image position of the rotation centre, px) / d(tx, ty, tz) at x (2 x 3)."""
        def where(xx: np.ndarray) -> np.ndarray:
            moved = view.with_pose(view.T_cam_from_world @ invert_rigid(param.correction(xx)))
            return project(moved.P, centre[None])[0]

        p0 = where(x)
        return np.column_stack([where(x + np.r_[0, 0, 0, np.eye(3)[a]]) - p0 for a in range(3)])

    def _search(
        self,
        stage: list[_PyramidLevel],
        model: AnatomyModel,
        param: PoseParameterization,
        x0: np.ndarray,
        centre: np.ndarray,
    ) -> tuple[list[np.ndarray], list[bool]]:
        """Start candidates from an exhaustive in-plane search (module docstring), best
        first, and per view whether its image has the opposite polarity (bone dark)."""
        s = self.settings
        footprint = self._footprint_mm(stage[0], centre)
        pad = int(np.ceil(s.search_range_mm / footprint))
        fixed = []
        for pl in stage:
            interior = cv2.erode(pl.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            mask = interior.astype(np.float32) if np.mean(~interior) > s.search_mask_share else None
            fixed.append(([np.where(interior, g, 0.0).astype(np.float32) for g in _gradients(pl.image)], mask))
        rotations = list(itertools.product(s.search_rotations_deg, repeat=3))
        models = [model.fixed_for(pl.view) for pl in stage]
        scenes = []
        for rotation in rotations:
            T_corr_inv = invert_rigid(param.correction(x0 + np.r_[rotation, 0.0, 0.0, 0.0]))
            scenes += [(m, pl.view.with_pose(pl.view.T_cam_from_world @ T_corr_inv).cropped(
                -pad, -pad, pl.view.width + 2 * pad, pl.view.height + 2 * pad)) for m, pl in zip(models, stage)]
        renders = iter(self._render_all(scenes))
        maps: dict[tuple[float, ...], list[np.ndarray]] = {}
        for rotation in rotations:
            maps[rotation] = []
            for (fx, fy), mask in fixed:
                dx, dy = _gradients(next(renders))
                score = 0.5 * (cv2.matchTemplate(dx, fx, cv2.TM_CCOEFF_NORMED, mask=mask)
                               + cv2.matchTemplate(dy, fy, cv2.TM_CCOEFF_NORMED, mask=mask))
                maps[rotation].append(score[::-1, ::-1])  # index [pad + sv, pad + su]: anatomy shifted by (su, sv)
        inverted = [False] * len(stage)
        for i, pl in enumerate(stage):
            if pl.view.intensity == "display":
                best_pos = max(float(m[i].max()) for m in maps.values())
                best_neg = max(float(-m[i].min()) for m in maps.values())
                inverted[i] = best_neg > best_pos
                if inverted[i]:
                    for m in maps.values():
                        m[i] = -m[i]
        scored = []
        for rotation, per_view in maps.items():
            x_rot = x0 + np.r_[rotation, 0.0, 0.0, 0.0]
            J = [self._shift_jacobian(pl.view, param, x_rot, centre) for pl in stage]
            for value, row, col in _peaks(per_view[0], max(2, int(round(8.0 / footprint))), s.n_candidates):
                shift = np.array([col - pad, row - pad], dtype=float)
                t = self._translation(shift, J, per_view, pad, footprint)
                scored.append((value, x_rot + np.r_[0.0, 0.0, 0.0, t]))
        scored.sort(key=lambda vx: -vx[0])
        candidates: list[np.ndarray] = []
        for _, x in scored:  # distinct shifts or rotations
            if all(np.linalg.norm(x[3:] - c[3:]) > 6.0 or np.abs(x[:3] - c[:3]).max() > 6.0 for c in candidates):
                candidates.append(x)
            if len(candidates) == s.n_candidates:
                break
        candidates.append(x0)
        axis_cam = param.T_cam_from_world_ref[:3, :3] @ self.prepared.spine_axis_world
        for sign in (1.0, -1.0):
            shifted = candidates[0] + np.r_[0.0, 0.0, 0.0, sign * self.prepared.vertebra_height_mm * axis_cam]
            candidates.append(shifted)
        return candidates, inverted

    def _translation(self, shift_px: np.ndarray, J: list[np.ndarray], maps: list[np.ndarray], pad: int,
                     footprint_mm: float) -> np.ndarray:
        """Translation (tx, ty, tz, mm) moving the centre's image in view 0 by
        ``shift_px``; with more views the depth is the one whose shifts score best
        in the other views' maps (scanned over +- the search range)."""
        A = J[0][:, :2]
        if len(J) == 1:
            return np.r_[np.linalg.solve(A, shift_px), 0.0]
        tz = np.arange(-pad, pad + 1) * footprint_mm  # every depth at once (a biplane search scores hundreds)
        txy = np.linalg.solve(A, shift_px[:, None] - J[0][:, 2:3] * tz[None, :])
        t = np.vstack([txy, tz[None, :]])  # 3 x depths
        total = np.zeros(len(tz))
        for Ji, mi in zip(J[1:], maps[1:]):
            su, sv = np.rint(Ji @ t).astype(int)
            inside = (np.abs(su) <= pad) & (np.abs(sv) <= pad)
            total += np.where(inside, mi[np.clip(pad + sv, 0, 2 * pad), np.clip(pad + su, 0, 2 * pad)], -1.0)
        return t[:, int(np.argmax(total))]

    def _rivals(self, ranked: list[_Candidate], param: PoseParameterization,
                centre: np.ndarray) -> list[tuple[_Candidate, str]]:
        """The refined candidates far from the best that match (almost) as well, e.g. the
        same spine one vertebral level up or down, each with the reason it is a rival."""
        s = self.settings
        best = ranked[0]
        rivals = []
        for other in ranked[1:]:
            apart_mm = point_displacement_mm(param.correction(best.x), param.correction(other.x), centre)
            gap = other.outcome.fun - best.outcome.fun
            limit = s.ambiguity_margin * (1.0 + best.outcome.fun)  # the cost is -similarity
            if apart_mm > s.ambiguity_distance_mm and gap < limit:
                rivals.append((other, f"ambiguous: two poses {apart_mm:.0f} mm apart match almost equally "
                                      f"(cost gap {gap:.3f} < {limit:.3f})"))
        return rivals

    def _distinct(self, ranked: list[_Candidate], param: PoseParameterization, centre: np.ndarray,
                  count: int) -> list[_Candidate]:
        """The best ``count`` candidates at least 2 mm apart (``_pose_distance_mm``)."""
        kept: list[_Candidate] = []
        for c in ranked:
            T = param.correction(c.x)
            if all(_pose_distance_mm(T, param.correction(k.x), centre) > 2.0 for k in kept):
                kept.append(c)
            if len(kept) == count:
                break
        return kept

    # -- registration --------------------------------------------------------------------

    def register(
        self,
        images: list[PreparedImage],
        views: list[View],
        *,
        level: int | None = None,
        initial_T_world_corrected_from_world: np.ndarray | None = None,
        global_search: bool = True,
        pyramid: tuple[int, ...] | None = None,
        local_max_fev: int | None = None,
        local_ftol: float = 1e-4,
        prior_sd: np.ndarray | None = None,
        local_jacobian: LeastSquaresJacobian | None = None,
    ) -> RegistrationResult:
        """Register preprocessed images (one per view, views carry the initial poses).

        With ``global_search`` the coarsest level searches for candidates (module
        docstring); otherwise every level refines locally from the start. ``level`` (a
        label id) registers that vertebra alone. ``prior_sd`` (deg, deg, deg, mm, mm,
        mm) keeps the solution near the initial correction, e.g. in depth, which one
        view hardly observes. ``local_jacobian``: the ``jacobian`` of an earlier result on
        the same images' geometry and settings (tracking: the previous frame's), the start
        of the finest level's least squares, whose ROI it keeps while the start lies within
        half the ROI margin of where that ROI was placed (optimizers: Broyden updates
        instead of finite differences while they work).
        """
        t_start = time.perf_counter()
        if len(images) != len(views) or not images:
            raise RegistrationError("need one image per view and at least one view")
        for i, (img, view) in enumerate(zip(images, views)):
            if img.image.shape != view.shape:
                raise RegistrationError(f"image {i} shape {img.image.shape} does not match its view {view.shape}")
        s = self.settings
        centre = self.centre(level)
        param = PoseParameterization(s.parameterization, centre, views[0].T_cam_from_world)
        x_start = np.zeros(6) if initial_T_world_corrected_from_world is None else param.params(
            initial_T_world_corrected_from_world)
        scale = np.asarray(s.search_scale, dtype=float)
        factors = s.pyramid if pyramid is None else pyramid
        stages = self._pyramid(images, views, factors)
        timings: dict[str, float] = {}
        stops: list[str] = []
        evaluations = iterations = 0
        ambiguity = None
        along_ray = 0.0
        profile_level = self._profile_level(factors) if global_search and s.depth_profile_mm else None
        starts = [x_start]
        candidates: list[_Candidate] = []
        objective = None
        for n in range(len(stages)):
            t0 = time.perf_counter()
            stage = stages[n]
            per_footprint = s.volume_per_footprint[min(n, len(s.volume_per_footprint) - 1)]
            model = self.anatomy(level, per_footprint * self._footprint_mm(stage[0], centre))
            name = f"{stage[0].view.width}px"
            if n == 0 and global_search:
                model = replace(model, soft_binning=s.coarse_soft_binning)
                starts, inverted = self._search(stage, model, param, x_start, centre)
                if any(inverted):  # display images whose polarity was wrong: flip them, all levels
                    images = [PreparedImage(image=-img.image if inv else img.image, mask=img.mask)
                              for img, inv in zip(images, inverted)]
                    stages = self._pyramid(images, views, factors)
                    stage = stages[0]
                    flipped = ", ".join(str(i) for i, inv in enumerate(inverted) if inv)
                    stops.append(f"search: display polarity inverted in view(s) {flipped}")
                name = f"search+local@{name} x{len(starts)}"
            else:
                name = f"local@{name}" + (f" x{len(starts)}" if len(starts) > 1 else "")
            level_starts = list(starts)
            if local_max_fev is not None:
                fev = local_max_fev
            elif global_search:
                fev = s.global_iterations[min(n, len(s.global_iterations) - 1)]
            else:
                fev = s.local_max_fev
            T_roi = param.correction(starts[0])
            reuse = (local_jacobian is not None and n == len(stages) - 1
                     and self._keeps_roi(local_jacobian, stage, T_roi, centre))
            if reuse:
                T_roi = local_jacobian.T_roi
            objective = self._objective(stage, model, param, starts, centre,
                                        rois=local_jacobian.roi_masks if reuse else None)
            if prior_sd is not None:
                objective.set_prior(x_start, np.asarray(prior_sd, dtype=float), s.prior_weight)
            warm = {"jacobian": local_jacobian.matrix} if reuse else {}
            halving = n == 0 and global_search and s.n_survivors is not None and len(starts) > s.n_survivors
            outcomes = self._refine(objective, starts, scale, fev // 2 if halving else fev, local_ftol, warm)
            if halving:  # the rest of the iterations for the best few only
                early = sorted((_Candidate(o.x, o) for o in outcomes), key=lambda c: c.outcome.fun)
                survivors = self._distinct(early, param, centre, s.n_survivors)
                iterations += sum(c.outcome.nit for c in survivors)
                dropped = [c.outcome for c in early if all(c is not kept for kept in survivors)]
                outcomes = dropped + self._refine(objective, [c.x for c in survivors], scale, fev - fev // 2,
                                                  local_ftol, warm)
            ranked = sorted((_Candidate(o.x, o) for o in outcomes), key=lambda c: c.outcome.fun)
            if len(ranked) > 1:  # a finer level decides again between the rivals it refined
                rivals = self._rivals(ranked, param, centre)
                ambiguity = rivals[0][1] if rivals else None
                keep = s.n_refined[n] if global_search and n < len(s.n_refined) else 1
                candidates = self._distinct([ranked[0]] + [c for c, _ in rivals], param, centre, keep)
            else:
                candidates = ranked
            starts = [c.x for c in candidates]
            iterations += sum(o.nit for o in outcomes)
            if n == profile_level:
                # Gauss-Newton takes the curvature from finite differences a fraction of a millimetre
                # apart, where the images' fine structure makes the cost rougher than over the
                # millimetres that matter: it said 0.9 mm where the cost was flat over 10 mm of depth.
                along_ray = profile_sd(objective, starts[0], param.depth_step(), s.depth_profile_mm) * float(
                    np.sqrt(s.residual_correlation_px2)) * factors[-1] / factors[n]
            if n == profile_level and len(views) == 1 and s.search_depths_mm:
                # One view's depth is its flattest direction: a few iterations leave it near where
                # the start put it (the real CT's near-lateral view: 3-7 mm off at a lower similarity).
                tries = [starts[0] + d * param.ray_step() for d in s.search_depths_mm]
                deeper = self._refine(objective, tries, scale, fev, local_ftol, warm)
                iterations += sum(o.nit for o in deeper)
                k = int(np.argmin([o.fun for o in deeper]))
                if deeper[k].fun < ranked[0].outcome.fun:
                    starts[0] = deeper[k].x
                    stops.append(f"{name}: the start {s.search_depths_mm[k]:+g} mm along the ray fit better")
            stops.append(f"{name}: {ranked[0].outcome.stop_reason}, {model.bone.size_ijk} voxels")
            if (n == len(stages) - 1 and global_search and len(views) == 1 and s.depth_probe_mm
                    and along_ray > s.depth_probe_mm / 3.0):
                jumped = self._depth_jump(objective, param, candidates[0], scale, fev, local_ftol)
                if jumped is not None:
                    candidates[0], level_starts = jumped[0], [jumped[1]]
                    iterations += jumped[0].outcome.nit
                    stops.append(f"{name}: refined again from {jumped[2]:+.1f} mm along the ray, where the "
                                 f"depth profile has its minimum: {jumped[0].outcome.stop_reason}")
            evaluations += objective.evaluations
            timings[name] = time.perf_counter() - t0
        best = candidates[0]
        x = best.x
        # A fixed budget often ends on the iteration limit: count it as converged when the
        # finest level moved the centre's image less than a millimetre (depth may still move).
        x_from = min(level_starts, key=lambda x0: float(np.linalg.norm((x - x0) / scale)))  # where best began
        T_corr = param.correction(x)
        settled = _moved_in_plane_mm(views[0].T_cam_from_world, param.correction(x_from), T_corr, centre) < 1.0
        per_view_sim = objective.per_view(x)
        similarity = float(np.mean(per_view_sim))
        agreement = float(np.min(objective.patch_agreement(x)))
        in_plane_sd, depth_sd = self._uncertainty(best.outcome, stages[-1])
        depth_sd = max(depth_sd, along_ray)
        in_plane_sd = float(np.hypot(in_plane_sd, s.model_error_mm[0]))
        depth_sd = float(np.hypot(depth_sd, s.model_error_mm[1]))
        converged = best.outcome.converged or settled
        verdict = assess(similarity, per_view_sim if len(views) > 1 else [], converged, T_corr, centre,
                         s.quality if level is None else s.quality.for_one_vertebra(),
                         in_plane_sd_mm=in_plane_sd, depth_sd_mm=depth_sd, patch_agreement=agreement)
        if ambiguity is not None and verdict.status == "ok":
            verdict = replace(verdict, status="failed", reason=ambiguity)
        est_views = [v.with_pose(v.T_cam_from_world @ invert_rigid(T_corr)) for v in views]
        return RegistrationResult(
            status=verdict.status,
            reason=verdict.reason,
            T_world_corrected_from_world=T_corr,
            views=est_views,
            similarity=similarity,
            per_view_similarity=per_view_sim,
            confidence=verdict.confidence,
            evaluations=evaluations,
            iterations=iterations,
            time_s=time.perf_counter() - t_start,
            stop_reasons=stops,
            timings_s=timings,
            uncertainty_in_plane_mm=in_plane_sd,
            uncertainty_depth_mm=depth_sd,
            patch_agreement=agreement,
            prepare_s=self.prepare_s,
            level=None if level is None else str(level),
            jacobian=None if best.outcome.jacobian is None else LeastSquaresJacobian(
                best.outcome.jacobian, tuple(m.mask for m in objective.measures), T_roi),
        )

    def _refine(self, objective: "_Objective", starts: list[np.ndarray], scale: np.ndarray, max_fev: int,
                ftol: float, warm: dict) -> list[OptimizeOutcome]:
        """The local optimiser's outcome from every start (at most ``max_fev`` iterations).
        Several starts are refined concurrently on the evaluation threads, one start per
        thread: the threads then never wait for each other, as they do between the rounds
        of one optimiser's finite differences."""
        s = self.settings

        def refine(obj: _Objective, x: np.ndarray) -> OptimizeOutcome:
            return minimize(s.local_optimizer, obj, x, scale, ftol=ftol, max_fev=max_fev,
                            diff_step=s.jacobian_step, **warm)

        if objective.pool is None or len(starts) < 2:
            return [refine(objective, x) for x in starts]
        serial = objective.one_thread()
        return list(objective.pool.map(lambda x: refine(serial, x), starts))

    def _depth_jump(self, objective: "_Objective", param: PoseParameterization, best: _Candidate,
                    scale: np.ndarray, max_fev: int, ftol: float
                    ) -> tuple[_Candidate, np.ndarray, float] | None:
        """One view's result refined again where the cost's depth profile over
        +-``depth_probe_mm`` has its minimum, when that lies beyond the probe (at most
        ``depth_jump_mm`` away), and from twice as far (both at once, one per thread): the
        better result, its start and the offset (mm along the ray), or None when the
        profile's minimum is near or neither refinement lowers the cost."""
        s = self.settings
        direction = param.depth_step()
        offset = profile_vertex(objective, best.x, direction, s.depth_probe_mm, s.depth_jump_mm)
        if abs(offset) <= s.depth_probe_mm:
            return None
        offsets = [offset, float(np.clip(2.0 * offset, -s.depth_jump_mm, s.depth_jump_mm))]
        starts = [best.x + d * direction for d in offsets]
        outcomes = self._refine(objective, starts, scale, max_fev, ftol, {})
        k = int(np.argmin([o.fun for o in outcomes]))
        if outcomes[k].fun >= best.outcome.fun:
            return None
        return _Candidate(outcomes[k].x, outcomes[k]), starts[k], offsets[k]

    def _profile_level(self, factors: tuple[int, ...]) -> int:
        """The pyramid level whose cost's depth profile is taken: the one binned
        ``depth_profile_binning`` times the finest level's, else the finest."""
        wanted = factors[-1] * self.settings.depth_profile_binning
        return factors.index(wanted) if wanted in factors else len(factors) - 1

    def _uncertainty(self, outcome: OptimizeOutcome, stage: list[_PyramidLevel]) -> tuple[float, float]:
        """1-sigma uncertainty (mm) of the rotation centre in the first view's image plane
        (the larger principal axis) and along its principal ray, from the last
        refinement's Gauss-Newton covariance (infinite when the optimiser gives none).

        With the "camera" parameterisation, tx, ty, tz are the centre's motion in the
        first view's camera axes; with "world" they are rotated into them."""
        if outcome.covariance is None:
            return float("inf"), float("inf")
        C = outcome.covariance[3:, 3:] * self.settings.residual_correlation_px2
        if self.settings.parameterization == "world":
            R = stage[0].view.T_cam_from_world[:3, :3]
            C = R @ C @ R.T
        in_plane = float(np.sqrt(max(np.linalg.eigvalsh(C[:2, :2]).max(), 0.0)))
        return in_plane, float(np.sqrt(max(C[2, 2], 0.0)))


class _Objective:
    """Cost of a parameter vector on one pyramid level: renders every view at the
    corrected pose and compares it with that view's image.

    Least squares sees the residuals of all views (plus the prior's); the scalar cost
    is the same squared norm, scaled to -1 for a perfect match without prior. The
    residuals of the last few parameter vectors are kept, so the cost and the per-view
    similarities of the optimiser's final point cost no new render. With a ``pool``,
    ``residuals_many`` evaluates its vectors concurrently (each thread its own buffers).
    With ``analytic``, every evaluation also renders the DRRs' motion derivatives, from
    which ``derivatives`` gives every Jacobian column at a point evaluated before: the
    local optimiser then renders no finite differences.
    """

    memory = 32  # enough for two optimisers running at once (``one_thread``)

    def __init__(self, stage, models, param, measures, parallel: bool | None = None,
                 pool: ThreadPoolExecutor | None = None, analytic: bool = False):
        self.stage = stage
        self.models = models  # one per view (``AnatomyModel.fixed_for`` its view)
        self.param = param
        self.measures = measures
        self.parallel = parallel
        self.pool = pool
        self.analytic = analytic
        self.n_blocks = sum(m.n_blocks for m in measures)
        self.prior = None
        self._count = [0]  # evaluations, shared with ``one_thread`` copies
        # residuals, DRRs and their motion derivatives (``analytic``) of the last few vectors
        self._recent: dict[bytes, tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]] = {}
        self._view_sizes: list[int] | None = None  # residuals per view, known after the first evaluation
        self._lock = threading.Lock()
        self._buffers = threading.local()

    @property
    def evaluations(self) -> int:
        """Parameter vectors rendered and compared so far."""
        return self._count[0]

    def set_prior(self, x0: np.ndarray, sd: np.ndarray, weight: float) -> None:
        self.prior = (x0, sd, np.sqrt(weight))

    def one_thread(self) -> "_Objective":
        """This objective evaluating one vector at a time on the calling thread, each render
        on one thread (for optimisers that run concurrently on the pool); it shares the
        kept evaluations and the count."""
        serial = copy.copy(self)
        serial.pool, serial.parallel = None, False
        return serial

    def _drrs(self, x: np.ndarray, parallel: bool | None, with_motion: bool = True):
        """Per view the DRR at x (in this thread's buffer) and, with ``analytic`` and
        ``with_motion``, its motion derivative (``AnatomyModel.render_motion``: new arrays), else None."""
        with self._lock:
            self._count[0] += 1
        buffers = getattr(self._buffers, "images", None)
        if buffers is None:
            buffers = self._buffers.images = [np.empty(pl.view.shape, np.float32) for pl in self.stage]
        T_corr_inv = invert_rigid(self.param.correction(x))
        for pl, model, buf in zip(self.stage, self.models, buffers):
            view = pl.view.with_pose(pl.view.T_cam_from_world @ T_corr_inv)
            if self.analytic and with_motion:
                yield model.render_motion(view, parallel=parallel)
            else:
                yield model.render(view, out=buf, parallel=parallel), None

    def per_view(self, x: np.ndarray) -> list[float]:
        """Each view's similarity score at x (from the kept residuals when x was evaluated)."""
        kept = self._recent.get(np.asarray(x, dtype=np.float64).tobytes())
        if kept is None or self._view_sizes is None:
            return [float(m.score(drr)) for m, (drr, _) in zip(self.measures, self._drrs(x, self.parallel))]
        r = kept[0]
        parts = np.split(r[:sum(self._view_sizes)], np.cumsum(self._view_sizes)[:-1])
        return [float(1.0 - np.dot(p, p) / (2.0 * m.n_blocks)) if m.n_blocks else 0.0
                for m, p in zip(self.measures, parts)]

    def patch_agreement(self, x: np.ndarray) -> list[float]:
        """Each view's ``similarity.patch_agreement`` of its image and the DRR at x, over the
        level's ROI (the DRRs kept from x's evaluation, else one more render per view)."""
        kept = self._recent.get(np.asarray(x, dtype=np.float64).tobytes())
        if kept is not None and kept[1]:
            drrs = kept[1]
        else:
            drrs = [drr for drr, _ in self._drrs(x, self.parallel, with_motion=False)]
        return [patch_agreement(pl.image, drr, m.mask) for pl, m, drr in zip(self.stage, self.measures, drrs)]

    def scalar(self, x: np.ndarray) -> float:
        r = self.residuals(x)
        return float(np.dot(r, r)) / (2.0 * self.n_blocks) - 1.0

    def residuals(self, x: np.ndarray) -> np.ndarray:
        return self._residuals(x, self.parallel)

    def residuals_many(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """``residuals`` of every vector, concurrently on the pool when there is one. Without
        motion derivatives: these points (finite differences, a cost profile) are never
        differentiated."""
        if self.pool is None or len(xs) < 2:
            return [self._evaluated(x, self.parallel, with_motion=False)[0] for x in xs]
        return list(self.pool.map(lambda x: self._evaluated(x, False, with_motion=False)[0], xs))

    def _residuals(self, x: np.ndarray, parallel: bool | None) -> np.ndarray:
        return self._evaluated(x, parallel)[0]

    def _evaluated(self, x: np.ndarray, parallel: bool | None, with_motion: bool = True
                   ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Residuals at x and, with ``analytic`` and ``with_motion``, the DRRs they came from
        and their motion derivatives (kept for the last few x). Rendering the motion
        derivative with every evaluation costs about 10% more per render, and saves the
        render of the point that the optimiser accepts and differentiates next."""
        key = np.asarray(x, dtype=np.float64).tobytes()
        kept = self._recent.get(key)
        if kept is not None and (kept[2] or not (self.analytic and with_motion)):
            return kept
        drrs, motions, parts = [], [], []
        for m, (drr, motion) in zip(self.measures, self._drrs(x, parallel, with_motion)):
            if motion is not None:
                drrs.append(drr)
                motions.append(motion)
            parts.append(m.residuals(drr))
        self._view_sizes = [len(p) for p in parts]
        if self.prior is not None:
            x0, sd, w = self.prior
            parts.append(w * (np.asarray(x) - x0) / sd)
        kept = (np.concatenate(parts), drrs, motions)
        with self._lock:
            if len(self._recent) >= self.memory:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = kept
        return kept

    def _twists(self, x: np.ndarray) -> list[np.ndarray]:
        """Per view, per parameter k, the motion (w rad, b mm; 6 x 6, a row each) of the
        anatomy in that view's camera per unit of x_k at x (central differences of the exact
        4 x 4 transforms)."""
        h = 1e-4
        inverse = [invert_rigid(self.param.correction(x + t * np.eye(6)[k])) for k in range(6) for t in (h, -h)]
        T_inv = invert_rigid(self.param.correction(x))
        out = []
        for pl in self.stage:
            T = pl.view.T_cam_from_world
            P_inv = invert_rigid(T @ T_inv)
            twists = np.empty((6, 6))
            for k in range(6):
                V = T @ (inverse[2 * k] - inverse[2 * k + 1]) @ P_inv / (2.0 * h)
                twists[k] = [0.5 * (V[2, 1] - V[1, 2]), 0.5 * (V[0, 2] - V[2, 0]), 0.5 * (V[1, 0] - V[0, 1]),
                             *V[:3, 3]]
            out.append(twists)
        return out

    def derivatives(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """d residuals / d x_k (per degree or mm) at x of every parameter, from the DRRs and
        their motion derivatives rendered there (none without ``analytic``: the optimiser
        then takes finite differences)."""
        if not self.analytic:
            return {}
        x = np.asarray(x, dtype=np.float64)
        _, images, motions = self._evaluated(x, self.parallel)
        columns: list[list[np.ndarray]] = [[] for _ in range(6)]
        for twists, measure, image, motion in zip(self._twists(x), self.measures, images, motions):
            changes = motion.reshape(-1, 6) @ twists.T.astype(np.float32)
            parts = measure.residual_derivatives(image, [changes[:, k].reshape(image.shape) for k in range(6)])
            for column, part in zip(columns, parts):
                column.append(part)
        if self.prior is not None:
            _, sd, w = self.prior
            for k, column in enumerate(columns):
                column.append(w * np.eye(6)[k] / sd[k])
        return {k: np.concatenate(column) for k, column in enumerate(columns)}


def register_levels(
    registrator: Registrator,
    images: list[PreparedImage],
    views: list[View],
    levels: dict[str, int],
    *,
    max_disagreement_mm: float = 10.0,
    level_prior_sd: tuple[float, ...] = (5.0, 5.0, 5.0, 5.0, 5.0, 2.0),
) -> RegistrationResult:
    """Register the whole spine, then every visible vertebra on its own.

    ``levels`` maps level names to label ids. Each vertebra starts from the whole-spine
    correction and is refined locally; a level whose registration fails or whose
    correction moves its centre more than ``max_disagreement_mm`` away from where the
    whole-spine correction puts it is marked failed. ``level_prior_sd`` (deg x3, mm x3
    in the reference camera frame) ties each level loosely to the spine, tightest in
    depth, which a single vertebra in one view hardly constrains. The returned result is the
    whole-spine one with ``level_poses`` (level -> T_world_corrected_from_world) and
    ``level_status`` filled in; it fails when no level succeeds.
    """
    t0 = time.perf_counter()
    spine = registrator.register(images, views)
    poses: dict[str, np.ndarray] = {}
    status: dict[str, str] = {}
    for name, label in levels.items():
        try:
            centre = registrator.centre(label)
        except VolumeError:
            status[name] = "failed: label not present"
            continue
        if not _visible(centre, spine.views):
            status[name] = "failed: not in the field of view"
            continue
        result = registrator.register(images, views, level=label,
                                      initial_T_world_corrected_from_world=spine.T_world_corrected_from_world,
                                      global_search=False, pyramid=registrator.settings.pyramid[1:],
                                      prior_sd=level_prior_sd)
        T_spine, T_level = spine.T_world_corrected_from_world, result.T_world_corrected_from_world
        moved = point_displacement_mm(T_level, T_spine, centre)
        if not result.ok:
            status[name] = f"failed: {result.reason}"
        elif moved > max_disagreement_mm:
            status[name] = f"failed: disagrees with the spine by {moved:.1f} mm"
        else:
            status[name] = "ok"
            poses[name] = T_level
    verdict = {}
    if spine.ok and not poses:
        verdict = {"status": "failed", "reason": "no vertebra registered on its own"}
    return replace(spine, level_poses=poses, level_status=status, time_s=time.perf_counter() - t0, **verdict)


def _visible(point_world: np.ndarray, views: list[View]) -> bool:
    """Whether a world point projects inside at least one image."""
    for view in views:
        u, v = project(view.P, point_world[None])[0]
        if 0 <= u < view.width and 0 <= v < view.height:
            return True
    return False
