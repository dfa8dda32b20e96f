"""Features: what every score of :mod:`ddpm_lib.metrics` compares. Taught in chapter 7,
"Every score compares features" (``ch07-features``).

A score never looks at images directly: an *extractor* maps each image to a vector, and the
score compares the two clouds of vectors. Here are the extractors and the conversions in front:

* :func:`as_float_images` (float in [-1, 1], or uint8 in 0..255) and back, :func:`to_uint8`;
* the default extractor, the small Fashion-MNIST classifier that ships with the package
  (:class:`FashionClassifier`, :func:`load_classifier`, :func:`classifier_outputs`): 128
  features per image from its penultimate layer, class probabilities from its last. It runs
  in seconds on a CPU; Frechet distances with it are "FID-style": they rank models, but do
  not compare with the FID numbers in papers;
* :func:`inception_extractor`, the standard FID network (Inception-v3 with the TensorFlow
  weights): pytorch-fid's ``InceptionV3`` when installed (``pip install "ddpm_lib[fid]"``),
  else the book's port :class:`FIDInception`; the tests check the two agree;
* or any callable ``images (B, C, H, W) float in [-1, 1] -> features (B, D)``.

:func:`extract_features` runs an extractor in batches, :func:`reference_features` on a real
dataset split (cached for the default extractor). Features come out float64, (N, D).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_values, integer
from .data import DEFAULT_DATASET, cache_dir, dataset_info, load
from .io import load_verified
from .pretrained import WEIGHTS_DIR

Tensor = torch.Tensor

# The shipped classifier: made by `python scripts/train_classifier.py` (see its meta for the recipe).
CLASSIFIER_FILE = "fashion_mnist_classifier.pt"
CLASSIFIER_SHA256 = "77cf017d3c82d307a7dcb9304c8faf61a830137c67b9f5e9ec93a6462f00e933"

# How far outside [-1, 1] float images may go (rounding in the samplers' last step); they are
# clamped. Further out they are not images in [-1, 1]: 0..255 floats, or unclipped values.
RANGE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- images and features

def as_float_images(images) -> Tensor:
    """Images as a float32 tensor (N, C, H, W) in [-1, 1]. Taught in chapter 7, "Preprocessing
    and the choice of features" (``ch07-preprocessing``).

    Accepts float tensors/arrays in [-1, 1] of shape (N, C, H, W) (values within
    ``RANGE_TOLERANCE`` outside are clamped: samplers can overshoot by rounding), or uint8 in
    0..255 of shape (N, H, W), (N, C, H, W) or, as ``python -m ddpm_lib sample --npy`` writes
    colour images, (N, H, W, 3). Float values further outside [-1, 1], NaN or infinite are
    an error (where :func:`ddpm_lib.checks.check_values` allows the check).
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim == 4 and x.dtype == torch.uint8 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)            # channels last -> (N, 3, H, W)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0)
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8 in 0..255, got dtype {x.dtype}")
    if x.numel() and check_values():
        if not torch.isfinite(x).all():
            raise ValueError("the images contain NaN or infinite values")
        low, high = x.min().item(), x.max().item()
        if not (-1 - RANGE_TOLERANCE <= low and high <= 1 + RANGE_TOLERANCE):
            raise ValueError(
                f"float images must lie in [-1, 1]; these range from {low:.4g} to {high:.4g}. "
                "Pixel values in 0..255: pass them as uint8 (x.to(torch.uint8)) or convert with "
                "x / 127.5 - 1; unclipped samples: clamp them with x.clamp(-1, 1)")
    return x.float().clamp(-1.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (any float tensor or array, any shape) to uint8 in 0..255, same shape
    (values outside [-1, 1] are clipped). Taught in chapter 1, "A garment in the fog", and
    chapter 7, "Preprocessing and the choice of features" (``ch07-preprocessing``)."""
    x = torch.as_tensor(x).detach().cpu()
    if not x.is_floating_point():
        already = " (already uint8: nothing to convert)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"to_uint8 takes float images in [-1, 1], got dtype {x.dtype}{already}")
    if x.isnan().any():
        raise ValueError("the images contain NaN values, which have no uint8 value")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def as_features(feats, name: str = "features") -> Tensor:
    """Features (N, D) as a float64 CPU tensor; NaN or infinite values are an error (``name``
    says whose). Taught in chapter 7, "Every score compares features" (``ch07-features``)."""
    f = torch.as_tensor(feats).detach().cpu().to(torch.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return f


# ----------------------------------------------------------------------------- the classifier

class FashionClassifier(nn.Module):
    """A small CNN for 28x28 grey images: three 3x3 conv blocks (conv, batch norm, ReLU,
    2x2 max pool: 28 -> 14 -> 7 -> 3), a hidden layer of ``feature_dim`` units (the
    features) and a linear layer to ``num_classes`` logits. Taught in chapter 7, "Every score
    compares features" (``ch07-features``).

    ``features(x)``: (B, 1, 28, 28) in [-1, 1] -> (B, feature_dim), after the ReLU.
    ``forward(x)``: -> logits (B, num_classes).
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        self.config = dict(channels=tuple(int(c) for c in channels), feature_dim=int(feature_dim),
                           num_classes=int(num_classes))
        blocks, c_in = [], 1
        for c_out in self.config["channels"]:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*blocks)
        self.hidden = nn.Linear(c_in * 3 * 3, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"the Fashion-MNIST classifier takes grey 28x28 images (N, 1, 28, 28), "
                             f"got {tuple(x.shape)}; for other images use "
                             "extractor=inception_extractor() (and classifier=False in evaluate)")
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return h, self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_classifier(device="cpu", path=None, expected_sha256: str | None = CLASSIFIER_SHA256) -> FashionClassifier:
    """The shipped Fashion-MNIST classifier (or the one saved at ``path``), in eval mode.
    Taught in chapter 7, "Every score compares features" (``ch07-features``).

    The file's sha256 must equal ``expected_sha256`` (the shipped file's, by default; pass
    None to load a file you trained yourself with ``scripts/train_classifier.py``). The file
    is read with ``torch.load(..., weights_only=True)``: a dict with ``state_dict``,
    ``config`` (the constructor's arguments) and ``meta`` (test accuracy, recipe, date),
    which ends up in ``model.meta``.
    """
    path = Path(path) if path is not None else WEIGHTS_DIR / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}; make them with "
                                "`python scripts/train_classifier.py`")
    blob = load_verified(path, expected_sha256, map_location=device, what="classifier weights",
                         remedy="reinstall ddpm_lib, or pass expected_sha256=None to load a "
                                "classifier you trained yourself")
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path} is not a classifier file made by scripts/train_classifier.py")
    model = FashionClassifier(**blob["config"]).to(device)
    model.load_state_dict(blob["state_dict"])
    model.meta = dict(blob.get("meta", {}))
    return model.eval()


