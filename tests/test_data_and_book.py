import numpy as np
import pytest
import torch

from ddpm_lib import book, data
from ddpm_lib.viz import make_grid


def test_fashion_mnist_loads_in_range():
    x, y = data.load("fashion_mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    assert torch.bincount(y).tolist() == [1000] * 10
    x5, y5 = data.load("fashion-mnist", "train", limit=5)
    assert x5.shape == (5, 1, 28, 28) and y5.tolist() == [9, 0, 0, 3, 0]  # the file's first labels


def test_ddpm_data_env_comes_first(tmp_path, monkeypatch):
    import gzip
    import shutil
    src = data.find_files("fashion_mnist", "test")
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    # corrupt our copy of the labels so we can tell which file was read
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw = bytearray(f.read())
    raw[8] = 7
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(raw))
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    _, y = data.load("fashion_mnist", "test", limit=1)
    assert y.item() == 7


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="DDPM_DATA"):
        data.load("cifar10", download=False)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load("fashion_mnist", "validation")
    with pytest.raises(ValueError, match="limit"):
        data.load("fashion_mnist", limit=0)


def test_truncated_idx_file(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        data._read_idx(p)


def test_to_uint8_and_grid():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert data.to_uint8(x).flatten().tolist() == [0, 128, 255, 255]
    grid = make_grid(torch.zeros(5, 1, 4, 4), nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1) and grid.dtype.name == "uint8"
    assert make_grid(torch.zeros(2, 3, 4, 4)).shape == (8, 14, 3)  # padding 2


def test_setup_and_profiles(monkeypatch, capsys):
    monkeypatch.setenv("DDPM_PROFILE", "smoke")
    s = book.setup(seed=3)
    out = capsys.readouterr().out
    assert "profile: smoke" in out and "device: cpu" in out and "torch" in out
    assert s.profile == "smoke" and s.pick(smoke=1, cpu=2, gpu=3) == 1
    a = torch.rand(1).item()
    book.setup(seed=3, quiet=True)
    assert torch.rand(1).item() == a          # seeded
    monkeypatch.setenv("DDPM_PROFILE", "huge")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        book.setup()
    with pytest.raises(ValueError, match="missing"):
        s.pick(smoke=1, cpu=2)
    monkeypatch.delenv("DDPM_PROFILE")
    assert book.get_profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(book, "DRIVE", tmp_path / "drive" / "MyDrive")
    local = book.checkpoint_dir(local=tmp_path / "ckpts")
    assert local == tmp_path / "ckpts" and local.is_dir()      # no Drive mounted
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert book.checkpoint_dir("ddpm-book") == tmp_path / "drive" / "MyDrive" / "ddpm-book"


def test_results_are_found_in_the_repository_or_fetched(tmp_path, monkeypatch):
    from ddpm_lib import book
    assert book.load_result("sweep_h200.json")["n"] == 2000          # the committed file
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(book, "RESULTS_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        book.result_path("no_such_result.json")


def test_cifar10_python_batches(fake_cifar10):
    batches = fake_cifar10
    x, y = data.load("cifar10", "train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    first = batches["data_batch_1"][b"data"][0].astype(np.float64)
    # channel c, row i, column j of the first image is value 1024 c + 32 i + j of its row
    for c, i, j in [(0, 0, 1), (1, 5, 7), (2, 31, 30)]:
        assert x[0, c, i, j].item() == pytest.approx(first[1024 * c + 32 * i + j] / 127.5 - 1, abs=1e-6)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    x_test, y_test = data.load("cifar10", "test", limit=1)
    assert x_test.shape == (1, 3, 32, 32) and y_test.tolist() == batches["test_batch"][b"labels"][:1]
