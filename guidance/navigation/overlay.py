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

import itertools
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
    "trajectory_label",
    "draw_trajectories",
    "draw_outline",
    "draw_instrument",
    "draw_status",
    "status_bar_height",
    "orientation_letters",
    "draw_orientation_markers",
    "draw_legend",
    "draw_scale_bar",
    "draw_screw_path",
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
_CLAHE = cv2.createCLAHE(clipLimit=1.5, tileGridSize=(8, 8))


def to_display_bgr(image: np.ndarray, *, intensity: str,
                   percentiles: tuple[float, float] = (0.5, 99.5), monitor: bool = False) -> np.ndarray:
    """A grey X-ray image (uint8, uint16 or float32, (H, W)) windowed to BGR uint8.

    The window spans the given percentiles of the finite pixels (of an evenly strided
    sample of about 250k pixels for large images). ``intensity`` is the
    view's kind: "line_integral" (bone bright in the data) is inverted so bone shows dark
    as on a C-arm monitor; "raw" detector counts are already dark where attenuated;
    "display" pictures keep their polarity.

    ``monitor``: window it as a C-arm monitor does: raw counts are taken to the log
    (attenuation) domain, the window comes from the central 60% of the field (the
    collimated anatomy, not the bright edges), quantum noise is smoothed over about a
    pixel and local contrast is enhanced (CLAHE), so that the vertebrae stand out under
    the overlay; "display" pictures are left as they are, only windowed.
    """
    check_intensity(intensity)
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype.name not in ("uint8", "uint16", "float32"):
        raise ValueError(f"expected a 2-D uint8, uint16 or float32 image, got "
                         f"{img.dtype.name} shape {img.shape}")
    values = img.astype(np.float32)
    invert = intensity == "line_integral"
    if monitor and intensity == "raw":
        values = -np.log(np.maximum(values, 1.0))  # attenuation: bone bright, then inverted
        invert = True
    finite = np.isfinite(values)
    window = values
    if monitor and intensity != "display":
        H, W = values.shape
        window = values[H // 5: H - H // 5, W // 5: W - W // 5]
    step = max(1, int(np.sqrt(window.size / _PERCENTILE_SAMPLES)))
    sample = window[::step, ::step]
    sample = sample[np.isfinite(sample)]
    lo, hi = np.percentile(sample, percentiles) if sample.size else (0.0, 0.0)
    scaled = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
    scaled = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0)
    if invert:
        scaled = 1.0 - scaled
    grey = np.round(scaled * 255.0).astype(np.uint8)
    if monitor and intensity != "display":
        grey = _CLAHE.apply(cv2.GaussianBlur(grey, (0, 0), 0.8))
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


def trajectory_label(trajectory: dict) -> str:
    """How a planned trajectory is named on screen: "L3 left" (pedicle screw), "L3-L4
    lateral" / "L4-L5 anterior" (interbody access)."""
    level = str(trajectory.get("level", "?"))
    if "level_below" in trajectory:
        return f"{level}-{trajectory['level_below']} {trajectory.get('approach', '')}".strip()
    return f"{level} {trajectory.get('side', '')}".strip()


def _text_size(text: str, scale: float, thickness: int = 1) -> tuple[int, int]:
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    return w, h


def _label_behind(img: np.ndarray, text: str, entry_uv: np.ndarray, target_uv: np.ndarray | None,
                  colour: tuple[int, int, int], scale: float, nudge_px: float = 0.0) -> None:
    """Write ``text`` just beyond the entry point, on the side away from the target, so
    that labels of neighbouring trajectories do not sit on each other's lines; ``nudge_px``
    moves it down (up when negative)."""
    away = np.array([0.0, -1.0]) if target_uv is None else entry_uv - target_uv
    norm = float(np.linalg.norm(away))
    away = away / norm if norm > 1e-6 else np.array([0.0, -1.0])
    w, h = _text_size(text, scale)
    anchor = entry_uv + 10.0 * away + np.array([0.0, nudge_px])
    x = anchor[0] - (w if away[0] < -0.3 else (w / 2 if abs(away[0]) <= 0.3 else 0))
    y = anchor[1] + (h if away[1] > 0.3 else (h / 2 if abs(away[1]) <= 0.3 else 0))
    H, W = img.shape[:2]
    put_text(img, text, (min(max(x, 2), W - w - 2), min(max(y, h + 2), H - 3)), colour, scale=scale)


