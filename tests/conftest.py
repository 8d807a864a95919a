"""Shared test set-up: import the package from the repository root, and a one-thread fixture."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pytest` works without installing the package


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run on one thread. With two threads on this 2-core machine, while another process
    holds a core, every op waits for a descheduled OpenMP worker (measured: a 40-step tiny rollout
    takes 11 s instead of 0.05 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
