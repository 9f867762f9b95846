"""Intra-operative X-ray / CT guidance for minimally invasive spine surgery.

The public API, loaded on first use so that ``import guidance`` is cheap and changes
nothing in the host process (thread setup is the explicit ``configure_threads``)::

    import guidance
    ct = guidance.load_volume("ct.nii.gz")                  # HU, world = LPS mm
    result = guidance.register(ct, ["shot.png"], ["shot.view.json"])
    print(result.status, result.reason)
    print(result.T_world_corrected_from_world)              # rigid correction of the CT (mm)

Layers (each imports only those before it): ``guidance.core`` -> ``guidance.registration``
-> ``guidance.navigation`` -> ``guidance.live``; ``guidance.evaluation`` and
``guidance.tools`` apart; ``sim`` and ``calibration`` use the core only.
"""

from __future__ import annotations

import importlib

_API = {
    "GuidanceError": "guidance.core.errors",
    "configure_threads": "guidance.core.threads",
    "Volume": "guidance.core.volume",
    "load_volume": "guidance.core.volume",
    "hu_to_attenuation": "guidance.core.volume",
    "View": "guidance.core.views",
    "read_view": "guidance.core.views",
    "write_view": "guidance.core.views",
    "carm_view": "guidance.core.views",
    "read_xray": "guidance.core.images",
    "write_xray": "guidance.core.images",
    "read_xray_dicom": "guidance.core.dicom",
    "render_drr": "guidance.core.drr",
    "prepare_volume": "guidance.core.drr",
    "read_plan": "guidance.core.plan",
    "level_label": "guidance.core.levels",
    "Registrator": "guidance.registration.register",
    "RegistrationSettings": "guidance.registration.register",
    "RegistrationResult": "guidance.registration.register",
    "register_volumes": "guidance.registration.register3d",
    "register": "guidance.registration.api",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'guidance' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
