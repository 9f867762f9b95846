"""Drawing on X-ray frames and CT reslices with OpenCV.

Pure functions: each takes a picture and returns a new BGR uint8 picture, never drawing
into its input. Geometry is given in world coordinates (LPS mm, the CT frame) and mapped
to pixels by a camera: a ``View`` (its P, docs/conventions.md) or any 3x4 projection matrix,
including an affine one (last row [0, 0, 0, 1]) for orthographic CT reslices. Pixels are
(u, v) = (column, row), the centre of the top-left pixel at (0, 0).

Lines and circles are drawn with sub-pixel precision (OpenCV's ``shift``, 1/16 pixel),
anti-aliased and clipped to the picture; segments are clipped in front of the source
(camera z > 0) before they are projected.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from guidance.core.geometry import project
from guidance.core.plan import plan_trajectories, trajectory_endpoints
from guidance.core.views import View, check_intensity
from guidance.core.volume import Volume

__all__ = [
    "STATES",
    "COLOURS",
    "to_display_bgr",
    "camera_matrix",
    "draw_trajectories",
    "draw_outline",
    "draw_instrument",
    "draw_status",
    "status_bar_height",
    "put_text",
]

STATES = ("ok", "stale", "invalid", "waiting")
# BGR colours.
COLOURS = {
    "left": (255, 170, 0),
    "right": (200, 80, 255),
    "other_side": (220, 220, 220),
    "outline": (0, 220, 255),
    "shaft": (60, 230, 60),
    "extension": (150, 255, 255),
    "ok": (60, 200, 60),
    "stale": (0, 165, 255),
    "invalid": (40, 40, 255),
    "waiting": (180, 180, 180),
    "text": (255, 255, 255),
}
SHIFT = 4
_ONE = 1 << SHIFT
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LINE_H = 22
_PAD = 6
_NEAR = 1e-3
_CLIP_MARGIN_PX = 16.0
_PERCENTILE_SAMPLES = 250_000


def to_display_bgr(image: np.ndarray, *, intensity: str,
                   percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """A grey X-ray image (uint8, uint16 or float32, (H, W)) windowed to BGR uint8.

    The window spans the given percentiles of the finite pixels (of an evenly strided
    sample of about 250k pixels for large images). ``intensity`` is the
    view's kind: "line_integral" (bone bright in the data) is inverted so bone shows dark
    as on a C-arm monitor; "raw" detector counts are already dark where attenuated;
    "display" pictures keep their polarity.
    """
    check_intensity(intensity)
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype.name not in ("uint8", "uint16", "float32"):
        raise ValueError(f"expected a 2-D uint8, uint16 or float32 image, got "
                         f"{img.dtype.name} shape {img.shape}")
    values = img.astype(np.float32)
    finite = np.isfinite(values)
    step = max(1, int(np.sqrt(values.size / _PERCENTILE_SAMPLES)))
    sample = values[::step, ::step][finite[::step, ::step]]
    lo, hi = np.percentile(sample, percentiles) if sample.size else (0.0, 0.0)
    scaled = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
    scaled = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0)
    if intensity == "line_integral":
        scaled = 1.0 - scaled
    grey = np.round(scaled * 255.0).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def camera_matrix(view: View | np.ndarray) -> np.ndarray:
    """The 3x4 projection matrix of a View, or a given 3x4 matrix, as float."""
    P = view.P if isinstance(view, View) else np.asarray(view, dtype=float)
    if P.shape != (3, 4) or not np.all(np.isfinite(P)):
        raise ValueError(f"expected a View or a finite 3x4 projection matrix, got {P.shape}")
    return P


def _canvas(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 picture (H, W, 3), got {bgr.dtype.name} "
                         f"shape {bgr.shape}; convert grey frames with to_display_bgr")
    return bgr.copy()


def _fixed(uv: np.ndarray) -> tuple[int, int]:
    return int(round(uv[0] * _ONE)), int(round(uv[1] * _ONE))


def _clip_2d(p: np.ndarray, q: np.ndarray, shape: tuple[int, ...]) -> tuple | None:
    """Liang-Barsky clip of segment p-q (pixels) to the picture plus a margin."""
    m = _CLIP_MARGIN_PX
    lo = np.array([-m, -m])
    hi = np.array([shape[1] - 1 + m, shape[0] - 1 + m])
    d = q - p
    t0, t1 = 0.0, 1.0
    for a in range(2):
        for num, den in ((p[a] - lo[a], -d[a]), (hi[a] - p[a], d[a])):
            if den == 0:
                if num < 0:
                    return None
                continue
            t = num / den
            if den < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
    if t0 > t1:
        return None
    return p + t0 * d, p + t1 * d


def _project_segment(P: np.ndarray, a: np.ndarray, b: np.ndarray,
                     shape: tuple[int, ...]) -> tuple | None:
    """Pixel end points of the world segment a-b, clipped in front of the camera and to
    the picture; None when nothing of it is visible."""
    wa = float(P[2, :3] @ a + P[2, 3])
    wb = float(P[2, :3] @ b + P[2, 3])
    if wa < _NEAR and wb < _NEAR:
        return None
    if wa < _NEAR or wb < _NEAR:
        t = (_NEAR - wa) / (wb - wa)
        cut = a + t * (b - a)
        a, b = (cut, b) if wa < _NEAR else (a, cut)
    uv = project(P, np.stack([a, b]))
    return _clip_2d(uv[0], uv[1], shape)


def _line(img: np.ndarray, P: np.ndarray, a: np.ndarray, b: np.ndarray,
          colour: tuple[int, int, int], thickness: int) -> None:
    seg = _project_segment(P, a, b, img.shape)
    if seg is not None:
        cv2.line(img, _fixed(seg[0]), _fixed(seg[1]), colour, thickness, cv2.LINE_AA, SHIFT)


def _visible_pixel(P: np.ndarray, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Pixel of a world point in front of the camera and inside the picture, else None."""
    if float(P[2, :3] @ x + P[2, 3]) < _NEAR:
        return None
    uv = project(P, x)[0]
    inside = -0.5 <= uv[0] <= shape[1] - 0.5 and -0.5 <= uv[1] <= shape[0] - 0.5
    return uv if inside else None