def _cage_edges(trajectory: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 12 edges (world mm) of an interbody cage centred on the trajectory's target:
    length along the trajectory, height along the world's superior axis made
    perpendicular to it, width across both."""
    entry, target = trajectory_endpoints(trajectory)
    cage = trajectory["cage"]
    a = (target - entry) / np.linalg.norm(target - entry)
    up = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    h = up - (up @ a) * a
    h /= np.linalg.norm(h)
    w = np.cross(a, h)
    half = np.array([cage["length_mm"], cage["width_mm"], cage["height_mm"]]) / 2
    axes = np.stack([a, w, h])
    corners = {c: target + (np.array(c) * half) @ axes for c in itertools.product((-1, 1), repeat=3)}
    return [(corners[c], corners[d]) for c in corners for d in corners
            if c < d and sum(x != y for x, y in zip(c, d)) == 1]


def draw_trajectories(bgr: np.ndarray, view: View | np.ndarray, plan: dict | list | None, *,
                      highlight_level: str | None = None, labels: bool = True) -> np.ndarray:
    """The planned trajectories: an entry -> target line each, a ring at the entry, a dot
    at the target (and the cage outline of interbody trajectories), coloured by side, each
    labelled ("L3 left", "L3-L4 lateral") beyond its entry point.

    With ``highlight_level``, that level's trajectories are drawn bold and the others thin
    with smaller labels.
    """
    out = _canvas(bgr)
    P = camera_matrix(view)
    for trajectory in plan_trajectories(plan):
        entry, target = trajectory_endpoints(trajectory)
        colour = COLOURS.get(trajectory.get("side"), COLOURS["other_side"])
        level = str(trajectory.get("level", ""))
        bold = highlight_level is None or level == highlight_level
        _line(out, P, entry, target, colour, 2 if bold else 1)
        if "cage" in trajectory:
            for a, b in _cage_edges(trajectory):
                _line(out, P, a, b, colour, 1)
        uv_entry = _visible_pixel(P, entry, out.shape)
        uv_target = _visible_pixel(P, target, out.shape)
        if uv_entry is not None:
            _circle(out, uv_entry, 5.0 if bold else 3.0, colour, 2 if bold else 1)
            if labels:
                # Left and right labels apart where both sides project together (lateral views).
                nudge = {"left": -7.0, "right": 7.0}.get(trajectory.get("side"), 0.0)
                _label_behind(out, trajectory_label(trajectory), uv_entry, uv_target, colour,
                              0.5 if bold else 0.4, nudge)
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
    centres to the voxel boundary, a Gaussian blur over about a voxel thresholded at half
    rounds off the voxel staircase (a straight edge stays where it is), and the mask's
    outer contours are drawn.
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
    sigma = max(1.0, footprint * s)
    mask = np.where(cv2.GaussianBlur(mask, (0, 0), sigma) >= 128, 255, 0).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
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


def draw_status(bgr: np.ndarray, lines: Sequence[str], *, state: str, border: bool = True) -> np.ndarray:
    """A status bar along the top: a box filled with the state's colour holding the state
    word, then the text lines. Unless the state is "ok" (and ``border``), the picture
    below the bar gets a thin frame of that colour; nothing is written over the picture."""
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}; got {state!r}")
    out = _canvas(bgr)
    H, W = out.shape[:2]
    colour = COLOURS[state]
    bar = min(H, status_bar_height(len(lines)))
    out[:bar] = 16
    word = state.upper()
    scale = 0.8
    tw, th = _text_size(word, scale, 2)
    box_w = tw + 24
    cv2.rectangle(out, (_PAD, _PAD), (_PAD + box_w, bar - _PAD), colour, -1)
    cv2.putText(out, word, (_PAD + 12, (bar + th) // 2), _FONT, scale, (0, 0, 0), 2, cv2.LINE_AA)
    for n, text in enumerate(lines):
        put_text(out, text, (2 * _PAD + box_w + 12, _PAD + 16 + n * _LINE_H), COLOURS["text"])
    if state != "ok" and border:
        cv2.rectangle(out, (1, bar + 1), (W - 2, H - 2), colour, 3)
    return out


def orientation_letters(view: View | np.ndarray, centre_world: np.ndarray) -> dict[str, str]:
    """Patient direction letter (R/L, A/P, S/I) for each picture edge ("left", "right",
    "top", "bottom") of a projection: the direction (world LPS) whose projection from
    ``centre_world`` points most towards that edge; foreshortened directions count less,
    those seen end-on not at all, and an edge no direction points to gets none."""
    P = camera_matrix(view)
    c = np.asarray(centre_world, dtype=float).reshape(3)
    steps = project(P, c + 10.0 * np.eye(3)) - project(P, c[None])[0]  # pixels per 10 mm along L, P, S
    longest = float(np.linalg.norm(steps, axis=1).max())
    best: dict[str, tuple[str, float]] = {}
    if longest < 1e-9:
        return {}
    edges = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "bottom": (0.0, 1.0), "top": (0.0, -1.0)}
    for axis, (plus, minus) in enumerate((("L", "R"), ("P", "A"), ("S", "I"))):
        d = steps[axis] / longest
        for letter, sign in ((plus, 1.0), (minus, -1.0)):
            for edge, e in edges.items():
                score = sign * float(d @ np.array(e))
                if score > 0.6 and score > best.get(edge, ("", 0.0))[1]:
                    best[edge] = (letter, score)
    return {edge: letter for edge, (letter, _) in best.items()}


def draw_orientation_markers(bgr: np.ndarray, view: View | np.ndarray, centre_world: np.ndarray, *,
                             top_margin_px: int = 0) -> np.ndarray:
    """The ``orientation_letters`` at the middle of each picture edge, in small dark boxes,
    the top one ``top_margin_px`` below the top edge (room for a caption)."""
    out = _canvas(bgr)
    H, W = out.shape[:2]
    scale = 0.6
    for edge, letter in orientation_letters(view, centre_world).items():
        w, h = _text_size(letter, scale, 2)
        x, y = {"left": (6, H / 2 + h / 2), "right": (W - w - 6, H / 2 + h / 2),
                "top": (W / 2 - w / 2, top_margin_px + h + 6), "bottom": (W / 2 - w / 2, H - 8)}[edge]
        cv2.rectangle(out, (int(x) - 4, int(y) - h - 4), (int(x) + w + 4, int(y) + 4), (0, 0, 0), -1)
        put_text(out, letter, (x, y), COLOURS["text"], scale=scale, thickness=2)
    return out


def draw_legend(bgr: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]], *,
                corner: str = "bottom_left") -> np.ndarray:
    """A colour legend box: a short line of each colour and its meaning, in a corner
    ("bottom_left" or "bottom_right") of the picture."""
    out = _canvas(bgr)
    H, W = out.shape[:2]
    scale, row = 0.45, 18
    width = max(_text_size(text, scale)[0] for text, _ in entries) + 44
    height = row * len(entries) + 10
    x0 = 8 if corner == "bottom_left" else W - width - 8
    y0 = H - height - 8
    region = out[y0: y0 + height, x0: x0 + width]
    region[:] = region // 3
    for n, (text, colour) in enumerate(entries):
        y = y0 + 14 + n * row
        cv2.line(out, (x0 + 8, y - 4), (x0 + 30, y - 4), colour, 3, cv2.LINE_AA)
        put_text(out, text, (x0 + 36, y), COLOURS["text"], scale=scale)
    return out


def draw_scale_bar(bgr: np.ndarray, mm_per_px: float, *, length_mm: float = 10.0) -> np.ndarray:
    """A scale bar of ``length_mm`` at the bottom right, labelled in mm."""
    out = _canvas(bgr)
    H, W = out.shape[:2]
    n = int(round(length_mm / mm_per_px))
    x1, y = W - 12, H - 12
    cv2.line(out, (x1 - n, y), (x1, y), COLOURS["text"], 2)
    for x in (x1 - n, x1):
        cv2.line(out, (x, y - 5), (x, y + 1), COLOURS["text"], 2)
    put_text(out, f"{length_mm:g} mm", (x1 - n, y - 8), COLOURS["text"], scale=0.45)
    return out


def draw_screw_path(bgr: np.ndarray, view: View | np.ndarray, start_world: np.ndarray, end_world: np.ndarray,
                    diameter_mm: float, colour: tuple[int, int, int]) -> np.ndarray:
    """The outline of a screw (or cage seen edge-on) of ``diameter_mm`` along a straight
    path, for an orthographic reslice containing the path: its two sides and end caps."""
    out = _canvas(bgr)
    P = camera_matrix(view)
    a, b = (np.asarray(p, dtype=float).reshape(3) for p in (start_world, end_world))
    axis = b - a
    if np.linalg.norm(axis) < 1e-9:
        return out
    axis /= np.linalg.norm(axis)
    # The in-plane direction across the path: the reslice plane's normal is P's null row.
    normal = np.cross(P[0, :3], P[1, :3])
    across = np.cross(normal, axis)
    if np.linalg.norm(across) < 1e-9:
        return out
    across *= diameter_mm / 2 / np.linalg.norm(across)
    for side in (across, -across):
        _line(out, P, a + side, b + side, colour, 1)
    for p in (a, b):
        _line(out, P, p + across, p - across, colour, 1)
    return out
