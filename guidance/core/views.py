"""The calibrated X-ray view: ``View`` dataclass, view files and the C-arm helper.

A view is a pinhole camera (docs/conventions.md): intrinsics K (pixels), the pose
``T_cam_from_world`` (world = LPS mm of the pre-op CT), the image size (W, H) and the
intensity kind of the pixels that come with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from guidance.core.errors import GuidanceError
from guidance.core.geometry import (
    GeometryError,
    check_rigid,
    decompose_projection,
    intrinsics,
    invert_rigid,
    make_rigid,
    projection_matrix,
)
from guidance.core.jsonfile import read_json_as

__all__ = [
    "INTENSITY_KINDS",
    "check_intensity",
    "VIEW_SCHEMA",
    "View",
    "ViewError",
    "view_to_dict",
    "view_from_dict",
    "read_view",
    "write_view",
    "view_path_for",
    "carm_view",
    "T_world_from_room",
]

VIEW_SCHEMA = "guidance.view/1"
INTENSITY_KINDS = ("line_integral", "raw", "display")
"""What an image's pixels mean (docs/conventions.md): "line_integral" float -log(I / I0),
"raw" detector counts (bright where unattenuated, with the view's I0), "display" an
8-bit monitor picture of unknown windowing and polarity."""
PATIENT_POSITIONS = ("supine", "prone")


class ViewError(GuidanceError):
    """A view (or view file) that violates the guidance.view/1 contract."""


def check_intensity(intensity: str) -> str:
    """``intensity`` if it is one of INTENSITY_KINDS, else ViewError naming them."""
    if intensity not in INTENSITY_KINDS:
        raise ViewError(f"intensity must be one of {', '.join(INTENSITY_KINDS)}; got {intensity!r}")
    return intensity


@dataclass(frozen=True, eq=False)
class View:
    """One calibrated X-ray image geometry. ``image_size`` is (W, H) in pixels.

    ``K`` maps camera (source frame, mm) to pixels; ``T_cam_from_world`` maps world (LPS
    mm of the pre-op CT) to camera. Views compare equal when every field but ``extra``
    is equal (arrays element by element), and hash accordingly.
    """

    K: np.ndarray
    T_cam_from_world: np.ndarray
    image_size: tuple[int, int]
    intensity: str = "line_integral"
    I0: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    source_to_detector_mm: float | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=float)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)):
            raise ViewError(f"K must be a finite 3x3 matrix, got shape {K.shape}")
        if abs(K[2, 2] - 1.0) > 1e-9 or abs(K[1, 0]) > 1e-9 or abs(K[2, 0]) > 1e-9 or abs(K[2, 1]) > 1e-9:
            raise ViewError("K must be upper triangular with K[2][2] = 1")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ViewError("K focal lengths K[0][0] and K[1][1] must be positive")
        try:
            T = check_rigid(self.T_cam_from_world, "T_cam_from_world")
        except GeometryError as exc:
            raise ViewError(str(exc)) from None
        try:
            W, H = (int(x) for x in self.image_size)
        except (TypeError, ValueError):
            raise ViewError(f"image_size must be [W, H], got {self.image_size!r}") from None
        if W <= 0 or H <= 0 or [W, H] != list(self.image_size):
            raise ViewError(f"image_size must be two positive integers, got {self.image_size!r}")
        check_intensity(self.intensity)
        if self.intensity == "raw":
            if self.I0 is None or not np.isfinite(self.I0) or self.I0 <= 0:
                raise ViewError("a 'raw' view needs a positive finite I0 (unattenuated level)")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "T_cam_from_world", T)
        object.__setattr__(self, "image_size", (W, H))

    def _key(self) -> tuple:
        """Field values that decide equality (-0.0 counts as 0.0)."""
        return ((self.K + 0.0).tobytes(), (self.T_cam_from_world + 0.0).tobytes(), self.image_size,
                self.intensity, self.I0, self.pixel_spacing_mm, self.source_to_detector_mm)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def width(self) -> int:
        return self.image_size[0]

    @property
    def height(self) -> int:
        return self.image_size[1]

    @property
    def shape(self) -> tuple[int, int]:
        """Array shape (H, W) of images in this view."""
        return (self.image_size[1], self.image_size[0])

    @property
    def P(self) -> np.ndarray:
        return projection_matrix(self.K, self.T_cam_from_world)

    @property
    def source_world(self) -> np.ndarray:
        """Focal spot position in world coordinates (mm)."""
        return invert_rigid(self.T_cam_from_world)[:3, 3]

    @property
    def principal_ray_world(self) -> np.ndarray:
        """Unit direction of the camera +z axis in world coordinates."""
        return self.T_cam_from_world[2, :3].copy()

    def with_pose(self, T_cam_from_world: np.ndarray) -> "View":
        """The same camera at another pose."""
        return replace(self, T_cam_from_world=np.asarray(T_cam_from_world, dtype=float))

    def with_intensity(self, intensity: str, I0: float | None = None) -> "View":
        return replace(self, intensity=intensity, I0=I0)

    def downsampled(self, factor: float) -> "View":
        """The view of a detector binned by ``factor`` (e.g. 2 = half the pixels per side).

        Pixel centres move consistently: the centre of the top-left binned pixel is the
        mean of the centres it covers, so pixel (0, 0) of the binned image sits at
        ((factor - 1) / 2, (factor - 1) / 2) of the original.
        """
        if factor <= 0:
            raise ViewError("downsampling factor must be positive")
        W = max(1, int(round(self.width / factor)))
        H = max(1, int(round(self.height / factor)))
        S = np.array([[1.0 / factor, 0, 0.5 / factor - 0.5], [0, 1.0 / factor, 0.5 / factor - 0.5], [0, 0, 1]])
        spacing = None
        if self.pixel_spacing_mm is not None:
            spacing = (self.pixel_spacing_mm[0] * factor, self.pixel_spacing_mm[1] * factor)
        return replace(self, K=S @ self.K, image_size=(W, H), pixel_spacing_mm=spacing)

    def cropped(self, u_min: int, v_min: int, width: int, height: int) -> "View":
        """The view of a detector sub-window whose top-left pixel is (u_min, v_min)."""
        if width <= 0 or height <= 0:
            raise ViewError("sub-window width and height must be positive")
        K = self.K.copy()
        K[0, 2] -= u_min
        K[1, 2] -= v_min
        return replace(self, K=K, image_size=(int(width), int(height)))


def view_to_dict(view: View) -> dict:
    """The guidance.view/1 JSON object of a view."""
    d = {
        "schema": VIEW_SCHEMA,
        "image_size": [int(view.width), int(view.height)],
        "K": view.K.tolist(),
        "T_cam_from_world": view.T_cam_from_world.tolist(),
        "intensity": view.intensity,
    }
    if view.pixel_spacing_mm is not None:
        d["pixel_spacing_mm"] = [float(x) for x in view.pixel_spacing_mm]
    if view.source_to_detector_mm is not None:
        d["source_to_detector_mm"] = float(view.source_to_detector_mm)
    if view.intensity == "raw":
        d["I0"] = float(view.I0)
    d.update(view.extra)
    return d


def _matrix(d: dict, key: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        m = np.array(d[key], dtype=float)
    except (TypeError, ValueError):
        raise ViewError(f"'{key}' must be a numeric matrix of shape {shape}") from None
    if m.shape != shape:
        raise ViewError(f"'{key}' must have shape {shape}, got {m.shape}")
    return m


def view_from_dict(d: dict) -> View:
    """Validate and build a View from a guidance.view/1 object.

    Either K + T_cam_from_world or a 3x4 ``P`` (split by RQ decomposition) is accepted.
    """
    if not isinstance(d, dict):
        raise ViewError("a view must be a JSON object")
    schema = d.get("schema")
    if schema != VIEW_SCHEMA:
        raise ViewError(f"unsupported view schema {schema!r}; expected {VIEW_SCHEMA!r}")
    for key in ("image_size", "intensity"):
        if key not in d:
            raise ViewError(f"view is missing '{key}'")
    if "P" in d and "K" not in d:
        try:
            K, T = decompose_projection(_matrix(d, "P", (3, 4)))
        except GeometryError as exc:
            raise ViewError(f"'P': {exc}") from None
    else:
        for key in ("K", "T_cam_from_world"):
            if key not in d:
                raise ViewError(f"view is missing '{key}' (or give a 3x4 'P')")
        K = _matrix(d, "K", (3, 3))
        T = _matrix(d, "T_cam_from_world", (4, 4))
    size = d["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) for x in size)):
        raise ViewError(f"'image_size' must be [W, H] integers, got {size!r}")
    known = {"schema", "image_size", "K", "T_cam_from_world", "P", "intensity", "I0",
             "pixel_spacing_mm", "source_to_detector_mm"}
    spacing = d.get("pixel_spacing_mm")
    if spacing is not None:
        if not (isinstance(spacing, list) and len(spacing) == 2):
            raise ViewError("'pixel_spacing_mm' must be [du, dv]")
        spacing = (float(spacing[0]), float(spacing[1]))
    sdd = d.get("source_to_detector_mm")
    return View(
        K=K,
        T_cam_from_world=T,
        image_size=(size[0], size[1]),
        intensity=d["intensity"],
        I0=None if d.get("I0") is None else float(d["I0"]),
        pixel_spacing_mm=spacing,
        source_to_detector_mm=None if sdd is None else float(sdd),
        extra={k: v for k, v in d.items() if k not in known},
    )


def read_view(path: str | Path) -> View:
    """Read and validate a ``*.view.json`` file."""
    return read_json_as(path, view_from_dict, what="view", error=ViewError)


def write_view(view: View, path: str | Path) -> None:
    """Write a view as a guidance.view/1 JSON file."""
    Path(path).write_text(json.dumps(view_to_dict(view), indent=2) + "\n")


def view_path_for(image_path: str | Path) -> Path:
    """The view file beside an image: its name without the image suffix (and without
    ``.nii`` before ``.gz``) plus ``.view.json``: ``shot.png`` -> ``shot.view.json``,
    ``ct.nii.gz`` -> ``ct.view.json``, ``shot.v2.tif`` -> ``shot.v2.view.json``."""
    path = Path(image_path)
    stem = path.with_suffix("")
    if path.suffix.lower() == ".gz":
        stem = stem.with_suffix("")
    return path.with_name(stem.name + ".view.json")


def T_world_from_room(patient_position: str) -> np.ndarray:
    """Patient (LPS) from room coordinates for a head-first patient on the table.

    The room frame is the LPS frame of a supine head-first patient: x to the table's
    left (as seen by the patient lying supine), y towards the floor (posterior), z
    towards the head end. A prone patient is that supine patient turned 180 degrees
    about the head-foot axis.
    """
    if patient_position not in PATIENT_POSITIONS:
        raise ViewError(
            f"patient_position must be one of {', '.join(PATIENT_POSITIONS)}; got {patient_position!r}"
        )
    if patient_position == "supine":
        return np.eye(4)
    return make_rigid(np.diag([-1.0, -1.0, 1.0]), np.zeros(3))


def carm_view(
    *,
    lao_deg: float = 0.0,
    cranial_deg: float = 0.0,
    source_to_detector_mm: float = 1000.0,
    source_to_isocenter_mm: float = 600.0,
    detector_size_px: tuple[int, int] = (512, 512),
    pixel_spacing_mm: tuple[float, float] = (0.6, 0.6),
    isocenter_world: np.ndarray = (0.0, 0.0, 0.0),
    patient_position: str = "supine",
    principal_point_px: tuple[float, float] | None = None,
    intensity: str = "line_integral",
    I0: float | None = None,
) -> View:
    """A view from clinical C-arm parameters.

    The source sits under the table; at LAO 0 / cranial 0 the principal ray runs
    straight up (room -y), the detector above the patient. ``lao_deg`` > 0 turns the
    detector towards the patient's left (RAO is negative), ``cranial_deg`` > 0 tilts
    it towards the head (caudal is negative); angles as the C-arm displays them for a
    supine patient. Image rows run towards the feet, columns towards room -x
    (the patient's right when supine). The isocentre lies on the principal ray at
    ``source_to_isocenter_mm`` from the source; the principal point defaults to the
    detector centre.
    """
    if not 0 < source_to_isocenter_mm < source_to_detector_mm:
        raise ViewError("need 0 < source_to_isocenter_mm < source_to_detector_mm")
    W, H = detector_size_px
    a, b = math.radians(lao_deg), math.radians(cranial_deg)
    z_room = np.array([math.sin(a) * math.cos(b), -math.cos(a) * math.cos(b), math.sin(b)])
    # Image "down" is the foot direction projected perpendicular to the ray.
    foot = np.array([0.0, 0.0, -1.0])
    y_room = foot - np.dot(foot, z_room) * z_room
    y_room /= np.linalg.norm(y_room)
    x_room = np.cross(y_room, z_room)
    R_room_from_cam = np.column_stack([x_room, y_room, z_room])
    T_world_from_room_ = T_world_from_room(patient_position)
    R_world_from_cam = T_world_from_room_[:3, :3] @ R_room_from_cam
    iso = np.asarray(isocenter_world, dtype=float).reshape(3)
    source = iso - source_to_isocenter_mm * R_world_from_cam[:, 2]
    T_world_from_cam = make_rigid(R_world_from_cam, source)
    if principal_point_px is None:
        principal_point_px = ((W - 1) / 2.0, (H - 1) / 2.0)
    K = intrinsics(source_to_detector_mm, pixel_spacing_mm, principal_point_px)
    return View(
        K=K,
        T_cam_from_world=invert_rigid(T_world_from_cam),
        image_size=(int(W), int(H)),
        intensity=intensity,
        I0=I0,
        pixel_spacing_mm=(float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])),
        source_to_detector_mm=float(source_to_detector_mm),
    )
