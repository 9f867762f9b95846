"""Calibrations in the live path: which calibration applies to what, and how.

- C-arm (``carm``): the intrinsics K of each frame, interpolated in the angle table at
  the C-arm angles the frame's view reports (``lao_deg`` / ``cranial_deg`` in its
  extra fields) or the single calibrated K; the pose stays the tracker's / encoders'.
- Distortion: applied to the pixels by the pipeline (``calibration.distortion``).
- Pivot: the tip of the tracked tool named by the calibration's ``device_id``, in its
  marker array frame; the instrument model's axis and size stay nominal.

A frame from another device (its ``source``) or of another size than a C-arm
calibration, or without the angles an angle table needs, is refused with the reason;
so is an instrument whose pivot-calibrated tip lies implausibly far from its model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from calibration.errors import CalibrationError
from guidance.core.instrument_models import INSTRUMENTS, InstrumentModel
from guidance.core.views import View

if TYPE_CHECKING:  # calibration.files (and its fitting modules) is imported where used: a pipeline
    from calibration.files import Calibration  # without calibrations starts without it

__all__ = ["MAX_TIP_SHIFT_MM", "LiveCalibrations", "sort_calibrations", "calibrated_view", "calibrated_instruments"]

MAX_TIP_SHIFT_MM = 30.0
"""A pivot-calibrated tip further than this from the model's nominal tip (mm, tool frame)
means the calibration is not of this instrument (another tool, another array mount)."""


@dataclass(frozen=True)
class LiveCalibrations:
    """The calibrations a pipeline uses: at most one C-arm and one distortion calibration,
    and pivot calibrations by tool id."""

    carm: Calibration | None = None
    distortion: Calibration | None = None
    pivots: dict[str, Calibration] = field(default_factory=dict)


def sort_calibrations(calibrations: list[Calibration]) -> LiveCalibrations:
    """Sort calibration records by kind; two of one kind (or two pivots of one tool) are an error."""
    carm = distortion = None
    pivots: dict[str, Calibration] = {}
    for cal in calibrations:
        if cal.kind == "pivot":
            if cal.device_id in pivots:
                raise CalibrationError(f"two pivot calibrations of tool {cal.device_id!r}")
            pivots[cal.device_id] = cal
        elif cal.kind == "carm":
            if carm is not None:
                raise CalibrationError("two C-arm calibrations given; give one")
            carm = cal
        else:
            if distortion is not None:
                raise CalibrationError("two distortion calibrations given; give one")
            distortion = cal
    return LiveCalibrations(carm=carm, distortion=distortion, pivots=pivots)


def calibrated_view(cal: Calibration, view: View, device_id: str) -> View:
    """``view`` with the calibrated K for a frame from ``device_id``; raises
    CalibrationError naming the mismatch (device, frame size, missing or out-of-range angles)."""
    from calibration.files import apply_carm_calibration, check_matches

    check_matches(cal, image_size=view.image_size, device_id=device_id)
    return apply_carm_calibration(cal, view)


def calibrated_instruments(pivots: dict[str, Calibration], models: dict[str, InstrumentModel] | None = None, *,
                           max_tip_shift_mm: float = MAX_TIP_SHIFT_MM
                           ) -> tuple[dict[str, InstrumentModel], dict[str, str]]:
    """(instrument models with the pivot-calibrated tips, tool id -> why its calibration is
    refused). A pivot calibration of a tool that is no known instrument is an error."""
    models = dict(INSTRUMENTS if models is None else models)
    refused: dict[str, str] = {}
    for tool_id, cal in pivots.items():
        if tool_id not in models:
            raise CalibrationError(f"pivot calibration of {tool_id!r}, which is no known instrument "
                                   f"({', '.join(sorted(models))})")
        model = models[tool_id]
        tip = np.asarray(cal.parameters["tip_offset_mm"], dtype=float)
        shift = float(np.linalg.norm(tip - model.tip_offset_tool))
        if shift > max_tip_shift_mm:
            refused[tool_id] = (f"its pivot calibration puts the tip {shift:.0f} mm from the {tool_id} model's "
                                f"(> {max_tip_shift_mm:g} mm): another tool or array mount")
            continue
        models[tool_id] = replace(model, tip_offset_tool=tip)
    return models, refused
