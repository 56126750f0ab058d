"""Tiny tensors run fastest single-threaded on the shared CPU; restore the session's setting after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
