"""2D/3D registration of X-ray views to a CT: single view, multi-view and per vertebra.

Composed from swappable parts named in ``RegistrationSettings``: the DRR renderer
(guidance.core.drr), a similarity (similarity.SIMILARITIES), a pose parameterisation
(pose.PARAMETERIZATIONS), optimisers (optimizers.OPTIMIZERS) and a detector /
volume pyramid. A registration runs a global search (CMA-ES) on the coarsest level,
then local refinement on finer levels, and ends in the quality gate.

The estimate is the rigid correction ``T_world_corrected_from_world`` shared by all
views (CONVENTIONS.md): ``T_cam_i_from_world = T_cam_i_from_world_init @ inv(T_corr)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import SimpleITK as sitk

from guidance.core.drr import DrrVolume, prepare_volume, render_drr
from guidance.core.geometry import invert_rigid, project
from guidance.core.images import PreparedImage
from guidance.registration.optimizers import minimize
from guidance.registration.pose import PoseParameterization, point_displacement_mm
from guidance.registration.quality import QualityLimits, assess
from guidance.registration.similarity import get_similarity
from guidance.core.views import View
from guidance.core.volume import Volume, VolumeError, hu_to_attenuation, resample, volume_from_sitk, volume_to_sitk

__all__ = ["RegistrationSettings", "RegistrationResult", "Registrator", "RegistrationError", "register_levels"]


class RegistrationError(ValueError):
    """Inputs that cannot be registered (mismatched images and views, unknown level)."""


@dataclass(frozen=True)
class RegistrationSettings:
    """Every choice of the registration, with units.

    ``search_scale`` is the typical step per parameter (rx, ry, rz deg; tx, ty, tz mm)
    of the global search; depth (tz in the "camera" parameterisation) gets the largest
    because one view observes it only through magnification. ``search_bound`` limits
    the global search to +- bound x scale. ``prior_weight`` weighs a Gaussian prior on
    the parameters (when a registration is given ``prior_sd``) against the image
    residuals, whose squared norm is 2 (1 - similarity) per normalised block.
    After the global stage both its optimum and the start are refined; when they end
    more than ``ambiguity_distance_mm`` apart with costs (about -similarity) closer than
    ``ambiguity_margin``, the result is failed as ambiguous.
    """

    similarity: str = "gradient_ncc"
    parameterization: str = "camera"
    global_optimizer: str = "cmaes"
    local_optimizer: str = "least_squares"
    pyramid: tuple[int, ...] = (4, 2, 1)
    max_detector_px: int = 256
    search_scale: tuple[float, ...] = (4.0, 4.0, 4.0, 6.0, 6.0, 20.0)
    search_bound: float = 5.0
    popsize: int = 14
    max_generations: int = 45
    local_max_fev: int = 10
    bone_threshold_hu: float | None = 150.0
    energy_kev: float = 60.0
    fixed_blur_px: float = 0.7
    roi_margin_mm: float = 10.0
    prior_weight: float = 0.05
    ambiguity_margin: float = 0.02
    ambiguity_distance_mm: float = 5.0
    seed: int = 0
    quality: QualityLimits = field(default_factory=QualityLimits)


@dataclass
class RegistrationResult:
    """Outcome of one registration: poses, status and its reason, similarity, timings."""

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
    level: str | None = None
    level_poses: dict[str, np.ndarray] = field(default_factory=dict)
    level_status: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-ready result (poses as row-major nested lists)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "T_world_corrected_from_world": self.T_world_corrected_from_world.tolist(),
            "views": [{"T_cam_from_world": v.T_cam_from_world.tolist()} for v in self.views],
            "similarity": self.similarity,
            "per_view_similarity": self.per_view_similarity,
            "confidence": self.confidence,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "time_s": self.time_s,
            "stop_reasons": self.stop_reasons,
            "timings_s": self.timings_s,
            "level": self.level,
            "level_poses": {k: v.tolist() for k, v in self.level_poses.items()},
            "level_status": self.level_status,
        }


@dataclass(frozen=True)
class _Level:
    """One pyramid level of one view: binned image, mask and view."""

    image: np.ndarray
    mask: np.ndarray
    view: View


def _bin_image(image: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``factor`` x ``factor`` blocks (matches View.downsampled pixel centres)."""
    if factor == 1:
        return image, mask
    H, W = image.shape
    h, w = H // factor, W // factor
    img = image[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))
    m = mask[: h * factor, : w * factor].reshape(h, factor, w, factor).all(axis=(1, 3))
    return img.astype(np.float32), m


