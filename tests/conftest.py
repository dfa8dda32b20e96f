import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def linear():
    from ddpm_lib import NoiseSchedule
    return NoiseSchedule.linear()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
