"""Session-wide test settings: caches that runs may share (teacher outputs) go to a temporary folder, and
Lightning's log records reach pytest's ``caplog`` whatever the import order."""

import logging
import os
import tempfile

import pytest

os.environ.setdefault("ZOO_CACHE_DIR", tempfile.mkdtemp(prefix="zoo-cache-"))


@pytest.fixture(autouse=True)
def _lightning_logs_propagate(monkeypatch):
    # Lightning stops its logger propagating when the root logger had no handler at its import (order-dependent)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
