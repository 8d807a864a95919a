"""Shared test set-up: import the package from the repository root; one thread for tiny models; the
`faulty_env` fixture. Shared test doubles and sample data: tests/fakes.py; subprocess runs: tests/run_helpers.py."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pytest` works without installing the package


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tests of tiny models run on one thread (the slow real-model tests keep them all). With two threads on this 2-core machine, while another process
    holds a core, every op waits for a descheduled OpenMP worker (measured: a 40-step tiny rollout
    takes 11 s instead of 0.05 s)."""
    n = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def faulty_env():
    """A `tests.fakes.FaultyEnv`, its hung calls released at the end of the test."""
    from tests.fakes import FaultyEnv

    env = FaultyEnv()
    yield env
    env.release.set()  # let the abandoned thread finish
