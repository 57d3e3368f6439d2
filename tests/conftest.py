import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers (hf_models)


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.manual_seed(0)
    yield