@functools.lru_cache(maxsize=4)
def _shipped_classifier(device: str) -> FashionClassifier:
    return load_classifier(device)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def classifier_outputs(images, classifier: nn.Module | None = None, batch_size: int = 500,
                       device=None) -> tuple[Tensor, Tensor]:
    """``(features (N, D), probabilities (N, num_classes))`` of ``classifier`` (default: the
    shipped one) on ``images``, both float64 on the CPU, computed ``batch_size`` at a time.
    Taught in chapter 7, "Every score compares features" (``ch07-features``).

    ``classifier`` needs a ``features_and_logits(x)`` method, as :class:`FashionClassifier` has.
    """
    batch_size = integer("batch_size", batch_size, minimum=1)
    net = _shipped_classifier(str(torch.device(device or "cpu"))) if classifier is None else classifier
    dev = _device_of(net)
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = as_float_images(images[start:start + batch_size]).to(dev)
        h, logits = net.features_and_logits(x)
        feats.append(h.double().cpu())
        probs.append(logits.double().softmax(dim=1).cpu())
    if not feats:
        raise ValueError("no images")
    return torch.cat(feats), torch.cat(probs)


@torch.no_grad()
def extract_features(images, extractor: Callable | None = None, batch_size: int = 500) -> Tensor:
    """Features (N, D), float64 on the CPU, of ``images`` (N, C, H, W) (see the module's
    docstring for the accepted forms), computed ``batch_size`` at a time by ``extractor``
    (default: the shipped classifier's penultimate layer). Taught in chapter 7, "Every score
    compares features" (``ch07-features``)."""
    if extractor is None:
        return classifier_outputs(images, batch_size=batch_size)[0]
    batch_size = integer("batch_size", batch_size, minimum=1)
    feats = [as_features(extractor(as_float_images(images[s:s + batch_size])), "extracted features")
             for s in range(0, len(images), batch_size)]
    if not feats:
        raise ValueError("no images")
    return torch.cat(feats)


