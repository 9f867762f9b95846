"""The disk cache folder of derived data (prepared CTs, the phantom, CT and label files read).

One folder for every cache, so a user moves or clears them in one place: files in it
are named by a content hash of their inputs and rebuilt when stale or unreadable, never
trusted blindly (each cache's loader checks its own format and key).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "default_cache_dir"]

CACHE_ENV = "GUIDANCE_CACHE_DIR"
"""Environment variable naming the cache folder."""


def default_cache_dir() -> Path:
    """``$GUIDANCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/guidance``, else ``~/.cache/guidance``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guidance"
