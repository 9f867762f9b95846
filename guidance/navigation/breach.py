"""Breach prediction and guidance metrics for an instrument advancing along a planned path.

The bony corridor of a planned trajectory is modelled from the vertebra labels and the CT
as a signed distance map (mm, negative inside the corridor) on a local crop around the
trajectory:

- posterior (pedicle screw): the corridor is the vertebra's bone, its label united with
  CT voxels above a bone threshold next to it (cortex the label may have missed);
- lateral / anterior (interbody cage): the corridor is the disc space, the non-bone voxels
  between the two vertebrae whose summed distance to both bodies is at most the disc
  height at the plan's target plus 2 mm (endplates above and below, the walls' rim
  around); the cage is taken as a cylinder of its height.

The instrument's extension is the path of the implant: from where the planned implant
first lies fully inside the corridor (``corridor_start_mm`` along the plan; the entry zone
before it is where a screw crosses the cortex by design) to the plan's target depth,
along the instrument's own axis. Along it, the implant (diameter from the plan) protrudes
from the corridor by ``signed distance + radius``; the largest protrusion is the
predicted breach, graded by Gertzbein-Robbins (A: none, B < 2 mm, C 2-4 mm, D 4-6 mm,
E > 6 mm) with its side in the vertebra's frame (x left, y posterior, z superior).

Frames: everything in world = LPS mm of the pre-op CT; ``axis_world`` points from the
handle towards the tip (as in ``guidance.navigation.instruments``).

scipy.ndimage is imported by the functions that use it: the wire imports this module
for ``GRADES`` and ``BREACH_SIDES`` before a live process's first heartbeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import invert_rigid, make_rigid, transform_points
from guidance.core.levels import level_label
from guidance.core.plan import implant_diameter_mm, trajectory_approach, trajectory_endpoints
from guidance.core.volume import Volume

__all__ = [
    "GRADES",
    "BREACH_SIDES",
    "BREACH_WARNING_MM",
    "BreachError",
    "CorridorModel",
    "BreachPrediction",
    "gertzbein_robbins_grade",
    "breach_side",
    "signed_distance_from_mask",
    "vertebra_frame_from_labels",
    "build_corridor",
    "predict_breach",
    "guidance_metrics",
]

GRADES = ("A", "B", "C", "D", "E")
"""Gertzbein-Robbins grades: A none, B < 2 mm, C 2-4 mm, D 4-6 mm, E > 6 mm."""
BREACH_SIDES = ("medial", "lateral", "superior", "inferior", "anterior", "posterior")
BREACH_WARNING_MM = 1.0
"""A predicted protrusion above this raises the breach warning (half way into grade B, so
model noise of a few tenths of a mm does not flag a screw that just touches the cortex)."""
MAX_ANGLE_DEG = 60.0
"""No prediction for an instrument more than this off the planned direction."""
_BONE_THRESHOLD_HU = 700.0
"""CT voxels next to the label at or above this (HU) count as bone: about half way from soft
tissue to cortex, so a partial-volume voxel counts only when it is mostly bone."""
_DISC_SLACK_MM = 2.0


class BreachError(GuidanceError):
    """A corridor that cannot be modelled (label missing, trajectory outside the volume)."""


def gertzbein_robbins_grade(breach_mm: float) -> str:
    """Gertzbein-Robbins grade of a cortical breach of ``breach_mm`` (mm, <= 0: none)."""
    if not math.isfinite(breach_mm):
        raise BreachError(f"breach_mm must be finite, got {breach_mm}")
    if breach_mm <= 0.0:
        return "A"
    if breach_mm < 2.0:
        return "B"
    if breach_mm < 4.0:
        return "C"
    return "D" if breach_mm <= 6.0 else "E"


def breach_side(normal_vertebra: np.ndarray, point_vertebra: np.ndarray) -> str:
    """The side of a breach from the corridor's outward normal at the breach and the
    breach point, both in the vertebra's frame (x left, y posterior, z superior, origin on
    the midline): the normal's largest component names it; along x, "medial" when the
    normal points towards the midline, else "lateral"."""
    n = np.asarray(normal_vertebra, dtype=float).reshape(3)
    p = np.asarray(point_vertebra, dtype=float).reshape(3)
    k = int(np.argmax(np.abs(n)))
    if k == 0:
        return "medial" if n[0] * p[0] < 0 else "lateral"
    if k == 1:
        return "posterior" if n[1] > 0 else "anterior"
    return "superior" if n[2] > 0 else "inferior"


def signed_distance_from_mask(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Signed distance (mm, negative inside) to the surface of a boolean (k, j, i) mask,
    whose surface is taken half way between inside and outside voxel centres."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        raise BreachError("the corridor mask is empty or fills its whole crop")
    half = 0.5 * float(min(spacing_zyx))
    outside = distance_transform_edt(~mask, sampling=spacing_zyx)
    inside = distance_transform_edt(mask, sampling=spacing_zyx)
    return np.where(mask, half - inside, outside - half).astype(np.float32)


def vertebra_frame_from_labels(labels: Volume, label: int) -> np.ndarray:
    """An approximate ``T_world_from_vertebra``: origin at the label's centroid (on the
    midline for a symmetric vertebra), axes those of the world (LPS). Pass the true frame
    where known (the phantom has it)."""
    kji = np.argwhere(np.asarray(labels.data) == label)
    if len(kji) == 0:
        raise BreachError(f"label {label} is not present in the label volume")
    return make_rigid(np.eye(3), labels.index_to_world(kji[:, ::-1].astype(float)).mean(axis=0))


@dataclass(frozen=True)
class CorridorModel:
    """The corridor of one planned trajectory: its signed distance map (mm, negative
    inside; (k, j, i) on a crop whose index -> world map is ``T_world_from_crop_index``),
    the implant radius (mm), where along the plan the implant first lies inside it
    (``corridor_start_mm`` past the entry) and the vertebra frame used to name sides."""

    trajectory: dict
    kind: str
    signed_distance: np.ndarray
    T_world_from_crop_index: np.ndarray
    implant_radius_mm: float
    corridor_start_mm: float
    T_world_from_vertebra: np.ndarray

    def sample(self, points_world: np.ndarray) -> np.ndarray:
        """Signed distance (mm) at world points (N, 3), trilinear (edge values outside)."""
        from scipy.ndimage import map_coordinates

        ijk = transform_points(np.linalg.inv(self.T_world_from_crop_index), np.atleast_2d(points_world))
        return map_coordinates(self.signed_distance, ijk[:, ::-1].T, order=1, mode="nearest")

    def normal(self, point_world: np.ndarray, step_mm: float = 0.75) -> np.ndarray:
        """Outward unit normal of the corridor near a world point (central differences)."""
        p = np.asarray(point_world, dtype=float).reshape(3)
        offsets = np.vstack([np.eye(3), -np.eye(3)]) * step_mm
        d = self.sample(p + offsets)
        g = d[:3] - d[3:]
        norm = float(np.linalg.norm(g))
        return g / norm if norm > 0 else np.zeros(3)


def _crop(labels: Volume, points: np.ndarray, margin_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """(slices [k, j, i], T_world_from_crop_index) of the label voxels around points (mm)."""
    spacing = labels.spacing
    ijk = labels.world_to_index(points)
    lo = np.floor(ijk.min(axis=0) - margin_mm / spacing).astype(int)
    hi = np.ceil(ijk.max(axis=0) + margin_mm / spacing).astype(int) + 1
    size = np.array(labels.size_ijk)
    lo, hi = np.clip(lo, 0, size), np.clip(hi, 0, size)
    if np.any(hi - lo < 2):
        raise BreachError("the trajectory lies outside the label volume")
    T = labels.T_world_from_index @ make_rigid(np.eye(3), lo.astype(float))
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), T


def _ct_on_crop(ct: Volume, labels: Volume, sl: tuple[slice, ...], T_world_from_crop: np.ndarray) -> np.ndarray:
    """The CT (HU) at the crop's voxel centres (a slice when both share one grid)."""
    from scipy.ndimage import map_coordinates

    if ct.data.shape == labels.data.shape and np.allclose(ct.T_world_from_index, labels.T_world_from_index):
        return np.asarray(ct.data[sl], dtype=np.float32)
    shape = tuple(s.stop - s.start for s in sl)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    world = transform_points(T_world_from_crop, np.column_stack([i.ravel(), j.ravel(), k.ravel()]).astype(float))
    ijk = ct.world_to_index(world)
    hu = map_coordinates(ct.data, ijk[:, ::-1].T, order=1, mode="constant", cval=-1000.0)
    return hu.reshape(shape).astype(np.float32)