_REFERENCE_CACHE: dict = {}


def reference_features(dataset: str = DEFAULT_DATASET, split: str = "train", limit: int | None = None,
                       extractor: Callable | None = None, batch_size: int = 500) -> Tensor:
    """Features (N, D) of a real dataset split (a name of :data:`ddpm_lib.data.DATASETS`; by
    default the 60,000 Fashion-MNIST training images, about 10-20 s on one CPU thread). With
    the default extractor the result is kept in memory, so later calls are free. Taught in
    chapter 7, "Every score compares features" (``ch07-features``)."""
    if extractor is not None:
        return extract_features(load(dataset, split, limit=limit)[0], extractor, batch_size)
    key = (dataset_info(dataset).name, split, limit)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = extract_features(load(dataset, split, limit=limit)[0], None, batch_size)
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------------------- the FID network

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     + FID_INCEPTION_FILE)
INCEPTION_IMPLEMENTATIONS = ("auto", "pytorch-fid", "ddpm_lib")


def _inception_candidates(weights_path) -> list[Path]:
    if weights_path is not None:
        return [Path(weights_path)]
    env = os.environ.get("DDPM_INCEPTION_WEIGHTS")
    return ([Path(env)] if env else []) + [cache_dir() / FID_INCEPTION_FILE,
                                           Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_FILE]


def _avg_pool_3x3(x: Tensor) -> Tensor:
    """The 3x3 average pool of the TensorFlow FID graph: padding not counted in the average."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _inception_a(block, x: Tensor) -> Tensor:
    """torchvision's InceptionA with the pooling of the TensorFlow FID graph."""
    b1 = block.branch1x1(x)
    b5 = block.branch5x5_2(block.branch5x5_1(x))
    b3 = block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x)))
    return torch.cat([b1, b5, b3, block.branch_pool(_avg_pool_3x3(x))], 1)


