"""The package layers: each layer imports only the layers below it (README, Layout).

The check parses every module's import statements (also those inside functions) and
compares them with ``ALLOWED``; a test feeds it a forbidden import to show it bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of a module -> the layers (first-party) it may import. Longest prefix wins.
ALLOWED: dict[str, set[str]] = {
    "guidance.core": {"guidance.core"},
    "guidance.registration": {"guidance.core", "guidance.registration"},
    "guidance.navigation": {"guidance.core", "guidance.registration", "guidance.navigation"},
    "guidance.live": {"guidance.core", "guidance.registration", "guidance.navigation", "guidance.live",
                      "calibration"},
    "guidance.evaluation": {"guidance.core", "guidance.registration", "guidance.evaluation", "sim"},
    "guidance.tools": {"guidance", "sim", "calibration"},
    "guidance": {"guidance"},
    "calibration": {"guidance.core", "calibration"},
    "sim": {"guidance.core", "sim"},
    # The simulator's streamer publishes live messages, so it may use the wire and transport.
    "sim.stream": {"guidance.core", "sim", "guidance.live.wire", "guidance.live.transport",
                   "guidance.live.recording", "guidance.live.keys"},
}
FIRST_PARTY = ("guidance", "sim", "calibration", "run_guidance")
# Third-party packages a layer must not touch (sockets stay out of the maths).
FORBIDDEN_THIRD_PARTY = {"guidance.core": {"zmq", "pynetdicom"}, "guidance.registration": {"zmq", "pynetdicom"},
                         "guidance.navigation": {"zmq", "pynetdicom"}}


def _layer(module: str, table) -> str | None:
    matches = [name for name in table if module == name or module.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of the modules that ``source`` (the text of ``module``) imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:-node.level]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.update(f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names)
    return names


def violations(module: str, source: str) -> list[str]:
    """Forbidden imports of one module, as 'module imports name' lines."""
    layer = _layer(module, ALLOWED)
    if layer is None:
        return []
    bad = []
    for name in sorted(imported_modules(source, module)):
        top = name.split(".")[0]
        if top in FIRST_PARTY:
            if not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[layer]):
                bad.append(f"{module} imports {name}")
        elif top in FORBIDDEN_THIRD_PARTY.get(_layer(module, FORBIDDEN_THIRD_PARTY) or "", set()):
            bad.append(f"{module} imports {name}")
    return bad


def _modules():
    for package in ("guidance", "sim", "calibration"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def test_every_module_respects_its_layer():
    bad = [line for module, path in _modules() for line in violations(module, path.read_text(encoding="utf-8"))]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    assert all(_layer(module, ALLOWED) for module, _ in _modules())


@pytest.mark.parametrize("module, source", [
    ("guidance.core.drr", "from guidance.registration.register import Registrator"),
    ("guidance.core.views", "def f():\n    import guidance.live.wire\n"),
    ("guidance.registration.register", "import zmq"),
    ("sim.phantom", "from guidance.navigation import overlay"),
    ("calibration.carm", "from sim.xray import form_image"),
    ("guidance.live.wire", "from guidance.tools.demo import run_demo"),
    ("guidance.core.volume", "from ..registration import register"),
])
def test_checker_catches_forbidden_imports(module, source):
    assert violations(module, source)


@pytest.mark.parametrize("module, source", [
    ("guidance.registration.register", "from guidance.core.drr import render_drr"),
    ("guidance.live.pipeline", "from calibration.files import Calibration"),
    ("sim.stream", "from guidance.live import wire"),
    ("guidance.core.drr", "from . import views"),
])
def test_checker_allows_imports_downwards(module, source):
    assert not violations(module, source)