def _circle(img: np.ndarray, uv: np.ndarray, radius_px: float, colour: tuple[int, int, int],
            thickness: int) -> None:
    cv2.circle(img, _fixed(uv), int(round(radius_px * _ONE)), colour, thickness,
               cv2.LINE_AA, SHIFT)


def put_text(img: np.ndarray, text: str, origin_px: tuple[float, float],
             colour: tuple[int, int, int], *, scale: float = 0.55, thickness: int = 1) -> None:
    """Draw text in place with a dark outline (readable on any background); the origin is
    the left end of the baseline, in pixels."""
    org = (int(round(origin_px[0])), int(round(origin_px[1])))
    for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
        cv2.putText(img, text, (org[0] + dx, org[1] + dy), _FONT, scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, colour, thickness, cv2.LINE_AA)


def draw_trajectories(bgr: np.ndarray, view: View | np.ndarray, plan: dict | list | None, *,
                      highlight_level: str | None = None) -> np.ndarray:
    """The planned screw trajectories: an entry -> target line per screw, a ring at the
    entry, a dot at the target, coloured by side, labelled with the level.

    With ``highlight_level``, that level's trajectories are drawn bold and the others thin.
    """
    out = _canvas(bgr)
    P = camera_matrix(view)
    for trajectory in plan_trajectories(plan):
        entry, target = trajectory_endpoints(trajectory)
        colour = COLOURS.get(trajectory.get("side"), COLOURS["other_side"])
        level = str(trajectory.get("level", ""))
        bold = highlight_level is None or level == highlight_level
        _line(out, P, entry, target, colour, 2 if bold else 1)
        uv_entry = _visible_pixel(P, entry, out.shape)
        if uv_entry is not None:
            _circle(out, uv_entry, 5.0 if bold else 3.0, colour, 2 if bold else 1)
            if bold:
                put_text(out, level, (uv_entry[0] + 7, uv_entry[1] - 7), colour)
        uv_target = _visible_pixel(P, target, out.shape)
        if uv_target is not None:
            _circle(out, uv_target, 3.0 if bold else 2.0, colour, -1)
    return out


def _label_points_world(labels: Volume, level_label: int) -> np.ndarray:
    kji = np.argwhere(np.asarray(labels.data) == level_label)
    if len(kji) == 0:
        raise ValueError(f"label {level_label} is not present in the label volume")
    return labels.index_to_world(kji[:, ::-1])