def _bone(lab: np.ndarray, hu: np.ndarray, label: int, threshold_hu: float) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    own = lab == label
    if not own.any():
        raise BreachError(f"label {label} is not present around the trajectory")
    return own | ((hu >= threshold_hu) & binary_dilation(own) & (lab == 0))


def build_corridor(ct: Volume, labels: Volume, trajectory: dict, *,
                   T_world_from_vertebra: np.ndarray | None = None,
                   bone_threshold_hu: float = _BONE_THRESHOLD_HU, margin_mm: float = 20.0,
                   step_mm: float = 0.25) -> CorridorModel:
    """The corridor model of a planned trajectory (module docstring) from the CT (HU) and
    labels (any grids; the crop is on the labels' grid). ``T_world_from_vertebra``: the
    vertebra frame that names breach sides (default ``vertebra_frame_from_labels``)."""
    from scipy.ndimage import distance_transform_edt, map_coordinates

    if ct.units != "HU":
        raise BreachError(f"build_corridor needs the CT in HU, got units {ct.units!r}")
    entry, target = trajectory_endpoints(trajectory)
    approach = trajectory_approach(trajectory)
    sl, T_crop = _crop(labels, np.stack([entry, target]), margin_mm)
    lab = np.asarray(labels.data[sl])
    hu = _ct_on_crop(ct, labels, sl, T_crop)
    spacing_zyx = tuple(float(s) for s in labels.spacing[::-1])
    label = int(trajectory["label"])
    if approach == "posterior":
        kind = "pedicle"
        corridor = _bone(lab, hu, label, bone_threshold_hu)
    else:
        kind = "disc"
        below = level_label(trajectory["level_below"])
        upper, lower = _bone(lab, hu, label, bone_threshold_hu), _bone(lab, hu, below, bone_threshold_hu)
        gap = (distance_transform_edt(~upper, sampling=spacing_zyx)
               + distance_transform_edt(~lower, sampling=spacing_zyx))
        ijk = transform_points(np.linalg.inv(T_crop), target[None])
        height = float(map_coordinates(gap, ijk[:, ::-1].T, order=1, mode="nearest")[0])
        corridor = ~(upper | lower) & (gap <= height + _DISC_SLACK_MM)
    sd = signed_distance_from_mask(corridor, spacing_zyx)
    frame = T_world_from_vertebra if T_world_from_vertebra is not None else vertebra_frame_from_labels(labels, label)
    model = CorridorModel(trajectory=trajectory, kind=kind, signed_distance=sd, T_world_from_crop_index=T_crop,
                          implant_radius_mm=implant_diameter_mm(trajectory) / 2.0, corridor_start_mm=0.0,
                          T_world_from_vertebra=np.asarray(frame, dtype=float))
    length = float(np.linalg.norm(target - entry))
    depths = np.append(np.arange(0.0, length, step_mm), length)
    protrusion = model.sample(entry + depths[:, None] * (target - entry) / length) + model.implant_radius_mm
    inside = np.flatnonzero(protrusion <= 0.0)
    start = depths[inside[0]] if len(inside) else depths[int(np.argmin(protrusion))]
    return replace(model, corridor_start_mm=float(start))


