from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # the trainer fixes the thread count (torch_threads); give other test modules theirs back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
