"""Fixtures for the backend tests (helpers live in tests/backend/helpers.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.backend.helpers import CachedPhotos


@pytest.fixture
def cached_photos(tmp_path, redis_conn):
    return CachedPhotos(tmp_path, redis_conn)


@pytest.fixture
def centres():
    """Two group centres far apart along one axis (a 'gender'-like split)."""
    rng = np.random.default_rng(7)
    base = rng.normal(0, 0.05, 128)
    axis = np.zeros(128)
    axis[0] = 1.0
    return base + 0.4 * axis, base - 0.4 * axis