@dataclass(frozen=True)
class BreachPrediction:
    """The predicted breach of the implant along the instrument's path (mm).

    ``breach_mm``: largest protrusion of the implant from the corridor (0: none);
    ``grade``: Gertzbein-Robbins grade; ``side``: one of ``BREACH_SIDES`` (None without a
    breach); ``point_world``: where the protrusion is largest; ``clearance_mm``: smallest
    distance from the implant's surface to the corridor wall along the path still ahead
    of the tip (negative: protruding; None when the tip is past the plan's depth);
    ``travel_to_breach_mm``: how far the tip still has to advance to where the breach
    starts (0: already there; None without a breach); ``warning``: ``breach_mm`` above
    the warning threshold.
    """

    breach_mm: float
    grade: str
    side: str | None
    point_world: np.ndarray | None
    clearance_mm: float | None
    travel_to_breach_mm: float | None
    warning: bool


def predict_breach(model: CorridorModel, tip_world: np.ndarray, axis_world: np.ndarray, *,
                   step_mm: float = 0.5, warning_mm: float = BREACH_WARNING_MM) -> BreachPrediction | None:
    """The breach the implant would make if placed along the instrument's line (module
    docstring); None when the instrument is more than ``MAX_ANGLE_DEG`` off the plan."""
    entry, target = trajectory_endpoints(model.trajectory)
    length = float(np.linalg.norm(target - entry))
    direction = (target - entry) / length
    tip = np.asarray(tip_world, dtype=float).reshape(3)
    axis = np.asarray(axis_world, dtype=float).reshape(3)
    axis = axis / np.linalg.norm(axis)
    cos = float(axis @ direction)
    if cos < math.cos(math.radians(MAX_ANGLE_DEG)):
        return None
    depth_tip = float((tip - entry) @ direction)
    s0, s1 = (model.corridor_start_mm - depth_tip) / cos, (length - depth_tip) / cos
    s = np.append(np.arange(s0, s1, step_mm), s1)
    points = tip + s[:, None] * axis
    protrusion = model.sample(points) + model.implant_radius_mm
    worst = int(np.argmax(protrusion))
    breach_mm = max(0.0, float(protrusion[worst]))
    ahead = s >= 0.0
    clearance = -float(protrusion[ahead].max()) if ahead.any() else None
    side, point, travel = None, None, None
    if breach_mm > 0.0:
        point = points[worst]
        T_vertebra_from_world = invert_rigid(model.T_world_from_vertebra)
        normal = T_vertebra_from_world[:3, :3] @ model.normal(point)
        side = breach_side(normal, transform_points(T_vertebra_from_world, point[None])[0])
        travel = max(0.0, float(s[int(np.argmax(protrusion > 0.0))]))
    return BreachPrediction(breach_mm=breach_mm, grade=gertzbein_robbins_grade(breach_mm), side=side,
                            point_world=point, clearance_mm=clearance, travel_to_breach_mm=travel,
                            warning=breach_mm > warning_mm)


