"""Datasets as float tensors in [-1, 1]: Fashion-MNIST (the book's running example), MNIST, CIFAR-10.

``load(name, split)`` returns ``(images, labels)``: images float32 of shape (N, C, H, W)
scaled to [-1, 1], labels int64 of shape (N,).

Where the raw files are looked for, in order:

1. ``$DDPM_DATA`` (the files themselves, or a sub-folder named after the dataset);
2. where Debian's packages put them (``/usr/share/datasets/fashion-mnist`` for
   ``apt-get install dataset-fashion-mnist``);
3. ``~/.cache/ddpm_lib/<name>`` and torchvision's usual layout under ``./data``;
4. a download through torchvision into ``~/.cache/ddpm_lib`` when it is installed and online
   (Colab, for example).

The MNIST-style files are the IDX format of LeCun et al., read here with NumPy.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch

DATASETS = {
    "fashion_mnist": dict(
        files={"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
        dirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system="/usr/share/datasets/fashion-mnist", torchvision="FashionMNIST",
        apt="dataset-fashion-mnist"),
    "mnist": dict(
        files={"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
        dirs=("mnist", "MNIST/raw", "MNIST"), system="/usr/share/datasets/mnist",
        torchvision="MNIST", apt=None),
    "cifar10": dict(
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        dirs=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        system="/usr/share/datasets/cifar10", torchvision="CIFAR10", apt=None),
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_lib"


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(name: str) -> list[Path]:
    spec = DATASETS[name]
    roots = []
    if os.environ.get("DDPM_DATA"):
        roots.append(Path(os.environ["DDPM_DATA"]))
    roots += [Path(spec["system"]), cache_dir() / name, Path("data"), Path.cwd().parent / "data"]
    dirs = []
    for root in roots:
        dirs.append(root)
        dirs += [root / d for d in spec["dirs"]]
    return dirs


def find_files(name: str, split: str) -> list[Path] | None:
    """The raw files of ``name``/``split`` in the first folder that has them all, or None."""
    stems = DATASETS[name]["files"][split]
    for folder in _candidate_dirs(name):
        found = [_find(folder, s) for s in stems]
        if all(found):
            return found
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _read_cifar(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for p in paths:
        with open(p, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"]))
    return np.concatenate(images), np.concatenate(labels)


def _download(name: str) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise FileNotFoundError("torchvision is not installed") from e
    root = cache_dir() / name
    getattr(tvd, DATASETS[name]["torchvision"])(root=str(root), train=True, download=True)
    getattr(tvd, DATASETS[name]["torchvision"])(root=str(root), train=False, download=True)


def load(name: str = "fashion_mnist", split: str = "train", limit: int | None = None,
         download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset as ``(images, labels)``: float32 (N, C, H, W) in [-1, 1], int64 (N,).

    ``limit`` keeps the first ``limit`` examples. ``download`` allows a torchvision download
    into ``~/.cache/ddpm_lib`` when the files are nowhere on disk.
    """
    name = name.lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    files = find_files(name, split)
    if files is None and download:
        try:
            _download(name)
        except Exception as e:  # offline, or no torchvision
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = None
        files = find_files(name, split)
    else:
        reason = "download=False"
    if files is None:
        spec = DATASETS[name]
        how = [f"  - put the raw files ({', '.join(spec['files'][split])}, optionally .gz) in a folder "
               f"and set DDPM_DATA to it"]
        if spec["apt"]:
            how.insert(0, f"  - on Debian/Ubuntu: sudo apt-get install {spec['apt']}")
        how.append("  - or, online with torchvision installed, call load() again (it downloads to "
                   f"{cache_dir() / name})")
        raise FileNotFoundError(f"could not find the {name} {split} files; looked in:\n    "
                                + "\n    ".join(str(d) for d in _candidate_dirs(name)[:6])
                                + f"\n(download failed: {reason})\nTo get them:\n" + "\n".join(how))
    if name == "cifar10":
        images, labels = _read_cifar(files)
    else:
        images, labels = _read_idx(files[0])[:, None], _read_idx(files[1])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).float().div_(127.5).sub_(1.0)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (any float tensor) to uint8 in 0..255 (values outside are clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
