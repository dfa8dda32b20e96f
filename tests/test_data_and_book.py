import os
import pickle
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import pytest
import torch
from conftest import write_fake_dataset

from ddpm_lib import book, data, features
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
    assert features.to_uint8(x).flatten().tolist() == [0, 128, 255, 255]
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


def test_results_ship_with_the_package_and_are_verified(tmp_path, monkeypatch):
    """Results are read from ddpm_lib/results/ whatever the working folder, only with the
    right digest; nothing is downloaded."""
    from ddpm_lib import book
    monkeypatch.chdir(tmp_path)                  # no results/ here
    assert book.load_result("sweep_h200.json")["n"] == 2000
    with pytest.raises(FileNotFoundError, match="not one of the book's results"):
        book.result_path("no_such_result.json")
    copy = tmp_path / "results"
    copy.mkdir()
    for name in ("sweep_h200.json", "nll_bound_cpu.json"):
        (copy / name).write_bytes((book.RESULTS_DIR / name).read_bytes())
    (copy / "nll_bound_cpu.json").write_text('{"tampered": true}')
    monkeypatch.setattr(book, "RESULTS_DIR", copy)
    assert book.load_result("sweep_h200.json")["n"] == 2000
    with pytest.raises(ValueError, match="a changed or damaged file"):
        book.result_path("nll_bound_cpu.json")
    with pytest.raises(FileNotFoundError, match="installed without its results"):
        book.result_path("bench_cpu.json")
    assert not hasattr(book, "RESULTS_URL")


def test_results_table_matches_the_folder():
    """Every file in ddpm_lib/results/ has its sha256 in book.RESULTS_SHA256 (and nothing
    else does): after regenerating a result, update the table, or reading it is refused."""
    from ddpm_lib import book, io
    folder = ROOT / "ddpm_lib" / "results"
    files = {p.name: io.sha256(p) for p in folder.iterdir() if p.is_file()}
    assert book.RESULTS_SHA256 == files


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


# ----------------------------------------------------------------------------- bad input

def create_file(path):
    Path(path).touch()


class CreatesAFile:
    """A pickle payload: loading it calls create_file(path)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return create_file, (self.path,)


def test_cifar10_batch_that_runs_code_is_refused(fake_cifar10, tmp_path):
    marker = tmp_path / "the_payload_ran"
    batch = Path(os.environ["DDPM_DATA"]) / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({b"data": CreatesAFile(marker), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError) as info:
        data.load("cifar10", "train")
    assert not marker.exists()
    assert str(batch) in str(info.value)
    assert f"{create_file.__module__}.create_file" in str(info.value)
    with open(batch, "rb") as f:       # the payload works: plain pickle.load runs it
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("core", ["numpy._core", "numpy.core"])
def test_cifar_unpickler_reads_numpy_arrays(tmp_path, protocol, core):
    """What the format needs: NumPy arrays, pickled by any protocol, under NumPy 1's module name
    (numpy.core: the real CIFAR-10 files) or NumPy 2's (numpy._core)."""
    rows = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": rows, b"labels": [3, 7]}, protocol=protocol)
    other = "numpy.core" if core == "numpy._core" else "numpy._core"
    if protocol == 2:   # module names are text lines there: write the one under test
        raw = raw.replace(f"{other}.multiarray".encode(), f"{core}.multiarray".encode())
    path = tmp_path / "batch"
    path.write_bytes(raw)
    images, labels = data._read_cifar([path])
    assert np.array_equal(images.reshape(2, 3072), rows) and labels.tolist() == [3, 7]


def test_damaged_cifar10_batch_says_which_file(fake_cifar10):
    batch = Path(os.environ["DDPM_DATA"]) / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch is damaged.*fresh copy"):
        data.load("cifar10", "test")


