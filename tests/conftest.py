import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("NORA_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session", autouse=True)
def _basis_cache(tmp_path_factory):
    """The shared bases the tests compute go to a cache of this session, never the user's."""
    old = os.environ.get("NORA_BASIS_CACHE")
    os.environ["NORA_BASIS_CACHE"] = str(tmp_path_factory.mktemp("basis-cache"))
    yield
    if old is None:
        os.environ.pop("NORA_BASIS_CACHE", None)
    else:
        os.environ["NORA_BASIS_CACHE"] = old


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "base" / "config.json").is_file():
        pytest.fail(f"fixtures not found at {FIXTURES} (set NORA_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def base_dir(fixtures_dir) -> Path:
    return fixtures_dir / "base"
