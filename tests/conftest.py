"""Shared fixtures. `tg` is train_gpt imported as a module (importing it has no side effects)."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tg():
    import train_gpt
    return train_gpt


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Each test module starts with empty torch.compile caches: dynamo keeps at most 8 graphs per function, and the
    modules compile the head with many configs (the compiled kernels themselves stay cached on disk)."""
    import torch
    torch._dynamo.reset()
    yield
