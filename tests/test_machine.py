"""The machine record every benchmark carries."""

import cv2
import numba
import numpy as np

from guidance.core.machine import MEASURED_PACKAGES, machine_description, machine_line


def test_machine_description_names_the_installed_versions():
    machine = machine_description()
    assert machine["cpu_model"] and machine["numba_threads"] == numba.get_num_threads()
    assert set(machine["packages"]) == set(MEASURED_PACKAGES)
    assert machine["packages"]["numpy"] == np.__version__ and machine["packages"]["numba"] == numba.__version__
    assert machine["packages"]["opencv-python"].startswith(cv2.__version__)
    line = machine_line(machine)
    assert line.startswith("CPU: ") and f"numpy {np.__version__}" in line


def test_an_absent_package_is_named_absent(monkeypatch):
    monkeypatch.setattr("guidance.core.machine.MEASURED_PACKAGES", ("numpy", "no-such-distribution-here"))
    assert machine_description()["packages"] == {"numpy": np.__version__, "no-such-distribution-here": "absent"}
