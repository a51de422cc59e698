"""Test setup. TRITON_INTERPRET must be set before any kernel module is imported
(DESIGN.md section 4): Triton reads it when a kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
