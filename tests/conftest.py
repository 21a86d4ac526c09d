"""Shared test setup."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from common.privacy.accounting import CACHE_DIR_ENV


@pytest.fixture(autouse=True, scope="session")
def calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Noise calibrations go to a folder of this session (and the processes it starts), not the user's cache."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("fedtail-cache"))
    yield
    if previous is None:
        del os.environ[CACHE_DIR_ENV]
    else:
        os.environ[CACHE_DIR_ENV] = previous
