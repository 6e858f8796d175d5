"""Shared test setup: import the flat scripts from the repository root; small fixed threads."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def official_reference():
    """Inputs, scores and DSM losses computed by ermongroup/ncsn on the two ngf-4 fixtures."""
    return torch.load(os.path.join(DATA, "official_reference.pt"), weights_only=True)
