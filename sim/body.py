"""The patient beyond the scanned box: what the simulator images besides the CT.

A CT ends at its first and last slice and, for a large patient or a small field of view,
at the edge of its field of view; the patient does not, and a C-arm sees the whole body
along each ray. An image of the CT's box alone has edges no X-ray has and hides the
tissue the registration's model lacks (docs/benchmarks.md, session 14: the real CT's
near-lateral views and the phantom's single views were 1-14 mm off in depth with that
tissue, and a model that ended at the box was pulled by its own edges).

Array axis 0 (k) is the slice axis: beyond the first and last slice the end slices go on;
beyond the in-plane faces each slice's body goes on inside the ellipse fitted to its
outline within the box (rounded skin, as field-of-view extension in CT reconstruction
models it), filled with the median tissue where the slice's edges cut the body.
"""

from __future__ import annotations

import cv2
import numpy as np

from guidance.core.volume import BODY_HU, Volume, body_cut_faces

__all__ = ["BODY_MARGIN_MM", "SOFT_TISSUE_MAX_HU", "continued_body"]

BODY_MARGIN_MM = 60.0
"""How far beyond the scanned box the simulated body reaches at most."""

SOFT_TISSUE_MAX_HU = 100.0
"""CT numbers up to this are soft tissue (the excess is bone); the body beyond the box is
capped at it: no bone is made up there."""


def continued_body(ct: Volume, margin_mm: float = BODY_MARGIN_MM) -> Volume:
    """The CT (HU) grown by up to ``margin_mm`` where its box cuts through the body (module
    docstring); 0 gives the CT itself."""
    if margin_mm <= 0:
        return ct
    n_k, n_j, n_i = (int(np.ceil(margin_mm / spacing)) for spacing in ct.spacing[::-1])
    k0, k1 = (n_k * cut for cut in body_cut_faces(ct.data, BODY_HU)[0])
    nk, nj, ni = ct.data.shape
    capped = np.minimum(ct.data, SOFT_TISSUE_MAX_HU)
    side = np.pad(capped, ((0, 0), (n_j, n_j), (n_i, n_i)), constant_values=-1000.0)
    beyond = np.ones(side.shape[1:], bool)
    beyond[n_j: n_j + nj, n_i: n_i + ni] = False
    j_beyond, i_beyond = np.nonzero(beyond)
    ji_beyond = np.column_stack([j_beyond - n_j, i_beyond - n_i]).astype(np.float32)  # in the slice's pixels
    for k in range(nk):
        edges = np.concatenate([capped[k, 0], capped[k, -1], capped[k, :, 0], capped[k, :, -1]])
        edge_body = edges[edges > BODY_HU]
        if len(edge_body):
            inside = _in_outline_ellipse(ct.data[k] > BODY_HU, ji_beyond)
            side[k][j_beyond[inside], i_beyond[inside]] = float(np.median(edge_body))
    data = np.pad(side, ((k0, k1), (0, 0), (0, 0)), mode="edge")
    data[k0: k0 + nk, n_j: n_j + nj, n_i: n_i + ni] = ct.data
    T = ct.T_world_from_index.copy()
    T[:3, 3] = ct.index_to_world(-np.array([n_i, n_j, k0], dtype=float))[0]
    return Volume(data=data, T_world_from_index=T, units="HU")


def _in_outline_ellipse(body: np.ndarray, ji: np.ndarray) -> np.ndarray:
    """Which points ``ji`` (N x 2, the slice's row and column, outside it too) lie inside the
    ellipse fitted to the outline of the slice's largest ``body`` region, leaving out the
    outline along the edges of the slice (where the scan, not the skin, ends it). None when
    that region does not reach the edges or its outline is too short to fit."""
    none = np.zeros(len(ji), bool)
    count, regions, stats, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), connectivity=8)
    if count < 2:
        return none
    largest = regions == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    nj, ni = body.shape
    if not (largest[0].any() or largest[-1].any() or largest[:, 0].any() or largest[:, -1].any()):
        return none
    contours, _ = cv2.findContours(largest.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    xy = np.concatenate(contours)[:, 0, :]
    xy = xy[(xy[:, 0] > 0) & (xy[:, 0] < ni - 1) & (xy[:, 1] > 0) & (xy[:, 1] < nj - 1)]
    if len(xy) < 20:
        return none
    (cx, cy), (w, h), angle = cv2.fitEllipse(xy.astype(np.float32))
    x, y = ji[:, 1] - cx, ji[:, 0] - cy
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    return ((x * c + y * s) / (w / 2.0)) ** 2 + ((-x * s + y * c) / (h / 2.0)) ** 2 <= 1.0