def test_mnist_files_are_told_apart_from_fashion_mnist(tmp_path, monkeypatch):
    """Both datasets use the same file names: the first labels say which is which."""
    fashion = data.find_files("fashion_mnist", "train")[0].parent
    monkeypatch.setenv("DDPM_DATA", str(fashion))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", "test", download=False)
    message = str(info.value)
    assert f"{fashion} holds the Fashion-MNIST test files" in message and "'mnist'" in message
    # with MNIST in a folder of its own beside them, each name finds its own files
    root = tmp_path / "datasets"
    write_fake_dataset(root, "fashion_mnist", labels=data.DATASETS["fashion_mnist"].fingerprints)
    write_fake_dataset(root / "mnist", "mnist", labels=data.DATASETS["mnist"].fingerprints)
    monkeypatch.setenv("DDPM_DATA", str(root))
    _, y = data.load("mnist", "train")
    assert tuple(y.tolist()) == data.LABEL_FINGERPRINTS["mnist", "train"]
    _, y = data.load("fashion_mnist", "test")
    assert tuple(y.tolist()) == data.LABEL_FINGERPRINTS["fashion_mnist", "test"]
    # MNIST where Fashion-MNIST is asked for is skipped: the Debian package's files are found
    monkeypatch.setenv("DDPM_DATA", str(root / "mnist"))
    _, y = data.load("fashion_mnist", "train", limit=10)
    assert tuple(y.tolist()) == data.LABEL_FINGERPRINTS["fashion_mnist", "train"]


def test_label_fingerprints_match_the_installed_fashion_mnist():
    for split in ("train", "test"):
        labels_file = data.find_files("fashion_mnist", split)[1]
        assert data.identify(labels_file) == ("fashion_mnist", split)


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_damaged_gzip_file_says_which_and_how_to_replace_it(tmp_path, monkeypatch, damage):
    write_fake_dataset(tmp_path, "fashion_mnist", labels={"train": [1, 2, 3], "test": [4, 5, 6]})
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = images.read_bytes()
    images.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else b"not a gzip file at all")
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    with pytest.raises(ValueError) as info:
        data.load("fashion_mnist", "test")
    assert f"{images} is damaged" in str(info.value) and "fresh copy" in str(info.value)
    debian = data._fresh_copy_advice(Path("/usr/share/datasets/fashion-mnist/t10k-labels.gz"))
    assert "apt-get install --reinstall dataset-fashion-mnist" in debian


def test_more_bad_arguments_of_load_and_to_uint8():
    assert data.load("fashion_mnist", "test", limit=np.int64(3))[1].tolist() == [9, 2, 1]
    for limit in (True, 2.5, -1):
        with pytest.raises(ValueError, match="limit"):
            data.load("fashion_mnist", "test", limit=limit)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load(None)
    with pytest.raises(ValueError, match="already uint8"):
        features.to_uint8(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        features.to_uint8(torch.full((1, 1, 2, 2), float("nan")))


# ----------------------------------------------------------------------------- the registry

@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_every_registered_dataset_loads_from_its_files(tmp_path, monkeypatch, name):
    """One path for every dataset: the registry entry's file names and reader, then its image
    shape; files of the wrong shape are refused with the expected one."""
    info = data.DATASETS[name]
    labels = {"train": list(range(info.num_classes)) * 2, "test": [3, 1, 4, 1, 5]}
    write_fake_dataset(tmp_path / info.dirs[0], name, labels=labels)
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    for split in data.SPLITS:
        x, y = data.load(name.upper(), split, download=False)
        assert tuple(x.shape) == (len(labels[split]), *info.image_shape) and x.dtype == torch.float32
        assert sorted(y.tolist()) == sorted(labels[split])
    assert info.num_classes == len(info.classes) == 10
    assert all(r <= info.image_shape[-1] for r in info.attention_resolutions)
    assert data.FASHION_MNIST_CLASSES == data.DATASETS["fashion_mnist"].classes
    with pytest.raises(TypeError):
        info.files["train"] = ()               # the registry is read-only


def test_images_of_the_wrong_shape_are_refused(tmp_path, monkeypatch):
    write_fake_dataset(tmp_path, "mnist", labels=data.DATASETS["mnist"].fingerprints)
    small = np.zeros((10, 14, 14), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in small.shape)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + small.tobytes())
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"shape \(1, 14, 14\), not MNIST's \(1, 28, 28\)"):
        data.load("mnist", "test", download=False)


def test_progress_bars_show_outside_smoke_and_the_book_executor(monkeypatch):
    from ddpm_lib import book
    monkeypatch.delenv("DDPM_PROGRESS", raising=False)
    shown = {p: book.setup(profile=p, device="cpu", quiet=True).progress for p in book.PROFILES}
    assert shown == {"smoke": False, "cpu": True, "gpu": True}
    monkeypatch.setenv("DDPM_PROGRESS", "0")        # as scripts/execute_chapter.py sets it
    assert not book.setup(profile="cpu", device="cpu", quiet=True).progress
