"""Shared fixtures: the real CT data folder (skipped with a reason when absent) and a
session-wide temporary cache folder for prepared CTs."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository: real CTs; tests using it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT data folder {SHARED_DATA} is absent (only a full checkout has it)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def prepared_ct_cache(tmp_path_factory):
    """Prepared CTs of the test session go to a temporary folder, not the user's cache."""
    from guidance.registration.prepared import CACHE_ENV

    folder = tmp_path_factory.mktemp("prepared_ct_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder
