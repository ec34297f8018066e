"""Shared by the adversarial tests: the helper modules on sys.path, and one intra-op thread for the
modules that run many tiny models (request ``one_thread``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "models"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
