"""Datasets as float tensors in [-1, 1]: Fashion-MNIST (the book's running example), MNIST, CIFAR-10.

``load(name, split)`` returns ``(images, labels)``: images float32 of shape (N, C, H, W)
scaled to [-1, 1], labels int64 of shape (N,).

Each dataset is one :class:`DatasetInfo` in :data:`DATASETS`: its file names, the function that
reads them, its class names and image shape, the attention resolution its U-Net uses by
default, and how torchvision downloads it. :func:`load` and the command line
(``python -m ddpm_lib train --data NAME``) read everything from there; a new dataset is one
more entry.

Where the raw files are looked for, in order:

1. ``$DDPM_DATA`` (a sub-folder named after the dataset, e.g. ``$DDPM_DATA/mnist``, or the
   files themselves);
2. where Debian's packages put them (``/usr/share/datasets/fashion-mnist`` for
   ``apt-get install dataset-fashion-mnist``);
3. ``~/.cache/ddpm_lib/<name>`` and torchvision's usual layout under ``./data``;
4. a download through torchvision into ``~/.cache/ddpm_lib`` when it is installed and online
   (Colab, for example).

In each place a sub-folder named after the dataset comes before the place itself. MNIST and
Fashion-MNIST files have the same names: the first ten labels tell them apart
(``DatasetInfo.fingerprints``), and files that are recognisably the other dataset are
skipped, with a word in the error if nothing else is found.

The MNIST-style files are the IDX format of LeCun et al., read here with NumPy. CIFAR-10's
python batches are pickles, read with an unpickler that rebuilds NumPy arrays and nothing
else (a pickle can run any code while it loads).
"""
from __future__ import annotations

import _codecs
import gzip
import importlib.util
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import torch

from .checks import integer

SPLITS = ("train", "test")


def cache_dir() -> Path:
    """Where ddpm_lib keeps downloads and caches: ``$XDG_CACHE_HOME/ddpm_lib``, by default
    ``~/.cache/ddpm_lib``. Taught in chapter 1, "A garment in the fog" (where the data come from)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_lib"


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _fresh_copy_advice(path: Path) -> str:
    """How to replace a damaged data file: reinstall the Debian package it came from, or
    delete it and download again."""
    for info in DATASETS.values():
        if info.apt and Path(info.system) in Path(path).absolute().parents:
            return ("Reinstall the package that installed it: "
                    f"sudo apt-get install --reinstall {info.apt}")
    return (f"Delete it and get a fresh copy: load() downloads the dataset into {cache_dir()} when "
            "torchvision is installed and online, or copy the original files again")


def _damaged(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is damaged ({type(error).__name__}: {error}). "
                      + _fresh_copy_advice(path))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as a uint8 array of its shape."""
    try:
        with _open(path) as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:     # cut short, or not gzip at all
        raise _damaged(path, e) from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes. {_fresh_copy_advice(path)}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is cut short. "
                         + _fresh_copy_advice(path))
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found "
                         f"{array.size}. {_fresh_copy_advice(path)}")
    return array.reshape(shape)


