"""Instrument models: the geometry of the straight instruments we track or render.

A model's tool frame is the frame the tracker reports for its marker array.
``axis_tool`` points from the tip towards the handle (as pivot calibration gives it);
lengths and diameters are mm. Used by navigation (tracked instruments) and by the
simulator (instruments rendered into X-rays).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guidance.core.errors import GuidanceError

__all__ = ["INSTRUMENT_KINDS", "STEEL_MU_PER_MM", "METAL_MAX_LINE_INTEGRAL", "InstrumentModel", "InstrumentError",
           "INSTRUMENTS", "get_instrument"]


class InstrumentError(GuidanceError):
    """An instrument model or name that is not valid."""


def _vector3(value: object, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=float)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise InstrumentError(f"{name} must be 3 finite numbers, got {value!r}")
    return v


INSTRUMENT_KINDS = ("kwire", "jamshidi", "screw", "guide")
""""guide": a tracked aiming guide (a tube a robot arm or the surgeon holds on a planned
trajectory); its "tip" is the guide's distal end and its axis the tube's."""
STEEL_MU_PER_MM = 0.5
"""Effective linear attenuation of the instruments' steel (1/mm): lower than steel's true
~2/mm at 60 keV, which would paint a black bar (beam hardening, scatter)."""
METAL_MAX_LINE_INTEGRAL = 3.0
"""An instrument's line integral saturates here (a thick screw, or a wire seen end-on,
stays just visible): rendered so by the simulator, expected so by the image detector."""


@dataclass(frozen=True)
class InstrumentModel:
    """A straight instrument tracked by a marker array.

    ``length_mm``: length of the working part drawn back from the tip (wire, needle
    cannula, screw); ``diameter_mm``: its diameter; ``tip_offset_tool``: tip position
    in the tool frame (mm, from pivot calibration); ``axis_tool``: unit vector in the
    tool frame from the tip towards the handle (normalised on construction);
    ``mu_per_mm``: effective linear attenuation of the working part (1/mm), what the
    simulator renders and the image detector expects.
    """

    name: str
    kind: str
    length_mm: float
    diameter_mm: float
    tip_offset_tool: np.ndarray
    axis_tool: np.ndarray
    mu_per_mm: float = STEEL_MU_PER_MM

    def __post_init__(self) -> None:
        if self.kind not in INSTRUMENT_KINDS:
            raise InstrumentError(f"kind must be one of {', '.join(INSTRUMENT_KINDS)}; got {self.kind!r}")
        if not (self.length_mm > 0 and self.diameter_mm > 0 and self.mu_per_mm > 0):
            raise InstrumentError("length_mm, diameter_mm and mu_per_mm must be positive")
        axis = _vector3(self.axis_tool, "axis_tool")
        norm = float(np.linalg.norm(axis))
        if norm < 1e-9:
            raise InstrumentError("axis_tool must not be the zero vector")
        object.__setattr__(self, "tip_offset_tool", _vector3(self.tip_offset_tool,
                                                             "tip_offset_tool"))
        object.__setattr__(self, "axis_tool", axis / norm)


def _nominal(name: str, kind: str, length_mm: float, diameter_mm: float,
             tip_depth_mm: float) -> InstrumentModel:
    """A model whose tool frame has +z from the tip towards the handle and its origin on
    the axis, ``tip_depth_mm`` behind the tip (nominal; real values come from pivot
    calibration)."""
    return InstrumentModel(name, kind, length_mm, diameter_mm,
                           np.array([0.0, 0.0, -tip_depth_mm]), np.array([0.0, 0.0, 1.0]))


INSTRUMENTS: dict[str, InstrumentModel] = {
    m.name: m
    for m in (
        _nominal("kwire", "kwire", 150.0, 1.6, 150.0),
        _nominal("jamshidi", "jamshidi", 120.0, 3.0, 120.0),
        # 6.5 x 45 mm pedicle screw on a 200 mm driver: the array sits on the driver.
        _nominal("pedicle_screw_6.5x45", "screw", 45.0, 6.5, 245.0),
        _nominal("aiming_guide", "guide", 80.0, 8.0, 80.0),
    )
}


def get_instrument(name: str) -> InstrumentModel:
    """The registered model called ``name``; ValueError lists the known names."""
    try:
        return INSTRUMENTS[name]
    except KeyError:
        raise InstrumentError(f"unknown instrument {name!r}; known instruments: {', '.join(INSTRUMENTS)}") from None
