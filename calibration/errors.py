"""The one exception type of the calibration package."""

from __future__ import annotations

import numpy as np

from guidance.core.errors import GuidanceError

__all__ = ["CalibrationError", "matrix_field"]


class CalibrationError(GuidanceError):
    """A calibration that cannot be computed, read, validated or applied.

    Raised for malformed or mismatched calibration files, unknown calibration kinds,
    and calibration data too poor to solve (too few detected BBs or grid dots).
    """


def matrix_field(value, shape: tuple[int, int], name: str) -> np.ndarray:
    """A finite float matrix of ``shape`` from a JSON field, or CalibrationError naming it."""
    try:
        m = np.array(value, dtype=float)
    except (TypeError, ValueError):
        raise CalibrationError(f"{name} must be a numeric {shape[0]}x{shape[1]} matrix") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise CalibrationError(f"{name} must be a finite {shape[0]}x{shape[1]} matrix, "
                               f"got shape {m.shape}")
    return m