def _disc(diameter_px: float) -> np.ndarray:
    """An elliptic structuring element of odd size at least ``diameter_px``."""
    size = int(np.ceil(diameter_px))
    size += 1 - size % 2
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def draw_outline(bgr: np.ndarray, view: View | np.ndarray, labels_volume: Volume,
                 level_label: int, *, supersample: int = 2) -> np.ndarray:
    """The projected outline (silhouette) of one labelled vertebra.

    The label's voxel centres are projected and splatted into a mask ``supersample`` times
    finer than the picture; a closing over two projected voxels fills the gaps between
    neighbouring voxels, a dilation by half a voxel moves the edge from the outer voxel
    centres to the voxel boundary, and the mask's outer contours are drawn.
    """
    out = _canvas(bgr)
    P = camera_matrix(view)
    points = _label_points_world(labels_volume, level_label)
    w = points @ P[2, :3] + P[2, 3]
    points = points[w >= _NEAR]
    if len(points) == 0:
        return out
    uv = project(P, points)
    # Projected size of one voxel step near the label's centroid (pixels).
    c = points.mean(axis=0)
    steps = labels_volume.T_world_from_index[:3, :3].T
    footprint = np.linalg.norm(project(P, c + steps) - project(P, c[None]), axis=1).max()
    s = int(supersample)
    H, W = out.shape[:2]
    grid = np.round((uv + 0.5) * s - 0.5).astype(np.int64)
    keep = (grid[:, 0] >= 0) & (grid[:, 0] < W * s) & (grid[:, 1] >= 0) & (grid[:, 1] < H * s)
    grid = grid[keep]
    if len(grid) == 0:
        return out
    close, grow = _disc(2.0 * footprint * s + 1.0), _disc(footprint * s)
    # Work on the splats' bounding box plus the kernels' reach only.
    pad = close.shape[0] + grow.shape[0]
    lo = np.maximum(grid.min(axis=0) - pad, 0)
    hi = np.minimum(grid.max(axis=0) + pad + 1, [W * s, H * s])
    mask = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
    mask[grid[:, 1] - lo[1], grid[:, 0] - lo[0]] = 255
    mask = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, close), grow)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                   offset=(int(lo[0]), int(lo[1])))
    polygons = [np.round(((cnt.astype(float) + 0.5) / s - 0.5) * _ONE).astype(np.int32)
                for cnt in contours]
    cv2.polylines(out, polygons, True, COLOURS["outline"], 2, cv2.LINE_AA, SHIFT)
    return out


def draw_instrument(bgr: np.ndarray, view: View | np.ndarray, tip_world: np.ndarray,
                    axis_world: np.ndarray, length_mm: float, *, extension_mm: float = 40.0,
                    dash_mm: float = 2.5) -> np.ndarray:
    """An instrument: its shaft (``length_mm`` back from the tip), a ring at the tip and its
    projected path ``extension_mm`` beyond the tip, dashed every ``dash_mm`` (so the dashes
    are a depth ruler). ``axis_world`` is a unit vector pointing towards the tip."""
    out = _canvas(bgr)
    P = camera_matrix(view)
    tip = np.asarray(tip_world, dtype=float).reshape(3)
    axis = np.asarray(axis_world, dtype=float).reshape(3)
    axis = axis / np.linalg.norm(axis)
    for start in np.arange(0.0, extension_mm, 2.0 * dash_mm):
        end = min(start + dash_mm, extension_mm)
        _line(out, P, tip + start * axis, tip + end * axis, COLOURS["extension"], 2)
    _line(out, P, tip - length_mm * axis, tip, COLOURS["shaft"], 3)
    uv_tip = _visible_pixel(P, tip, out.shape)
    if uv_tip is not None:
        _circle(out, uv_tip, 4.0, COLOURS["shaft"], 1)
    return out


def status_bar_height(n_lines: int) -> int:
    """Height (pixels) of the bar ``draw_status`` draws for ``n_lines`` lines of text."""
    return 2 * _PAD + max(1, n_lines) * _LINE_H


def draw_status(bgr: np.ndarray, lines: Sequence[str], *, state: str) -> np.ndarray:
    """A status bar of text lines along the bottom, led by a state badge; unless the state
    is "ok", the state word is also written large across the picture in its warning colour
    and the picture gets a border of that colour."""
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}; got {state!r}")
    out = _canvas(bgr)
    H, W = out.shape[:2]
    colour = COLOURS[state]
    bar_top = max(0, H - status_bar_height(len(lines)))
    out[bar_top:] = out[bar_top:] // 4
    word = state.upper()
    (tw, _), _ = cv2.getTextSize(word, _FONT, 0.6, 2)
    cv2.rectangle(out, (_PAD, bar_top + _PAD), (_PAD + tw + 12, H - _PAD), colour, -1)
    cv2.putText(out, word, (_PAD + 6, bar_top + _PAD + 16), _FONT, 0.6, (0, 0, 0), 2,
                cv2.LINE_AA)
    for n, text in enumerate(lines):
        put_text(out, text, (_PAD + tw + 24, bar_top + _PAD + 16 + n * _LINE_H),
                 COLOURS["text"])
    if state != "ok":
        cv2.rectangle(out, (0, 0), (W - 1, bar_top - 1), colour, 6)
        (bw, bh), _ = cv2.getTextSize(word, _FONT, 1.0, 3)
        scale = min(0.6 * W / bw, 0.3 * bar_top / bh)
        thick = max(3, int(scale * 3))
        (bw, bh), _ = cv2.getTextSize(word, _FONT, scale, thick)
        put_text(out, word, ((W - bw) / 2, (bar_top + bh) / 2), colour, scale=scale,
                 thickness=thick)
    return out
