"""Shared fixtures: the tiny pair, the real HH-RLHF rows beside the checkout, a scratch cache."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HH_DEFAULT = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


@pytest.fixture(scope="session")
def hh_file() -> Path:
    """The local copy of HH-RLHF harmless-base test rows (1,500), as CI provides it."""
    path = Path(os.environ.get("ALIGNLIB_HH_RLHF") or HH_DEFAULT)
    if not path.is_file():
        pytest.skip(f"no local HH-RLHF copy at {path}")
    return path


@pytest.fixture(scope="session")
def tiny():
    from alignlib import load_pair

    return load_pair("tiny")


@pytest.fixture(scope="session")
def builtin_prefs():
    from alignlib import load_preferences

    return load_preferences("builtin")
