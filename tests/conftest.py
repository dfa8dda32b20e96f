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


def tiny_unet(seed: int = 0, **overrides):
    """The one small U-Net of the tests, built from seed ``seed``: 8 base channels, two
    levels, one residual block, no attention, no dropout; ``overrides`` change any of them
    (``base_channels=16``, ``attention_resolutions=(14,)``, ``num_classes=10``, ...)."""
    from ddpm_lib.unet import UNet
    torch.manual_seed(seed)
    config = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                  dropout=0.0)
    return UNet(**{**config, **overrides})


def _write_idx(path, array):
    """A uint8 array in the IDX format of MNIST (gzipped when the name ends in .gz)."""
    import gzip
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def _write_idx_split(folder, stems, images, labels):
    """MNIST's format: an IDX file of images (N, H, W), one of labels (N,), gzipped."""
    _write_idx(folder / f"{stems[0]}.gz", images[:, 0])
    _write_idx(folder / f"{stems[1]}.gz", labels)
    return {stems[0]: images[:, 0], stems[1]: labels}


def _write_cifar_split(folder, stems, images, labels):
    """CIFAR-10's python format (as torchvision downloads it): in each file a pickled dict of
    uint8 rows of 3072 values, the 1024 red values of a 32x32 image first, then green, then
    blue. The images and labels are dealt out to the files in turn."""
    written = {}
    for i, stem in enumerate(stems):
        batch = {b"data": images[i::len(stems)].reshape(-1, 3 * 32 * 32),
                 b"labels": [int(v) for v in labels[i::len(stems)]]}
        with open(folder / stem, "wb") as f:
            pickle.dump(batch, f)
        written[stem] = batch
    return written


def write_fake_dataset(folder, name, labels=None, per_file=2, seed=0):
    """The raw files of dataset ``name`` (an entry of ``ddpm_lib.data.DATASETS``) in ``folder``,
    in its format and under its file names. ``labels`` maps a split to its labels (default:
    ``per_file`` random labels per file); the images are random pixels for colour datasets, and
    every pixel equal to the label for grey ones. Returns what was written, by file name: the
    arrays of IDX files, the dicts of CIFAR-10 batches."""
    from ddpm_lib import data
    info = data.dataset_info(name)
    writer = {data._read_idx_split: _write_idx_split, data._read_cifar: _write_cifar_split}[info.reader]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, stems in info.files.items():
        y = np.asarray((labels or {}).get(split, rng.integers(0, info.num_classes, per_file * len(stems))),
                       dtype=np.uint8)
        c, h, w = info.image_shape
        x = (rng.integers(0, 256, (len(y), c, h, w), dtype=np.uint8) if c == 3
             else np.broadcast_to(y[:, None, None, None], (len(y), c, h, w)).copy())
        written.update(writer(folder, stems, x, y))
    return written


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """Two images per batch file in CIFAR-10's format, found through DDPM_DATA; the batches as written."""
    batches = write_fake_dataset(tmp_path / "cifar_data" / "cifar-10-batches-py", "cifar10")
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "cifar_data"))
    return batches


@pytest.fixture(scope="session")
def fashion():
    """Real Fashion-MNIST, loaded once per test session: ``train`` (the first 6000 training
    images), ``test`` (the first 2000 test images), float32 (N, 1, 28, 28) in [-1, 1], and
    their ``train_labels`` and ``test_labels``. Shared by every test: slice, never modify in
    place. Skips the test where the files are not on this machine."""
    from ddpm_lib import data
    try:
        train, train_labels = data.load("fashion_mnist", "train", limit=6000, download=False)
        test, test_labels = data.load("fashion_mnist", "test", limit=2000, download=False)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST is not on this machine: {e}")
    return SimpleNamespace(train=train, train_labels=train_labels, test=test, test_labels=test_labels)
