"""Shared fixtures: the real CT data folder (skipped with a reason when absent), a
session-wide temporary cache folder for prepared CTs, and the 1.5 mm phantom with its
registrator that the live-path tests use (a module may define its own ``phantom``)."""

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
    """Cached files of the test session (prepared CTs, the phantom) go to a temporary folder, not the user's cache."""
    from guidance.core.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("prepared_ct_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def phantom():
    """The embedded phantom at 1.5 mm (seed 0)."""
    from sim.phantom import make_phantom

    return make_phantom(seed=0, spacing_mm=1.5)


@pytest.fixture(scope="module")
def registrator(phantom):
    """A registrator of ``phantom``'s CT and labels."""
    from guidance.registration.register import Registrator

    return Registrator(phantom.ct, labels=phantom.labels)