def guidance_metrics(tip_world: np.ndarray, axis_world: np.ndarray, trajectory: dict,
                     corridor: CorridorModel | None = None) -> dict:
    """What the surgeon reads for an instrument and a planned trajectory (mm, degrees):

    ``depth_beyond_entry_mm`` (tip projected on the plan, from the entry, negative before
    it), ``to_target_along_plan_mm`` (plan depth left to the target), ``offset_at_tip_mm``
    (tip to the planned line), ``angle_to_plan_deg``, and with a corridor model the
    ``BreachPrediction`` fields prefixed ``breach_`` (``breach_mm``, ``breach_grade``,
    ``breach_side``, ``breach_warning``, ``clearance_mm``, ``travel_to_breach_mm``).
    """
    entry, target = trajectory_endpoints(trajectory)
    length = float(np.linalg.norm(target - entry))
    direction = (target - entry) / length
    tip = np.asarray(tip_world, dtype=float).reshape(3)
    axis = np.asarray(axis_world, dtype=float).reshape(3)
    axis = axis / np.linalg.norm(axis)
    depth = float((tip - entry) @ direction)
    out = {
        "depth_beyond_entry_mm": depth,
        "to_target_along_plan_mm": length - depth,
        "offset_at_tip_mm": float(np.linalg.norm(tip - entry - depth * direction)),
        "angle_to_plan_deg": math.degrees(math.acos(min(1.0, max(-1.0, float(axis @ direction))))),
    }
    if corridor is not None:
        p = predict_breach(corridor, tip, axis)
        if p is not None:
            out.update(breach_mm=p.breach_mm, breach_grade=p.grade, breach_side=p.side, breach_warning=p.warning,
                       clearance_mm=p.clearance_mm, travel_to_breach_mm=p.travel_to_breach_mm)
    return out
