"""guidance.live.serve: the pipeline's socket loop (its behaviour with a real pipeline is
tested in test_pipeline.py, which has the registration at hand)."""

import subprocess
import sys

HEAVY = ("scipy", "SimpleITK", "numba", "cv2", "cma", "matplotlib", "guidance.registration", "guidance.live.pipeline")


def test_the_loop_and_the_cli_import_no_heavy_module():
    """The pipeline process beats before it imports the registration and loads the CT:
    the CLI and the loop import only the sockets, the wire and numpy (a fresh interpreter,
    as a started process has)."""
    code = ("import sys, run_guidance, guidance.live.serve; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
