"""Vertebral levels: names and TotalSegmentator label ids, one table for the whole project.

Label volumes follow the TotalSegmentator v2 'total' task (the real CTs in the shared
data and the phantom use the same ids). A level can be given by name ("L3") or by id
(29) everywhere; :func:`level_label` resolves both.
"""

from __future__ import annotations

from guidance.core.errors import GuidanceError

__all__ = ["LEVEL_LABELS", "LUMBAR", "LevelError", "level_label", "level_name"]

# TotalSegmentator v2 ids, caudal to cranial.
LEVEL_LABELS: dict[str, int] = {
    "sacrum": 25, "S1": 26, "L5": 27, "L4": 28, "L3": 29, "L2": 30, "L1": 31,
    "T12": 32, "T11": 33, "T10": 34, "T9": 35, "T8": 36, "T7": 37, "T6": 38, "T5": 39,
    "T4": 40, "T3": 41, "T2": 42, "T1": 43, "C7": 44, "C6": 45, "C5": 46, "C4": 47,
    "C3": 48, "C2": 49, "C1": 50,
}
LUMBAR = ("L1", "L2", "L3", "L4", "L5")
_NAMES = {label: name for name, label in LEVEL_LABELS.items()}


class LevelError(GuidanceError):
    """A vertebral level that is neither a known name nor a positive label id."""


def level_label(level: int | str) -> int:
    """The label id of a level given by name ("L3", case-insensitive), or by id (29 or "29")."""
    if isinstance(level, bool):
        raise LevelError(f"a level is a name like L3 or a label id like 29, got {level!r}")
    if isinstance(level, int):
        if level <= 0:
            raise LevelError(f"a level label id must be positive, got {level}")
        return level
    text = str(level).strip()
    if text.isdigit():
        return level_label(int(text))
    for name, label in LEVEL_LABELS.items():
        if name.lower() == text.lower():
            return label
    raise LevelError(f"unknown level {level!r}; use a label id or one of {', '.join(LEVEL_LABELS)}")


def level_name(label: int) -> str:
    """The name of a label id ("L3" for 29), or the id as text when it has none."""
    return _NAMES.get(int(label), str(int(label)))
