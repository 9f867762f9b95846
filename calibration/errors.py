"""The one exception type of the calibration package."""

from __future__ import annotations

__all__ = ["CalibrationError"]


class CalibrationError(ValueError):
    """A calibration that cannot be computed, read, validated or applied.

    Raised for malformed or mismatched calibration files, unknown calibration kinds,
    and calibration data too poor to solve (too few detected BBs or grid dots).
    """
