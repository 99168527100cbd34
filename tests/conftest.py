import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("NORA_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "base" / "config.json").is_file():
        pytest.fail(f"fixtures not found at {FIXTURES} (set NORA_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def base_dir(fixtures_dir) -> Path:
    return fixtures_dir / "base"
