"""Calibration: C-arm geometry (BB phantom), image-intensifier distortion, instrument
pivot calibration, and the versioned calibration file (``guidance.calibration/1``).

Modules: ``phantom_bb`` (BB phantom design, JSON, X-ray simulator), ``blobs`` (dark-blob
detection with sub-pixel centroids), ``carm`` (correspondence, DLT, refinement, angle
table), ``distortion`` (dot-grid plate, polynomial model, remap tables), ``pivot``,
``files`` (read / write / validate / apply), ``report`` (PNG + summary), ``cli``
(entry points for the main CLI) and ``bench`` (accuracy benchmark).
"""
