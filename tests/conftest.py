"""Shared fixtures: the real CT data folder (skipped with a reason when absent)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository: real CTs; tests using it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT data folder {SHARED_DATA} is absent (only a full checkout has it)")
    return SHARED_DATA
