"""What a benchmark ran on: the CPU, numba's threads and the versions of the packages
whose code does the work. Figures moved between two runs of unchanged code when either
changed (docs/benchmarks.md, session 16), so every benchmark records them."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["MEASURED_PACKAGES", "cpu_model", "machine_description", "machine_line"]

MEASURED_PACKAGES = ("numpy", "scipy", "numba", "SimpleITK", "opencv-python")
"""The distributions whose versions a benchmark records (rendering, resampling, image
processing, solvers)."""


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what the platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_description() -> dict:
    """JSON-ready: ``cpu_model``, ``numba_threads``, ``python`` and ``packages``
    (distribution -> version, "absent" when not installed)."""
    import numba

    return {"cpu_model": cpu_model(), "numba_threads": numba.get_num_threads(),
            "python": platform.python_version(),
            "packages": {name: _version(name) for name in MEASURED_PACKAGES}}


def machine_line(machine: dict) -> str:
    """``machine_description``'s record in one line, for a table's caption."""
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    return (f"CPU: {machine['cpu_model']}, {machine['numba_threads']} numba threads; "
            f"Python {machine['python']}, {packages}")
