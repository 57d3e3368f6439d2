"""Shared by every test: the helpers in tests/support/ are importable (``from train_fixtures
import make_data``), and every test starts from torch seed 0."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "support"))


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.manual_seed(0)
    yield
