"""Session-wide test settings: caches that runs may share (teacher outputs) go to a temporary folder, started processes
dump their stacks if they crash, and Lightning's log records reach pytest's ``caplog`` whatever the import order."""

import logging
import os
import tempfile

import pytest

os.environ.setdefault("ZOO_CACHE_DIR", tempfile.mkdtemp(prefix="zoo-cache-"))
# the processes tests start (DDP and sharded ranks) print every thread's Python stack if they crash (SIGSEGV, SIGABRT):
# the rank logs a failed test shows then say where
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _lightning_logs_propagate(monkeypatch):
    # Lightning stops its logger propagating when the root logger had no handler at its import (order-dependent)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