def _read_idx_split(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) and labels (N,) from the two IDX files of a split (images, labels)."""
    images_path, labels_path = paths
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} and {labels_path} do not belong together: images of "
                         f"shape {images.shape} (expected (N, H, W)) and labels of shape "
                         f"{labels.shape} (expected (N,)). {_fresh_copy_advice(images_path)}")
    return images[:, None], labels


def _numpy_array_globals() -> dict:
    """The globals a pickled NumPy array needs: how NumPy rebuilds it, under both the module
    names NumPy 1 (numpy.core) and NumPy 2 (numpy._core) write into pickles."""
    core = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
    rebuild = {module: (name, getattr(importlib.import_module(f"{core}.{module}"), name))
               for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _codecs.encode}    # bytes in protocol-2 pickles of Python 3
    for package in ("numpy.core", "numpy._core"):
        for module, (name, function) in rebuild.items():
            allowed[f"{package}.{module}", name] = function
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that :class:`CifarUnpickler` does not allow. Taught in
    chapter 11, "A CIFAR-10 recipe for an hour on Colab" (``ch11-recipe``)."""


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches: dicts of NumPy arrays, lists, bytes and numbers.
    Taught in chapter 11, "A CIFAR-10 recipe for an hour on Colab" (``ch11-recipe``).

    ``pickle.load`` calls any function a file names, so a doctored batch file could run code
    while it loads. This unpickler finds only the globals that rebuilding a NumPy array needs
    and refuses every other with a :class:`RefusedGlobal` (a ``pickle.UnpicklingError``) naming
    the file and the global.
    """

    ALLOWED = _numpy_array_globals()

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")      # the batches were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise RefusedGlobal(
            f"{self.path} is not a CIFAR-10 batch: it asks for the Python global {module}.{name}, "
            "which the format never needs and which could run code; refused. Delete the file and "
            "download CIFAR-10 again from https://www.cs.toronto.edu/~kriz/cifar.html (or through "
            "torchvision)")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, path).load()
    except RefusedGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise _damaged(path, e) from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = np.asarray(batch.get(b"labels", [])) if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32 and labels.shape == (len(data),)
            and labels.dtype.kind in "iu"):
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data', uint8 of "
                         f"shape (N, 3072), and b'labels', N integers. {_fresh_copy_advice(path)}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*(_read_cifar_batch(p) for p in paths))
    return np.concatenate(images), np.concatenate(labels)



# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class DatasetInfo:
    """Everything ddpm_lib knows about one dataset; :func:`load` and the command line use
    nothing else. Taught in chapter 11, "A CIFAR-10 recipe for an hour on Colab" (``ch11-recipe``).

    ``files`` maps each split to the stems of its raw files (found with or without ``.gz``),
    which ``reader`` turns into uint8 images (N, *image_shape*) and labels (N,). ``dirs`` are
    the sub-folders the files may sit in (torchvision's layout among them), ``system`` the
    folder of a Debian package (``apt``), ``torchvision`` the class in
    ``torchvision.datasets`` that downloads it (``Class(root, train=..., download=True)``).
    ``attention_resolutions`` is the U-Net's default for these images. ``fingerprints``: the
    first ten labels of each split, for formats whose files other datasets share.
    """

    name: str
    title: str
    files: Mapping[str, tuple[str, ...]]
    reader: Callable[[list[Path]], tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    attention_resolutions: tuple[int, ...]
    dirs: tuple[str, ...]
    system: str
    torchvision: str
    apt: str | None = None
    fingerprints: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):        # frozen all the way down: the registry is read-only
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "fingerprints", MappingProxyType(dict(self.fingerprints)))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

DATASETS = {info.name: info for info in (
    DatasetInfo(
        "fashion_mnist", "Fashion-MNIST", _IDX_FILES, _read_idx_split, FASHION_MNIST_CLASSES,
        image_shape=(1, 28, 28), attention_resolutions=(7,),       # the book's U-Nets (chapter 4)
        dirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system="/usr/share/datasets/fashion-mnist", torchvision="FashionMNIST",
        apt="dataset-fashion-mnist",
        # checked on the files of Debian's dataset-fashion-mnist
        fingerprints={"train": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5), "test": (9, 2, 1, 1, 6, 1, 4, 6, 5, 7)}),
    DatasetInfo(
        "mnist", "MNIST", _IDX_FILES, _read_idx_split, tuple(str(d) for d in range(10)),
        image_shape=(1, 28, 28), attention_resolutions=(7,),
        dirs=("mnist", "MNIST/raw", "MNIST"), system="/usr/share/datasets/mnist", torchvision="MNIST",
        fingerprints={"train": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4), "test": (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)}),
    DatasetInfo(
        "cifar10", "CIFAR-10",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}, _read_cifar,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        image_shape=(3, 32, 32), attention_resolutions=(16,),      # Ho et al. 2020: 16x16
        dirs=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        system="/usr/share/datasets/cifar10", torchvision="CIFAR10"),
)}

DEFAULT_DATASET = "fashion_mnist"      # the book's running example: what load() & co. use by default

# The first ten labels of each IDX label file, by (dataset, split): MNIST and Fashion-MNIST use
# the same file names, and these tell the files apart.
LABEL_FINGERPRINTS = {(info.name, split): first for info in DATASETS.values()
                      for split, first in info.fingerprints.items()}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` ("fashion_mnist", "fashion-mnist", "MNIST", "cifar10"
    ...). Taught in chapter 11, "A CIFAR-10 recipe for an hour on Colab" (``ch11-recipe``)."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else None
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[key]


# ----------------------------------------------------------------------------- finding the files

def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(info: DatasetInfo) -> list[Path]:
    roots = []
    if os.environ.get("DDPM_DATA"):
        roots.append(Path(os.environ["DDPM_DATA"]))
    roots += [Path(info.system), cache_dir() / info.name, Path("data"), Path.cwd().parent / "data"]
    dirs = []
    for root in roots:      # a folder named after the dataset first, then the root itself
        dirs += [root / d for d in info.dirs]
        dirs.append(root)
    return dirs


def find_files(name: str, split: str) -> list[Path] | None:
    """The raw files of ``name``/``split`` in the first folder that has them all, or None.
    Folders whose files are recognisably another dataset (see :func:`identify`) are skipped.
    Taught in chapter 1, "A garment in the fog"."""
    return _search(dataset_info(name), split)[0]


def _search(info: DatasetInfo, split: str) -> tuple[list[Path] | None, list[str]]:
    """``(files or None, why each skipped folder was skipped)``."""
    skipped = []
    for folder in _candidate_dirs(info):
        found = [_find(folder, s) for s in info.files[split]]
        if not all(found):
            continue
        other = identify(found[-1]) if info.fingerprints else None
        if other is None or other == (info.name, split):
            return found, skipped
        first = ", ".join(map(str, LABEL_FINGERPRINTS[other]))
        skipped.append(f"{folder} holds the {DATASETS[other[0]].title} {other[1]} files (their "
                       f"first labels are {first}), not {info.title}'s {split} files")
    return None, skipped


def identify(labels_path: Path) -> tuple[str, str] | None:
    """``(dataset, split)`` whose first ten labels the IDX label file starts with (see
    :data:`LABEL_FINGERPRINTS`), or None if unknown or unreadable. Taught in chapter 1,
    "A garment in the fog"."""
    try:
        with _open(labels_path) as f:
            head = f.read(18)                     # 8 header bytes, then the first 10 labels
    except (OSError, EOFError, zlib.error):
        return None
    return next((key for key, first in LABEL_FINGERPRINTS.items() if tuple(head[8:]) == first),
                None)


def _download(info: DatasetInfo) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise FileNotFoundError("torchvision is not installed") from e
    for train in (True, False):
        getattr(tvd, info.torchvision)(root=str(cache_dir() / info.name), train=train, download=True)


def load(name: str = DEFAULT_DATASET, split: str = "train", limit: int | None = None,
         download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset as ``(images, labels)``: float32 (N, C, H, W) in [-1, 1], int64 (N,).

    ``name`` is a key of :data:`DATASETS`. ``limit`` keeps the first ``limit`` examples.
    ``download`` allows a torchvision download into ``~/.cache/ddpm_lib`` when the files are
    nowhere on disk. Taught in chapter 1, "A garment in the fog".
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        limit = integer("limit (the number of examples to keep, or None for all)", limit, minimum=1)
    files, skipped = _search(info, split)
    if files is None and download:
        try:
            _download(info)
        except Exception as e:  # offline, or no torchvision
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = None
        files, skipped = _search(info, split)
    else:
        reason = "download=False"
    if files is None:
        raise _not_found(info, split, skipped, reason)
    images, labels = info.reader(files)
    if tuple(images.shape[1:]) != info.image_shape:
        raise ValueError(f"{files[0]} holds images of shape {tuple(images.shape[1:])}, not "
                         f"{info.title}'s {info.image_shape}. {_fresh_copy_advice(files[0])}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).float().div_(127.5).sub_(1.0)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _not_found(info: DatasetInfo, split: str, skipped: list[str], reason) -> FileNotFoundError:
    how = [f"  - put the raw files ({', '.join(info.files[split])}, optionally .gz) in a folder "
           f"and set DDPM_DATA to it"]
    if info.apt:
        how.insert(0, f"  - on Debian/Ubuntu: sudo apt-get install {info.apt}")
    how.append("  - or, online with torchvision installed, call load() again (it downloads to "
               f"{cache_dir() / info.name})")
    if skipped:
        how.insert(0, f"  - the {info.title} files go in a folder named {info.dirs[0]!r} "
                      "under DDPM_DATA (or in a folder DDPM_DATA points to)")
    return FileNotFoundError(f"could not find the {info.name} {split} files; looked in:\n    "
                             + "\n    ".join(str(d) for d in _candidate_dirs(info)[:6])
                             + "".join(f"\nskipped: {why}" for why in skipped)
                             + f"\n(download failed: {reason})\nTo get them:\n" + "\n".join(how))
