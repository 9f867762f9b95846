"""The calibration file: one versioned JSON format, ``guidance.calibration/1``.

::

    {
      "schema": "guidance.calibration/1",
      "kind": "carm" | "distortion" | "pivot",
      "device_id": "carm-OR3",                 // the C-arm, or the tracked tool
      "date": "2024-05-02T10:31:00+00:00",     // ISO 8601
      "method": "bb-phantom two-plane-9x9, DLT + LM",
      "residuals": {"rms_px": 0.05, ...},      // numbers, named with their unit
      "image_size": [W, H],                    // carm and distortion only
      "parameters": {...}                      // by kind, below
    }

Parameters by kind:

- ``carm``: ``pixel_spacing_mm`` [du, dv] and either ``K`` (3x3) with
  ``T_cam_from_phantom`` (4x4, one orientation) or ``angle_table`` (calibrations on a
  grid of LAO / cranial angles, see calibration.carm.angle_table_to_dict), or both.
- ``distortion``: the polynomial model (calibration.distortion.distortion_model_to_dict).
- ``pivot``: ``tip_offset_mm`` (tool frame) and ``pivot_point_mm`` (tracker frame).

Every reader error is a :class:`CalibrationError` naming the field at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from calibration.carm import (
    CarmAngleTable,
    CarmCalibrationResult,
    angle_table_from_dict,
    angle_table_to_dict,
    interpolate_view,
)
from calibration.distortion import (
    DistortionModel,
    distortion_model_from_dict,
    distortion_model_to_dict,
)
from calibration.errors import CalibrationError, matrix_field
from calibration.pivot import PivotResult
from guidance.core.jsonfile import read_json_as
from guidance.core.views import View

__all__ = [
    "CALIBRATION_SCHEMA",
    "CALIBRATION_KINDS",
    "CalibrationError",
    "Calibration",
    "carm_calibration",
    "distortion_calibration",
    "pivot_calibration_record",
    "calibration_to_dict",
    "calibration_from_dict",
    "write_calibration",
    "read_calibration",
    "check_matches",
    "carm_angle_table",
    "distortion_model",
    "apply_carm_calibration",
]

CALIBRATION_SCHEMA = "guidance.calibration/1"
CALIBRATION_KINDS = ("carm", "distortion", "pivot")
_IMAGE_KINDS = ("carm", "distortion")


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Calibration:
    """One calibration record (see the module docstring for the fields)."""

    kind: str
    device_id: str
    method: str
    parameters: dict
    residuals: dict = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    date: str = field(default_factory=_now_iso)

    def __post_init__(self) -> None:
        _validate(calibration_to_dict(self))


def _finite_list(values, n: int, name: str) -> list[float]:
    try:
        out = [float(x) for x in values]
    except (TypeError, ValueError):
        raise CalibrationError(f"{name} must be a list of {n} numbers") from None
    if len(out) != n or not all(math.isfinite(x) for x in out):
        raise CalibrationError(f"{name} must be a list of {n} finite numbers, got {values!r}")
    return out


def _validate_carm(p: dict, image_size: tuple[int, int]) -> None:
    spacing = tuple(_finite_list(p.get("pixel_spacing_mm"), 2, "parameters.pixel_spacing_mm"))
    if min(spacing) <= 0:
        raise CalibrationError("parameters.pixel_spacing_mm must be positive")
    has_single = "K" in p or "T_cam_from_phantom" in p
    if not has_single and "angle_table" not in p:
        raise CalibrationError("carm parameters need 'K' + 'T_cam_from_phantom' or "
                               "'angle_table'")
    if has_single:
        K = matrix_field(p.get("K"), (3, 3), "parameters.K")
        T = matrix_field(p.get("T_cam_from_phantom"), (4, 4), "parameters.T_cam_from_phantom")
        try:
            View(K=K, T_cam_from_world=T, image_size=image_size)
        except ValueError as exc:
            raise CalibrationError(f"parameters: {exc}") from None
    if "angle_table" in p:
        angle_table_from_dict(p["angle_table"], image_size=image_size, pixel_spacing_mm=spacing)


def _validate_pivot(p: dict) -> None:
    _finite_list(p.get("tip_offset_mm"), 3, "parameters.tip_offset_mm")
    _finite_list(p.get("pivot_point_mm"), 3, "parameters.pivot_point_mm")


def _validate(d: dict) -> None:
    """Raise CalibrationError unless ``d`` is a valid guidance.calibration/1 object."""
    if not isinstance(d, dict):
        raise CalibrationError("a calibration must be a JSON object")
    if d.get("schema") != CALIBRATION_SCHEMA:
        raise CalibrationError(f"unsupported calibration schema {d.get('schema')!r}; "
                               f"expected {CALIBRATION_SCHEMA!r}")
    kind = d.get("kind")
    if kind not in CALIBRATION_KINDS:
        raise CalibrationError(f"unknown calibration kind {kind!r}; expected one of "
                               f"{', '.join(CALIBRATION_KINDS)}")
    for key in ("device_id", "method", "date"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise CalibrationError(f"calibration '{key}' must be a non-empty string")
    try:
        datetime.fromisoformat(d["date"])
    except ValueError:
        raise CalibrationError(f"calibration 'date' must be ISO 8601, got {d['date']!r}") from None
    residuals = d.get("residuals", {})
    if not isinstance(residuals, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in residuals.items()):
        raise CalibrationError("calibration 'residuals' must map names to numbers")
    params = d.get("parameters")
    if not isinstance(params, dict):
        raise CalibrationError("calibration 'parameters' must be an object")
    size = d.get("image_size")
    if kind in _IMAGE_KINDS:
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
            raise CalibrationError(f"a {kind} calibration needs 'image_size' [W, H] as two "
                                   f"positive integers, got {size!r}")
        size = (size[0], size[1])
    if kind == "carm":
        _validate_carm(params, size)
    elif kind == "distortion":
        distortion_model_from_dict(params, size)
    else:
        _validate_pivot(params)


def calibration_to_dict(cal: Calibration) -> dict:
    """The guidance.calibration/1 JSON object of a calibration."""
    d = {"schema": CALIBRATION_SCHEMA, "kind": cal.kind, "device_id": cal.device_id,
         "date": cal.date, "method": cal.method,
         "residuals": {k: float(v) for k, v in cal.residuals.items()}}
    if cal.image_size is not None:
        d["image_size"] = [int(cal.image_size[0]), int(cal.image_size[1])]
    d["parameters"] = cal.parameters
    return d


def calibration_from_dict(d: dict) -> Calibration:
    """Validate and build a Calibration from its JSON object."""
    _validate(d)
    size = d.get("image_size")
    return Calibration(kind=d["kind"], device_id=d["device_id"], method=d["method"],
                       parameters=d["parameters"], residuals=dict(d.get("residuals", {})),
                       image_size=None if size is None else (int(size[0]), int(size[1])),
                       date=d["date"])


def write_calibration(cal: Calibration, path: str | Path) -> Path:
    """Write a calibration file; returns its path."""
    path = Path(path)
    path.write_text(json.dumps(calibration_to_dict(cal), indent=1, allow_nan=False) + "\n")
    return path


def read_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file (CalibrationError naming the file and field)."""
    return read_json_as(path, calibration_from_dict, what="calibration", error=CalibrationError)


