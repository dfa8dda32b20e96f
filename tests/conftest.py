import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def write_fake_cifar10(folder, per_batch=2, seed=0):
    """CIFAR-10's python format (as torchvision downloads it): pickled dicts of uint8 rows of
    3072 values, the 1024 red values of a 32x32 image first, then green, then blue."""
    rng = np.random.default_rng(seed)
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"data": rows, b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    return batches


def write_idx(path, array):
    """A uint8 array in the IDX format of MNIST (gzipped when the name ends in .gz)."""
    import gzip
    array = np.asarray(array, dtype=np.uint8)
    sizes = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    header = bytes([0, 0, 0x08, array.ndim]) + sizes
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_idx_dataset(folder, train_labels, test_labels):
    """The four files of an MNIST-style dataset in ``folder``: 28x28 images (all pixels equal to
    the label) and the given labels, gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        labels = np.asarray(labels, dtype=np.uint8)
        images = np.repeat(labels, 28 * 28).reshape(-1, 28, 28)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """Two images per batch file in CIFAR-10's format, found through DDPM_DATA; the batches as written."""
    batches = write_fake_cifar10(tmp_path / "cifar_data")
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "cifar_data"))
    return batches