def _inception_c(block, x: Tensor) -> Tensor:
    b1 = block.branch1x1(x)
    b7 = block.branch7x7_3(block.branch7x7_2(block.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
        bd = getattr(block, f"branch7x7dbl_{i}")(bd)
    return torch.cat([b1, b7, bd, block.branch_pool(_avg_pool_3x3(x))], 1)


def _inception_e(block, x: Tensor, pool: str) -> Tensor:
    b1 = block.branch1x1(x)
    b3 = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1)
    bd = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    bd = torch.cat([block.branch3x3dbl_3a(bd), block.branch3x3dbl_3b(bd)], 1)
    # the last block of the TensorFlow graph max-pools
    pooled = _avg_pool_3x3(x) if pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([b1, b3, bd, block.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The book's port of Inception-v3 as in the TensorFlow graph that defines FID (1008
    classes, average pools that do not count padding, a max pool in the last block), built
    from torchvision's modules. Input (B, 3, 299, 299) in [-1, 1]; output the 2048 pooled
    features (B, 2048). Taught in chapter 7, "A classifier's features are not Inception's"
    (``ch07-inception``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(n, name)(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = _inception_a(getattr(n, name), x)
        x = n.Mixed_6a(x)
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = _inception_c(getattr(n, name), x)
        x = n.Mixed_7a(x)
        x = _inception_e(n.Mixed_7c, _inception_e(n.Mixed_7b, x, "avg"), "max")
        return x.mean(dim=(2, 3))


def build_fid_inception(state_dict: dict | None = None) -> FIDInception:
    """The book's FID Inception network (needs torchvision); with ``state_dict`` None its
    weights are random. Taught in chapter 7, "A classifier's features are not Inception's"
    (``ch07-inception``)."""
    try:
        import torchvision
    except ImportError as e:
        raise ImportError("the FID Inception network is built from torchvision's Inception-v3: "
                          "`pip install torchvision` (Colab has it)") from e
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=False, transform_input=False)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return FIDInception(net).eval()


def build_pytorch_fid_inception(state_dict: dict) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` ((B, 3, 299, 299) in [-1, 1] -> 2048 pooled features) with
    the weights ``state_dict``, handed to its loader (which would download them) while it is
    built. Needs the ``fid`` extra (``pip install "ddpm_lib[fid]"``). Taught in chapter 7,
    "A classifier's features are not Inception's" (``ch07-inception``)."""
    try:
        from pytorch_fid import inception as pytorch_fid
    except ImportError as e:
        raise ImportError('pytorch-fid is not installed: `pip install "ddpm_lib[fid]"` (or '
                          "pytorch-fid), or pass implementation=\"ddpm_lib\"") from e
    with mock.patch.object(pytorch_fid, "load_state_dict_from_url", lambda *args, **kw: state_dict):
        net = pytorch_fid.InceptionV3([3], resize_input=False, normalize_input=False)
    # its forward() passes x through these blocks (the last ends in the pool) and returns a list
    return nn.Sequential(*net.blocks, nn.Flatten()).eval()


def inception_extractor(weights_path=None, device=None, download: bool = False,
                        implementation: str = "auto") -> Callable[[Tensor], Tensor]:
    """The standard FID feature extractor: images (B, C, H, W) in [-1, 1] (or uint8) -> (B, 2048).
    Taught in chapter 7, "A classifier's features are not Inception's" (``ch07-inception``).

    Preprocessing as in FID: grey images are repeated to 3 channels, resized to 299 x 299
    (bilinear, as pytorch-fid does; TensorFlow's resize differs slightly), and kept in
    [-1, 1], the range the TensorFlow Inception expects.

    The network (``extract.network``; ``extract.implementation`` names it): with the default
    ``implementation="auto"``, pytorch-fid's ``InceptionV3`` when pytorch-fid is installed
    (the ``fid`` extra), else the book's port :class:`FIDInception`, which the tests check
    against it; ``"pytorch-fid"`` or ``"ddpm_lib"`` pick one. Both need torchvision.

    The weights, the TensorFlow FID Inception ported by pytorch-fid (``FID_INCEPTION_FILE``,
    91 MB), are looked for at ``weights_path``, else ``$DDPM_INCEPTION_WEIGHTS``,
    ``~/.cache/ddpm_lib/`` and torch hub's checkpoint folder. Nothing is downloaded unless
    ``download=True`` (then into ``~/.cache/ddpm_lib/``).
    """
    if implementation not in INCEPTION_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {INCEPTION_IMPLEMENTATIONS}, got {implementation!r}")
    candidates = _inception_candidates(weights_path)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if not download:
            raise FileNotFoundError(
                "the FID Inception weights were not found; looked at:\n    "
                + "\n    ".join(str(p) for p in candidates)
                + f"\nTo get them (91 MB), either call inception_extractor(download=True) (online, e.g. in "
                  f"Colab), or download\n    {FID_INCEPTION_URL}\nyourself and pass its path as weights_path "
                  "(or set DDPM_INCEPTION_WEIGHTS to it). torchvision is needed too.")
        path = cache_dir() / FID_INCEPTION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_INCEPTION_URL, str(path))
    if implementation == "auto":
        implementation = "pytorch-fid" if importlib.util.find_spec("pytorch_fid") else "ddpm_lib"
    build = build_pytorch_fid_inception if implementation == "pytorch-fid" else build_fid_inception
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = build(torch.load(path, map_location="cpu", weights_only=True)).to(device)

    @torch.no_grad()
    def extract(images) -> Tensor:
        x = as_float_images(images).to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return network(x).double().cpu()

    extract.network, extract.implementation = network, implementation
    return extract