def _size_text(size) -> str:
    return "unknown-size" if size is None else f"{size[0]}x{size[1]}"


def check_matches(cal: Calibration, *, image_size: tuple[int, int] | None = None,
                  device_id: str | None = None) -> None:
    """Raise CalibrationError unless the calibration applies to frames of ``image_size``
    (W, H) from ``device_id`` (either may be None: not checked)."""
    size_bad = (image_size is not None and cal.image_size is not None
                and tuple(int(x) for x in image_size) != tuple(cal.image_size))
    device_bad = device_id is not None and device_id != cal.device_id
    if not (size_bad or device_bad):
        return
    if cal.image_size is None:
        raise CalibrationError(f"calibration is for device {cal.device_id}, got device "
                               f"{device_id}")
    got_size = _size_text(image_size if image_size is not None else cal.image_size)
    got_device = device_id if device_id is not None else cal.device_id
    raise CalibrationError(f"calibration is for {_size_text(cal.image_size)} frames from device "
                           f"{cal.device_id}, got {got_size} from device {got_device}")


def _stamp(kind: str, device_id: str, method: str, parameters: dict, residuals: dict,
           image_size: tuple[int, int] | None, date: str | None) -> Calibration:
    return Calibration(kind=kind, device_id=device_id, method=method, parameters=parameters,
                       residuals=residuals, image_size=image_size, date=date or _now_iso())


def carm_calibration(*, device_id: str, pixel_spacing_mm: tuple[float, float],
                     result: CarmCalibrationResult | None = None,
                     table: CarmAngleTable | None = None, method: str = "bb-phantom DLT + LM",
                     residuals: dict | None = None, date: str | None = None) -> Calibration:
    """A carm calibration from a single-orientation result and/or an angle table."""
    if result is None and table is None:
        raise CalibrationError("a carm calibration needs a result or an angle table")
    params: dict = {"pixel_spacing_mm": [float(x) for x in pixel_spacing_mm]}
    size = table.image_size if table is not None else result.image_size
    res = dict(residuals or {})
    if result is not None:
        params["K"] = result.K.tolist()
        params["T_cam_from_phantom"] = result.T_cam_from_phantom.tolist()
        res.setdefault("rms_px", result.rms_px)
        res.setdefault("n_bbs", len(result.bb_index))
        res.update({f"std_{k}_px": v for k, v in result.std.items()})
    if table is not None:
        params["angle_table"] = angle_table_to_dict(table)
        rms = [e.rms_px for e in table.entries if e.rms_px is not None]
        if rms:
            res.setdefault("max_rms_px", float(max(rms)))
    return _stamp("carm", device_id, method, params, res, size, date)


