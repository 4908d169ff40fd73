import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The oldest-torch CI run (make test-oldest) has torch without torchvision: tests of torchvision's models skip there.
requires_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                          reason="torchvision is not installed (the oldest-torch run)")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Tests run two at a time (pytest -n 2) on a 2-core machine: one thread each.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def subprocess_env():
    """Environment for tests that start ``python -m featkd.cli`` or torchrun: the checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def python_exe():
    return sys.executable


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
