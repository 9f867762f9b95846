"""Calibration reports: a PNG drawn with OpenCV and a one-paragraph text summary.

The PNG shows the calibration image (or, for pivot calibration, a plot) with detections
as circles, residual vectors magnified by ``scale`` as arrows, rejected detections in red
and a legend with the RMS.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from calibration.errors import CalibrationError
from calibration.files import Calibration

__all__ = [
    "display_image",
    "render_residuals",
    "render_pivot",
    "write_png",
    "calibration_summary",
    "print_summary",
]

GREEN, RED, YELLOW, CYAN, WHITE = (0, 200, 0), (0, 0, 255), (0, 220, 255), (255, 255, 0), \
    (255, 255, 255)


def display_image(image: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """8-bit BGR picture of a grey image, windowed to its 1st..99.5th percentiles (of the
    pixels in ``mask`` if given)."""
    img = np.asarray(image, dtype=np.float64)
    vals = img[mask] if mask is not None else img
    lo, hi = np.percentile(vals, [1.0, 99.5])
    grey = np.clip((img - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def _pt(uv: np.ndarray, zoom: float) -> tuple[int, int]:
    """Integer drawing position of a pixel position (centre of zoomed pixel)."""
    return int(round((uv[0] + 0.5) * zoom - 0.5)), int(round((uv[1] + 0.5) * zoom - 0.5))


def _legend(canvas: np.ndarray, lines: list[str]) -> None:
    """White text lines on a dark box at the top left."""
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    widths = [cv2.getTextSize(line, font, size, 1)[0][0] for line in lines]
    cv2.rectangle(canvas, (4, 4), (16 + max(widths, default=0), 10 + 20 * len(lines)),
                  (0, 0, 0), -1)
    for k, line in enumerate(lines):
        cv2.putText(canvas, line, (10, 22 + 20 * k), font, size, WHITE, 1, cv2.LINE_AA)


def render_residuals(image: np.ndarray, uv: np.ndarray, residuals_px: np.ndarray, *,
                     unmatched_uv: np.ndarray | None = None,
                     rejected_uv: np.ndarray | None = None, scale: float = 50.0,
                     zoom: float = 2.0, title: str = "", radius_px: float = 8.0) -> np.ndarray:
    """BGR picture: ``image`` (grey, any range) zoomed by ``zoom``; each used detection
    ``uv`` (N, 2) circled in green with its residual (N, 2, px) drawn as a yellow arrow
    ``scale`` times longer; ``unmatched_uv`` circled in cyan, ``rejected_uv`` in red."""
    base = display_image(image)
    H, W = base.shape[:2]
    canvas = cv2.resize(base, (int(W * zoom), int(H * zoom)), interpolation=cv2.INTER_NEAREST)
    r = max(2, int(round(radius_px * zoom)))
    for pts, colour in ((unmatched_uv, CYAN), (rejected_uv, RED)):
        for p in np.zeros((0, 2)) if pts is None else np.asarray(pts):
            cv2.circle(canvas, _pt(p, zoom), r, colour, 1, cv2.LINE_AA)
    for p, d in zip(np.asarray(uv), np.asarray(residuals_px)):
        cv2.circle(canvas, _pt(p, zoom), r, GREEN, 1, cv2.LINE_AA)
        cv2.arrowedLine(canvas, _pt(p, zoom), _pt(p + scale * d, zoom), YELLOW, 1, cv2.LINE_AA,
                        tipLength=0.25)
    res = np.asarray(residuals_px, dtype=float).reshape(-1, 2)
    rms = float(np.sqrt((res ** 2).sum(axis=1).mean())) if len(res) else float("nan")
    lines = [title] if title else []
    lines.append(f"green: {len(res)} used, RMS {rms:.3f} px, residual arrows x{scale:g}")
    if unmatched_uv is not None and len(unmatched_uv):
        lines.append(f"cyan: {len(unmatched_uv)} expected but not found")
    if rejected_uv is not None and len(rejected_uv):
        lines.append(f"red: {len(rejected_uv)} rejected as outliers")
    _legend(canvas, lines)
    return canvas


def render_pivot(residuals_mm: np.ndarray, *, title: str = "", size_px: int = 600,
                 range_mm: float | None = None) -> np.ndarray:
    """BGR scatter plot of per-pose tip positions minus the pivot point (mm): x-y on the
    left, x-z on the right, with a circle at the RMS radius."""
    res = np.asarray(residuals_mm, dtype=float).reshape(-1, 3)
    if len(res) == 0:
        raise CalibrationError("no pivot residuals to plot")
    rms = float(np.sqrt((res ** 2).sum(axis=1).mean()))
    extent = range_mm or max(3.0 * rms, float(np.abs(res).max()) * 1.1, 1e-3)
    half = size_px // 2
    canvas = np.full((size_px, 2 * size_px, 3), 30, np.uint8)
    for panel, (a, b, names) in enumerate(((0, 1, "x-y"), (0, 2, "x-z"))):
        cx, cy = panel * size_px + half, half
        cv2.line(canvas, (cx - half + 10, cy), (cx + half - 10, cy), (90, 90, 90), 1)
        cv2.line(canvas, (cx, 10), (cx, size_px - 10), (90, 90, 90), 1)
        cv2.circle(canvas, (cx, cy), int(rms / extent * (half - 20)), YELLOW, 1, cv2.LINE_AA)
        for p in res:
            q = (int(cx + p[a] / extent * (half - 20)), int(cy + p[b] / extent * (half - 20)))
            cv2.circle(canvas, q, 2, GREEN, -1, cv2.LINE_AA)
        cv2.putText(canvas, names, (cx - half + 10, size_px - 15), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55, WHITE, 1, cv2.LINE_AA)
    lines = [title] if title else []
    lines.append(f"{len(res)} poses, tip RMS {rms:.3f} mm (circle), half width {extent:.2f} mm")
    _legend(canvas, lines)
    return canvas


def write_png(path: str | Path, bgr: np.ndarray) -> Path:
    """Write a BGR picture as PNG; returns the path."""
    path = Path(path)
    if not cv2.imwrite(str(path), bgr):
        raise CalibrationError(f"could not write {path}")
    return path


def calibration_summary(cal: Calibration) -> str:
    """A one-paragraph plain-text summary of a calibration."""
    head = f"{cal.kind} calibration of device {cal.device_id} on {cal.date} ({cal.method})"
    p, r = cal.parameters, cal.residuals
    if cal.kind == "carm":
        size = f"{cal.image_size[0]}x{cal.image_size[1]}"
        du, dv = p["pixel_spacing_mm"]
        parts = [f"{head} for {size} frames at {du:g} x {dv:g} mm pixels"]
        if "K" in p:
            K = np.array(p["K"])
            sdd = 0.5 * (K[0, 0] * du + K[1, 1] * dv)
            parts.append(f"SDD {sdd:.1f} mm, principal point ({K[0, 2]:.1f}, {K[1, 2]:.1f}) px")
        if "angle_table" in p:
            entries = p["angle_table"]["entries"]
            laos = sorted({e["lao_deg"] for e in entries})
            crans = sorted({e["cranial_deg"] for e in entries})
            parts.append(f"angle table of {len(entries)} orientations, LAO "
                         f"{laos[0]:g}..{laos[-1]:g} deg, cranial {crans[0]:g}..{crans[-1]:g} deg")
    elif cal.kind == "distortion":
        parts = [f"{head} for {cal.image_size[0]}x{cal.image_size[1]} frames",
                 f"polynomial of degree {p['degree']}"]
    else:
        tip = np.array(p["tip_offset_mm"])
        parts = [head, f"tip offset ({', '.join(f'{x:.2f}' for x in tip)}) mm "
                       f"(length {np.linalg.norm(tip):.2f} mm) in the tool frame",
                 f"pivot point ({', '.join(f'{x:.1f}' for x in p['pivot_point_mm'])}) mm "
                 f"in the tracker frame"]
    if r:
        parts.append("residuals " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.items())))
    return "; ".join(parts) + "."


def print_summary(cal: Calibration) -> None:
    """Print :func:`calibration_summary`."""
    print(calibration_summary(cal))