def distortion_calibration(model: DistortionModel, *, device_id: str,
                           method: str = "dot-grid polynomial", residuals: dict | None = None,
                           date: str | None = None) -> Calibration:
    """A distortion calibration of a fitted model."""
    return _stamp("distortion", device_id, method, distortion_model_to_dict(model),
                  dict(residuals or {}), model.image_size, date)


def pivot_calibration_record(result: PivotResult, *, device_id: str, n_poses: int,
                             date: str | None = None) -> Calibration:
    """A pivot calibration of a solved result (device_id names the tracked tool)."""
    params = {"tip_offset_mm": result.tip_offset_mm.tolist(),
              "pivot_point_mm": result.pivot_point_mm.tolist(), "n_poses": int(n_poses)}
    return _stamp("pivot", device_id, f"pivot {result.method} least squares", params,
                  {"rms_mm": result.rms_mm}, None, date)


def _require(cal: Calibration, kind: str) -> None:
    if cal.kind != kind:
        raise CalibrationError(f"expected a {kind} calibration, got kind {cal.kind!r}")


def carm_angle_table(cal: Calibration) -> CarmAngleTable | None:
    """The angle table of a carm calibration (None if it has a single orientation)."""
    _require(cal, "carm")
    p = cal.parameters
    if "angle_table" not in p:
        return None
    return angle_table_from_dict(p["angle_table"], image_size=cal.image_size,
                                 pixel_spacing_mm=tuple(p["pixel_spacing_mm"]))


def distortion_model(cal: Calibration) -> DistortionModel:
    """The DistortionModel of a distortion calibration."""
    _require(cal, "distortion")
    return distortion_model_from_dict(cal.parameters, cal.image_size)


def apply_carm_calibration(cal: Calibration, view: View | None = None, *,
                           lao_deg: float | None = None, cranial_deg: float | None = None,
                           T_phantom_from_world: np.ndarray | None = None,
                           intensity: str = "line_integral", I0: float | None = None) -> View:
    """The calibrated View.

    - ``view`` given: the same view (pose, intensity) with the calibrated K; with an angle
      table, K is interpolated at ``lao_deg`` / ``cranial_deg`` or at the angles in
      ``view.extra``. The view's frame size must match the calibration.
    - angles given: the interpolated view (K and pose) of the angle table.
    - neither: the single-orientation view, world = phantom frame unless
      ``T_phantom_from_world`` is given.
    """
    _require(cal, "carm")
    p = cal.parameters
    table = carm_angle_table(cal)
    spacing = tuple(float(x) for x in p["pixel_spacing_mm"])
    if view is not None:
        check_matches(cal, image_size=view.image_size)
        lao = view.extra.get("lao_deg") if lao_deg is None else lao_deg
        cran = view.extra.get("cranial_deg") if cranial_deg is None else cranial_deg
        if table is not None and lao is not None and cran is not None:
            K = interpolate_view(table, lao, cran).K
        elif "K" in p:
            K = np.array(p["K"], dtype=float)
        else:
            raise CalibrationError("this calibration is an angle table: give lao_deg and "
                                   "cranial_deg (or a view with them in its extra fields)")
        sdd = 0.5 * (K[0, 0] * spacing[0] + K[1, 1] * spacing[1])
        return replace(view, K=K, pixel_spacing_mm=spacing, source_to_detector_mm=float(sdd))
    if lao_deg is not None or cranial_deg is not None:
        if table is None:
            raise CalibrationError("this carm calibration has no angle table to interpolate")
        if lao_deg is None or cranial_deg is None:
            raise CalibrationError("give both lao_deg and cranial_deg")
        return interpolate_view(table, lao_deg, cranial_deg, intensity=intensity, I0=I0)
    if "K" not in p:
        raise CalibrationError("this calibration is an angle table: give lao_deg and "
                               "cranial_deg")
    K = np.array(p["K"], dtype=float)
    T = np.array(p["T_cam_from_phantom"], dtype=float)
    if T_phantom_from_world is not None:
        T = T @ np.asarray(T_phantom_from_world, dtype=float)
    sdd = 0.5 * (K[0, 0] * spacing[0] + K[1, 1] * spacing[1])
    return View(K=K, T_cam_from_world=T, image_size=cal.image_size, intensity=intensity, I0=I0,
                pixel_spacing_mm=spacing, source_to_detector_mm=float(sdd))
