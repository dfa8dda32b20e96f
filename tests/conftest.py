import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def linear():
    from ddpm_lib import NoiseSchedule
    return NoiseSchedule.linear()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def book_build(tmp_path_factory):
    """The book built once per test session, as `make book` builds it (-W -n --keep-going):
    test_book_build.py checks the build, test_browser.py opens its pages."""
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(ROOT),
         "--path-output", str(out), "-W", "-n", "--keep-going"], capture_output=True, text=True, timeout=1200)
    yield SimpleNamespace(returncode=result.returncode, output=result.stdout[-4000:] + result.stderr[-4000:],
                          html=out / "_build" / "html")
    shutil.rmtree(out, ignore_errors=True)
