"""One call that registers X-ray images to a CT: files or arrays in, a result out.

For notebooks and scripts (the README's five-line example); the live pipeline and the
evaluation use ``Registrator`` directly to keep the prepared CT between images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from guidance.core.images import preprocess, read_xray
from guidance.core.levels import level_label
from guidance.core.views import View, read_view
from guidance.core.volume import Volume, load_volume
from guidance.registration.register import RegistrationResult, RegistrationSettings, Registrator

__all__ = ["register"]


def register(
    ct: Volume | str | Path,
    images: Sequence[np.ndarray | str | Path],
    views: Sequence[View | str | Path],
    *,
    labels: Volume | str | Path | None = None,
    level: int | str | None = None,
    settings: RegistrationSettings | None = None,
) -> RegistrationResult:
    """Register X-ray images (one per view) to a CT.

    ``ct``: a ``Volume`` in HU or its file; ``images``: pixel arrays or image files
    (any intensity kind, as their views say); ``views``: ``View`` objects or
    ``*.view.json`` files carrying the initial ``T_cam_from_world`` (world = LPS mm of
    the CT -> X-ray source frame, mm). ``labels`` (a label map or its file) with
    ``level`` (a name like "L3" or a label id) registers that vertebra alone.

    Returns the ``RegistrationResult``: the rigid correction of the CT
    ``T_world_corrected_from_world`` (mm) shared by all views, and ``views`` with the
    corrected ``T_cam_from_world = T_cam_from_world_initial @ inv(T_world_corrected_from_world)``;
    ``status`` is "ok" only when the quality gate accepts it.
    """
    volume = ct if isinstance(ct, Volume) else load_volume(ct)
    label_map = labels if labels is None or isinstance(labels, Volume) else load_volume(labels, units="label")
    view_list = [v if isinstance(v, View) else read_view(v) for v in views]
    pixels = [i if isinstance(i, np.ndarray) else read_xray(i) for i in images]
    prepared = [preprocess(p, v) for p, v in zip(pixels, view_list)]
    registrator = Registrator(volume, labels=label_map, settings=settings)
    return registrator.register(prepared, view_list, level=None if level is None else level_label(level))