def _smooth(volume: Volume, spacing_mm: float) -> Volume:
    """Gaussian pre-filter and resample to an isotropic coarser grid (anti-aliased)."""
    sigma = 0.5 * spacing_mm
    image = sitk.SmoothingRecursiveGaussian(volume_to_sitk(volume), sigma)
    smoothed = volume_from_sitk(image, units=volume.units)
    coarse = resample(smoothed, spacing=(spacing_mm,) * 3, default_value=0.0)
    return coarse.with_data(np.clip(coarse.data, 0.0, None))


class Registrator:
    """A CT prepared for repeated 2D/3D registration (DRR volume pyramid cached).

    ``ct`` is in HU; ``labels`` (same grid, optional) enables per-vertebra
    registration with ``level`` given as a label id.
    """

    def __init__(
        self,
        ct: Volume,
        *,
        labels: Volume | None = None,
        settings: RegistrationSettings | None = None,
    ) -> None:
        self.settings = settings or RegistrationSettings()
        get_similarity(self.settings.similarity)
        if labels is not None and labels.data.shape != ct.data.shape:
            raise VolumeError(f"labels grid {labels.data.shape} differs from the CT grid {ct.data.shape}")
        mu = hu_to_attenuation(ct, energy_kev=self.settings.energy_kev)
        if self.settings.bone_threshold_hu is not None:
            mu = mu.with_data(np.where(ct.data >= self.settings.bone_threshold_hu, mu.data, 0.0).astype(np.float32))
        self.mu = mu
        self.labels = labels
        self._cache: dict[tuple, DrrVolume] = {}
        self._centres: dict[int | None, np.ndarray] = {}

    # -- volumes -------------------------------------------------------------------------

    def drr_volume(self, level: int | None, spacing_mm: float) -> DrrVolume:
        """The rendering volume of one vertebra (label id) or all (None) at a spacing."""
        base = float(self.mu.spacing.min())
        spacing_mm = max(base, round(spacing_mm / base) * base)
        key = (level, round(spacing_mm, 3))
        if key not in self._cache:
            if level is None:
                prepared = prepare_volume(self.mu)
            else:
                if self.labels is None:
                    raise RegistrationError("per-vertebra registration needs a label map")
                prepared = prepare_volume(self.mu, labels=self.labels, label_ids=[level], margin_mm=3.0)
            if spacing_mm > base * 1.01:
                prepared = prepare_volume(_smooth(prepared.volume, spacing_mm))
            self._cache[key] = prepared
        return self._cache[key]

    def centre(self, level: int | None) -> np.ndarray:
        """Rotation centre (world mm): centroid of the rendered bone of that level."""
        if level not in self._centres:
            dv = self.drr_volume(level, 0.0)
            mu = dv.mu
            kk, jj, ii = np.nonzero(mu > 0)
            w = mu[kk, jj, ii]
            ijk = np.array([np.average(ii, weights=w), np.average(jj, weights=w), np.average(kk, weights=w)])
            self._centres[level] = dv.volume.index_to_world(ijk)[0]
        return self._centres[level]

    # -- pyramid -------------------------------------------------------------------------

    def _levels(
        self, images: list[PreparedImage], views: list[View], pyramid: tuple[int, ...]
    ) -> list[list[_Level]]:
        """Per pyramid level (coarse first), per view: binned image, mask and view."""
        s = self.settings
        out = []
        for factor in pyramid:
            per_view = []
            for img, view in zip(images, views):
                base = max(1, int(np.ceil(max(view.image_size) / s.max_detector_px)))
                f = base * factor
                image, mask = _bin_image(img.image, img.mask, f)
                if s.fixed_blur_px > 0:
                    image = cv2.GaussianBlur(image, (0, 0), s.fixed_blur_px)
                v = view.downsampled(f) if f > 1 else view
                v = replace(v, image_size=(image.shape[1], image.shape[0]))
                per_view.append(_Level(image=image, mask=mask, view=v))
            out.append(per_view)
        return out

    def _footprint_mm(self, level: _Level, centre: np.ndarray) -> float:
        """Detector pixel size back-projected to the anatomy centre (mm)."""
        depth = float(level.view.T_cam_from_world[2, :3] @ centre + level.view.T_cam_from_world[2, 3])
        return depth / float(level.view.K[0, 0])

    # -- cost ----------------------------------------------------------------------------

    def _roi(self, dv: DrrVolume, view: View, mask: np.ndarray, level: int | None) -> np.ndarray:
        """Valid pixels, restricted for one vertebra to its projected box plus a margin."""
        if level is None:
            return mask
        corners = dv.volume.corners_world()
        centre = corners.mean(axis=0)
        grow = 1.0 + 2.0 * self.settings.roi_margin_mm / np.ptp(corners, axis=0).max()
        uv = project(view.P, centre + (corners - centre) * grow)
        H, W = mask.shape
        u0, v0 = np.clip(np.floor(uv.min(axis=0)).astype(int), 0, [W, H])
        u1, v1 = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 1, 0, [W, H])
        roi = np.zeros_like(mask)
        roi[v0:v1, u0:u1] = mask[v0:v1, u0:u1]
        return roi

    def _ambiguity(self, best, second, param: PoseParameterization, centre: np.ndarray) -> str | None:
        """A reason when two refined candidates match (almost) equally well although their
        poses differ, e.g. a shift by one vertebral level along a repetitive spine."""
        s = self.settings
        gap = second.fun - best.fun
        T_a, T_b = param.correction(best.x), param.correction(second.x)
        apart_mm = point_displacement_mm(T_a, T_b, centre)
        if apart_mm > s.ambiguity_distance_mm and gap < s.ambiguity_margin:
            return (f"ambiguous: two poses {apart_mm:.0f} mm apart match almost equally "
                    f"(cost gap {gap:.3f} < {s.ambiguity_margin})")
        return None

    def _objective(
        self, levels: list[_Level], dv: DrrVolume, param: PoseParameterization, level: int | None
    ) -> "_Objective":
        """The cost of one pyramid level; the ROI is fixed at the initial pose."""
        similarity = get_similarity(self.settings.similarity)
        measures = [similarity(lv.image, self._roi(dv, lv.view, lv.mask, level)) for lv in levels]
        return _Objective(levels, dv, param, measures)

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
    ) -> RegistrationResult:
        """Register preprocessed images (one per view, views carry the initial poses).

        With ``global_search`` the coarsest level runs CMA-ES; finer levels are refined
        locally. ``level`` (a label id) registers that vertebra alone. ``prior_sd``
        (deg, deg, deg, mm, mm, mm) keeps the solution near the initial correction, e.g.
        in depth, which one view hardly observes.
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
        x = np.zeros(6) if initial_T_world_corrected_from_world is None else param.params(
            initial_T_world_corrected_from_world)
        x_prior = x.copy()
        scale = np.asarray(s.search_scale, dtype=float)
        pyramid_levels = self._levels(images, views, s.pyramid if pyramid is None else pyramid)
        timings: dict[str, float] = {}
        stops: list[str] = []
        evaluations = iterations = 0
        outcome = None
        ambiguity = None
        candidates = [x]
        for n, levels in enumerate(pyramid_levels):
            t0 = time.perf_counter()
            spacing = 0.7 * self._footprint_mm(levels[0], centre)
            dv = self.drr_volume(level, spacing)
            objective = self._objective(levels, dv, param, level)
            if prior_sd is not None:
                objective.set_prior(x_prior, np.asarray(prior_sd, dtype=float), s.prior_weight)
            if n == 0 and global_search:
                outcome = minimize(
                    s.global_optimizer, objective, x, scale, sigma=1.0, popsize=s.popsize,
                    max_iter=s.max_generations, bound=s.search_bound, seed=s.seed,
                )
                stage = f"global@{levels[0].view.width}px"
                candidates = [outcome.x]
                if np.linalg.norm((outcome.x - x_prior) / scale) > 0.5:
                    candidates.append(x_prior)  # the start itself, in case the search left its basin
            else:
                refined = [minimize(s.local_optimizer, objective, c, scale, ftol=local_ftol,
                                    max_fev=s.local_max_fev if local_max_fev is None else local_max_fev)
                           for c in candidates]
                order = np.argsort([r.fun for r in refined])
                outcome = refined[order[0]]
                if len(refined) > 1:
                    ambiguity = self._ambiguity(refined[order[0]], refined[order[1]], param, centre)
                candidates = [outcome.x]
                stage = f"local@{levels[0].view.width}px" + (f" x{len(refined)}" if len(refined) > 1 else "")
            x = outcome.x
            evaluations += objective.evaluations
            iterations += outcome.nit
            stops.append(f"{stage}: {outcome.stop_reason}")
            timings[stage] = time.perf_counter() - t0
        per_view_sim = objective.per_view(x)
        similarity = float(np.mean(per_view_sim))
        T_corr = param.correction(x)
        verdict = assess(similarity, per_view_sim if len(views) > 1 else [], outcome.converged, T_corr, centre,
                         s.quality)
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
            level=None if level is None else str(level),
        )


class _Objective:
    """Cost of a parameter vector on one pyramid level: renders every view at the
    corrected pose and compares it with that view's image.

    Least squares sees the residuals of all views (plus the prior's); the scalar cost
    is the same squared norm, scaled to -1 for a perfect match without prior.
    """

    def __init__(self, levels, dv, param, measures):
        self.levels = levels
        self.dv = dv
        self.param = param
        self.measures = measures
        self.buffers = [np.empty(lv.view.shape, np.float32) for lv in levels]
        self.n_blocks = sum(m.n_blocks for m in measures)
        self.prior = None
        self.evaluations = 0

    def set_prior(self, x0: np.ndarray, sd: np.ndarray, weight: float) -> None:
        self.prior = (x0, sd, np.sqrt(weight))

    def _drrs(self, x: np.ndarray):
        self.evaluations += 1
        T_corr_inv = invert_rigid(self.param.correction(x))
        for lv, buf in zip(self.levels, self.buffers):
            yield render_drr(self.dv, lv.view.with_pose(lv.view.T_cam_from_world @ T_corr_inv), out=buf)

    def per_view(self, x: np.ndarray) -> list[float]:
        return [float(m.score(drr)) for m, drr in zip(self.measures, self._drrs(x))]

    def scalar(self, x: np.ndarray) -> float:
        r = self.residuals(x)
        return float(np.dot(r, r)) / (2.0 * self.n_blocks) - 1.0

    def residuals(self, x: np.ndarray) -> np.ndarray:
        parts = [m.residuals(drr) for m, drr in zip(self.measures, self._drrs(x))]
        if self.prior is not None:
            x0, sd, w = self.prior
            parts.append(w * (np.asarray(x) - x0) / sd)
        return np.concatenate(parts)


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
    spine.level_poses = poses
    spine.level_status = status
    if spine.ok and not poses:
        spine.status, spine.reason = "failed", "no vertebra registered on its own"
    spine.time_s = time.perf_counter() - t0
    return spine


def _visible(point_world: np.ndarray, views: list[View]) -> bool:
    """Whether a world point projects inside at least one image."""
    for view in views:
        u, v = project(view.P, point_world[None])[0]
        if 0 <= u < view.width and 0 <= v < view.height:
            return True
    return False
