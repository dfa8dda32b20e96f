"""Scores for generated images: Frechet distance (FID-style) with a pluggable feature
extractor, KID, precision and recall, class statistics, and a memorisation check.

Every score compares two sets of images through *features*: an extractor maps images to
vectors, and the score compares the two clouds of vectors.

* The default extractor is a small Fashion-MNIST classifier that ships with the package
  (:class:`FashionClassifier`, :func:`load_classifier`): its penultimate layer gives 128
  features per image and its last layer class probabilities. It runs in seconds on a CPU,
  so the book can score samples anywhere. Scores computed with it are "FID-style": they
  rank models and compare with themselves, not with the FID numbers in papers.
* :func:`inception_extractor` builds the standard FID network (Inception-v3 with the
  weights ported from TensorFlow; Heusel et al. 2017), when torchvision and its weights
  file are there; passed as ``extractor=``, the same :func:`fid` is the usual FID.
* Any callable ``images (B, C, H, W) float in [-1, 1] -> features (B, D)`` works too.

Images: float tensors (N, C, H, W) in [-1, 1], as the samplers return them (values up to
1e-3 outside are clamped; further out is an error: pixel values 0..255 must be uint8), or
uint8 in 0..255 of shape (N, H, W) or (N, C, H, W) (what ``python -m ddpm_lib sample
--npy`` writes); NumPy arrays are accepted as well. Features: (N, D) tensors or arrays; the
statistics are computed in float64.

The scores (names as in the papers):

* :func:`frechet_distance`: ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the
  Frechet (2-Wasserstein) distance between Gaussians fitted to the two sets of features
  (Heusel et al. 2017). Lower is better. It is biased upwards for small N: compare scores
  at the same N only, and against :func:`real_floor` at that N.
* :func:`kid`: the kernel inception distance, an unbiased estimate of the squared MMD with
  the kernel ``k(x, y) = (x.y / d + 1)^3`` (Binkowski et al. 2018), averaged over subsets.
* :func:`precision_recall`: the share of samples that fall on the real data's manifold,
  and of real images that fall on the samples' one, each manifold a union of balls around
  its points with the distance to the k-th nearest neighbour as radius (Kynkaanniemi et
  al. 2019). Precision measures fidelity, recall diversity.
* :func:`class_histogram_entropy`: how the classifier spreads the samples over the ten
  classes (entropy in nats; log 10 = 2.303 is uniform) and how sure it is (mean max
  probability). :func:`classifier_accuracy` for class-conditional samples.
* :func:`nearest_neighbours`: the training images closest to each sample (memorisation).

:func:`evaluate` computes all of them at once; :func:`real_floor` gives what real held-out
images score against the same reference, the best a generator can hope for at that N::

    from ddpm_lib import metrics
    ref = metrics.reference_features()                 # the 60,000 training images (cached)
    scores = metrics.evaluate(samples, real_features=ref)
    floor = metrics.real_floor(len(samples), real_features=ref)
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_values, integer, integer_dtype
from .data import cache_dir, load
from .io import load_verified
from .pretrained import WEIGHTS_DIR

Tensor = torch.Tensor

# The shipped classifier: made by `python scripts/train_classifier.py` (see its meta for the recipe).
CLASSIFIER_FILE = "fashion_mnist_classifier.pt"
CLASSIFIER_SHA256 = "77cf017d3c82d307a7dcb9304c8faf61a830137c67b9f5e9ec93a6462f00e933"


# ----------------------------------------------------------------------------- images

# How far outside [-1, 1] float images may go (rounding in the samplers' last step); they are
# clamped. Further out they are not images in [-1, 1]: 0..255 floats, or unclipped values.
RANGE_TOLERANCE = 1e-3


def as_float_images(images) -> Tensor:
    """Images as a float32 tensor (N, C, H, W) in [-1, 1].

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


def _as_features(feats, name: str = "features") -> Tensor:
    f = torch.as_tensor(feats).detach().cpu().to(torch.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return f


def _feature_pair(feats_a, feats_b, names=("feats_a", "feats_b")) -> tuple[Tensor, Tensor]:
    """Two sets of features (N_a, D), (N_b, D) as float64 tensors, with the same D."""
    fa, fb = _as_features(feats_a, names[0]), _as_features(feats_b, names[1])
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {names[0]} has {fa.shape[1]}, {names[1]} "
                         f"{fb.shape[1]} (both sets must come from the same extractor)")
    return fa, fb


# ----------------------------------------------------------------------------- the classifier

class FashionClassifier(nn.Module):
    """A small CNN for 28x28 grey images: three 3x3 conv blocks (conv, batch norm, ReLU,
    2x2 max pool: 28 -> 14 -> 7 -> 3), a hidden layer of ``feature_dim`` units (the
    features) and a linear layer to ``num_classes`` logits.

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


def _classifier(classifier, device=None) -> nn.Module:
    if classifier is None:
        return _shipped_classifier(str(torch.device(device or "cpu")))
    return classifier


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def classifier_outputs(images, classifier: nn.Module | None = None, batch_size: int = 500,
                       device=None) -> tuple[Tensor, Tensor]:
    """``(features (N, D), probabilities (N, num_classes))`` of ``classifier`` (default: the
    shipped one) on ``images``, both float64 on the CPU, computed ``batch_size`` at a time.

    ``classifier`` needs a ``features_and_logits(x)`` method, as :class:`FashionClassifier` has.
    """
    batch_size = integer("batch_size", batch_size, minimum=1)
    net = _classifier(classifier, device)
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
    (default: the shipped classifier's penultimate layer)."""
    if extractor is None:
        return classifier_outputs(images, batch_size=batch_size)[0]
    batch_size = integer("batch_size", batch_size, minimum=1)
    feats = [_as_features(extractor(as_float_images(images[s:s + batch_size])), "extracted features")
             for s in range(0, len(images), batch_size)]
    if not feats:
        raise ValueError("no images")
    return torch.cat(feats)


_REFERENCE_CACHE: dict = {}


def reference_features(dataset: str = "fashion_mnist", split: str = "train", limit: int | None = None,
                       extractor: Callable | None = None, batch_size: int = 500) -> Tensor:
    """Features (N, D) of a real dataset split (by default the 60,000 Fashion-MNIST training
    images, about 10-20 s on one CPU thread). With the default extractor the result is kept
    in memory, so later calls are free."""
    if extractor is not None:
        return extract_features(load(dataset, split, limit=limit)[0], extractor, batch_size)
    key = (dataset, split, limit)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = extract_features(load(dataset, split, limit=limit)[0], None, batch_size)
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------------------- Frechet distance

def feature_statistics(feats) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) (unbiased, divided by N - 1) of features (N, D), float64."""
    f = _as_features(feats)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu, sigma


def _nonnegative(eigvals: Tensor, what: str) -> Tensor:
    """Eigenvalues of a positive semi-definite matrix, with the rounding noise below 0 set to 0;
    an error if some are clearly negative (the matrix is not a covariance)."""
    scale = float(eigvals.abs().max()) if eigvals.numel() else 0.0
    if eigvals.numel() and float(eigvals.min()) < -1e-8 * max(scale, 1e-300):
        raise ValueError(f"{what} is not positive semi-definite: eigenvalue {float(eigvals.min()):.3g} "
                         f"(largest {scale:.3g})")
    return eigvals.clamp(min=0)


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, by eigen-decomposition."""
    eigvals, eigvecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (eigvecs * _nonnegative(eigvals, "sigma1").sqrt()) @ eigvecs.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """``Tr((S1 S2)^(1/2))`` for symmetric positive semi-definite S1, S2 (D, D).

    S1 S2 is not symmetric, but it is similar to ``S1^(1/2) S2 S1^(1/2)``, which is symmetric
    positive semi-definite: the two have the same eigenvalues, all real and >= 0, and the
    trace of the square root is the sum of their square roots. Computing it this way (in
    float64) needs no complex arithmetic: ``scipy.linalg.sqrtm(S1 @ S2)`` returns complex
    matrices whose imaginary parts are rounding noise that must be thrown away; here the
    only rounding left is eigenvalues of order -1e-15 relative to the largest, which are set
    to zero (a rank-deficient covariance, N <= D, has such zero eigenvalues). A clearly
    negative eigenvalue (below -1e-8 times the largest) means an input is not a covariance
    matrix: that is an error, not something to round away.
    """
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigvals = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return float(_nonnegative(eigvals, "sigma1^(1/2) sigma2 sigma1^(1/2)").sqrt().sum())


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)::

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    mu (D,), sigma (D, D); computed in float64. (FID is this with Inception features.)
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != sigma2.shape \
            or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    if not all(torch.isfinite(v).all() for v in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("the statistics contain NaN or infinite values")
    mean_term = float(((mu1 - mu2) ** 2).sum())
    trace_term = float(torch.trace(sigma1) + torch.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # rounding can make the distance of a set to itself -1e-13: it is a squared distance
    return max(mean_term + trace_term, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to features (N_a, D) and (N_b, D)."""
    fa, fb = _feature_pair(feats_a, feats_b)
    return frechet_distance_from_statistics(*feature_statistics(fa), *feature_statistics(fb))


def fid(images_a, images_b, extractor: Callable | None = None, batch_size: int = 500) -> float:
    """Frechet distance between the features of two image sets (N_a, C, H, W), (N_b, C, H, W).

    With ``extractor=None`` the features are the shipped classifier's (a FID-style score for
    Fashion-MNIST); with ``extractor=inception_extractor()`` it is the usual FID. To compare
    many sample sets with one large reference, compute the reference's features once
    (:func:`reference_features`) and call :func:`frechet_distance` instead.
    """
    return frechet_distance(extract_features(images_a, extractor, batch_size),
                            extract_features(images_b, extractor, batch_size))


# ----------------------------------------------------------------------------- the FID network

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     + FID_INCEPTION_FILE)


def _inception_candidates(weights_path) -> list[Path]:
    if weights_path is not None:
        return [Path(weights_path)]
    found = []
    if os.environ.get("DDPM_INCEPTION_WEIGHTS"):
        found.append(Path(os.environ["DDPM_INCEPTION_WEIGHTS"]))
    found.append(cache_dir() / FID_INCEPTION_FILE)
    found.append(Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_FILE)
    return found


def _inception_a(block, x: Tensor) -> Tensor:
    """torchvision's InceptionA with the pooling of the TensorFlow FID graph (padding not
    counted in the 3x3 average)."""
    b1 = block.branch1x1(x)
    b5 = block.branch5x5_2(block.branch5x5_1(x))
    b3 = block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x)))
    bp = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b5, b3, bp], 1)


def _inception_c(block, x: Tensor) -> Tensor:
    b1 = block.branch1x1(x)
    b7 = block.branch7x7_3(block.branch7x7_2(block.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
        bd = getattr(block, f"branch7x7dbl_{i}")(bd)
    bp = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b7, bd, bp], 1)


def _inception_e(block, x: Tensor, pool: str) -> Tensor:
    b1 = block.branch1x1(x)
    b3 = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1)
    bd = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    bd = torch.cat([block.branch3x3dbl_3a(bd), block.branch3x3dbl_3b(bd)], 1)
    if pool == "avg":
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    else:  # the last block of the TensorFlow graph max-pools
        pooled = F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([b1, b3, bd, block.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 as in the TensorFlow graph that defines FID (1008 classes, average pools
    that do not count padding, a max pool in the last block), built from torchvision's
    modules. Input (B, 3, 299, 299) in [-1, 1]; output the 2048 pooled features (B, 2048)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(n, name)(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = _inception_a(getattr(n, name), x)
        x = n.Mixed_6a(x)
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = _inception_c(getattr(n, name), x)
        x = n.Mixed_7a(x)
        x = _inception_e(n.Mixed_7b, x, "avg")
        x = _inception_e(n.Mixed_7c, x, "max")
        return x.mean(dim=(2, 3))


def build_fid_inception(state_dict: dict | None = None) -> FIDInception:
    """The FID Inception network (needs torchvision); with ``state_dict`` None its weights are random."""
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


def inception_extractor(weights_path=None, device=None, download: bool = False) -> Callable[[Tensor], Tensor]:
    """The standard FID feature extractor: images (B, C, H, W) in [-1, 1] (or uint8) -> (B, 2048).

    Preprocessing as in FID: grey images are repeated to 3 channels, resized to 299 x 299
    (bilinear, as pytorch-fid does; TensorFlow's resize differs slightly), and kept in
    [-1, 1], the range the TensorFlow Inception expects.

    The weights are the TensorFlow FID Inception ported to PyTorch by the pytorch-fid
    project (``pt_inception-2015-12-05-6726825d.pth``, 91 MB). They are looked for at
    ``weights_path``, else at ``$DDPM_INCEPTION_WEIGHTS``, ``~/.cache/ddpm_lib/`` and torch
    hub's checkpoint folder. Nothing is downloaded unless ``download=True`` (then into
    ``~/.cache/ddpm_lib/``). Needs torchvision.
    """
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
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = build_fid_inception(torch.load(path, map_location="cpu", weights_only=True)).to(device)

    @torch.no_grad()
    def extract(images) -> Tensor:
        x = as_float_images(images).to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return network(x).double().cpu()

    extract.network = network
    return extract


# ----------------------------------------------------------------------------- KID

def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``k(x, y) = (x.y / d + 1)^3`` for rows of x (M, d) and y (N, d): an (M, N) matrix."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased estimate of MMD^2 between the distributions of rows of x (m, d) and y (n, d)::

        1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)
    """
    m, n = len(x), len(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or m < 2 or n < 2:
        raise ValueError(f"need x (m, d) and y (n, d) with m, n >= 2, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.mean())


class KID(NamedTuple):
    mean: float
    std: float


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel inception distance (Binkowski et al. 2018): :func:`mmd2_unbiased` with the cubic
    polynomial kernel on ``subsets`` random subsets of ``subset_size`` rows (without
    replacement; fewer if a set is smaller) of features (N_a, D) and (N_b, D).

    Returns ``KID(mean, std)`` over the subsets. Unbiased: about 0 (possibly slightly
    negative) for two samples of the same distribution, at any N.
    """
    subsets = integer("subsets", subsets, minimum=1)
    subset_size = integer("subset_size", subset_size, minimum=2)
    fa, fb = _feature_pair(feats_a, feats_b)
    m = min(subset_size, len(fa), len(fb))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([mmd2_unbiased(fa[torch.randperm(len(fa), generator=gen)[:m]],
                                         fb[torch.randperm(len(fb), generator=gen)[:m]])
                           for _ in range(subsets)], dtype=torch.float64)
    return KID(float(values.mean()), float(values.std()) if subsets > 1 else 0.0)


# ----------------------------------------------------------------------------- precision and recall

def _chunked_distances(a: Tensor, b: Tensor, chunk_size: int):
    """Yield (start, distances (c, N_b)) for chunks of rows of a (N_a, D) against b (N_b, D)."""
    for start in range(0, len(a), chunk_size):
        yield start, torch.cdist(a[start:start + chunk_size], b)


def knn_radii(feats, k: int = 3, chunk_size: int = 1000) -> Tensor:
    """Distance from each row of feats (N, D) to its k-th nearest other row: (N,), float64."""
    f = _as_features(feats)
    chunk_size = integer("chunk_size", chunk_size, minimum=1)
    if not 1 <= integer("k", k) < len(f):
        raise ValueError(f"k must be in 1..N-1 = {len(f) - 1}, got {k}")
    radii = torch.empty(len(f), dtype=torch.float64)
    for start, d in _chunked_distances(f, f, chunk_size):
        # the k+1 smallest include the point itself, at distance 0
        radii[start:start + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _manifold_coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int) -> float:
    """Share of ``points`` inside at least one ball ``||x - centre_i|| <= radius_i``."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for start, d in _chunked_distances(points, centres, chunk_size):
        inside[start:start + len(d)] = (d <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def precision_recall(real_feats, fake_feats, k: int = 3, chunk_size: int = 1000) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features (N_real, D), (N_fake, D).

    Each set's manifold is the union of balls around its points, of radius the distance to
    the point's k-th nearest neighbour in the same set. Precision = share of fake points
    inside the real manifold; recall = share of real points inside the fake manifold. Both
    depend on N and k: compare at equal sizes (the paper uses equal N for both sets).
    """
    real, fake = _feature_pair(real_feats, fake_feats, ("real_feats", "fake_feats"))
    precision = _manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = _manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return PrecisionRecall(precision, recall)


# ----------------------------------------------------------------------------- classes

def histogram_entropy(histogram) -> float:
    """Entropy in nats of a histogram (counts or probabilities, (C,)): log C when uniform."""
    h = torch.as_tensor(histogram, dtype=torch.float64)
    if h.ndim != 1 or not torch.isfinite(h).all() or (h < 0).any() or not h.sum() > 0:
        raise ValueError("a histogram is a 1-D sequence of counts >= 0 with a positive total, "
                         f"got {h.tolist()}")
    p = h / h.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def class_histogram_entropy(images, classifier: nn.Module | None = None, batch_size: int = 500) -> dict:
    """How the classifier (default: the shipped one) sees ``images`` (N, 1, 28, 28).

    Returns a dict: ``counts`` (C,) of predicted classes, ``histogram`` (C,) their shares,
    ``entropy`` of the histogram in nats (log 10 = 2.303 when the ten classes are equally
    frequent, as in the real data; low when the model collapses onto a few classes), and
    ``confidence``, the mean max-probability (low when samples look like no class).
    """
    _, probs = classifier_outputs(images, classifier, batch_size)
    return _class_summary(probs)


def _class_summary(probs: Tensor) -> dict:
    counts = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    return dict(counts=counts, histogram=counts.double() / counts.sum(), entropy=histogram_entropy(counts),
                confidence=float(probs.max(dim=1).values.mean()))


def classifier_accuracy(images, labels, classifier: nn.Module | None = None, batch_size: int = 500) -> float:
    """Share of ``images`` (N, 1, 28, 28) whose predicted class is ``labels`` (N,): for
    class-conditional samples, how often they show the class they were asked for."""
    _, probs = classifier_outputs(images, classifier, batch_size)
    labels = torch.as_tensor(labels).cpu()
    integer_dtype("labels", labels, "; convert them with labels.long()")
    labels = labels.long()
    if labels.shape != (len(probs),):
        raise ValueError(f"labels must have shape ({len(probs)},), got {tuple(labels.shape)}")
    return float((probs.argmax(dim=1) == labels).double().mean())


# ----------------------------------------------------------------------------- memorisation

def _knn_search(queries: Tensor, reference, k: int, chunk_size: int, prepare) -> tuple[Tensor, Tensor]:
    """k nearest rows of ``prepare(reference[j:j+chunk])`` for each row of queries (N, D).

    Candidates come from float32 ``|q|^2 + |r|^2 - 2 q.r`` one chunk of the reference at a
    time (memory N x chunk_size); the distances returned are recomputed exactly in float64.
    """
    width = prepare(reference[:1]).shape[1]
    if queries.shape[1] != width:
        raise ValueError(f"the queries have {queries.shape[1]} values each but the reference rows "
                         f"{width}: they must be the same kind of image (or feature)")
    q32 = queries.float()
    q_norm = (q32 ** 2).sum(1, keepdim=True)
    best_d2 = torch.full((len(q32), 0), math.inf)
    best_idx = torch.zeros((len(q32), 0), dtype=torch.long)
    for start in range(0, len(reference), chunk_size):
        r = prepare(reference[start:start + chunk_size]).float()
        d2 = q_norm + (r ** 2).sum(1)[None, :] - 2.0 * q32 @ r.T
        d2 = torch.cat([best_d2, d2], dim=1)
        idx = torch.cat([best_idx, torch.arange(start, start + len(r)).expand(len(q32), -1)], dim=1)
        best_d2, pos = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
        best_idx = idx.gather(1, pos)
    if best_idx.shape[1] < k:
        raise ValueError(f"k = {k} but the reference has only {best_idx.shape[1]} rows")
    # exact distances of the candidates, then sorted by them
    rows = best_idx.numpy() if isinstance(reference, np.ndarray) else best_idx
    nearest = torch.stack([prepare(reference[rows[:, j]]).double() for j in range(k)], dim=1)
    dist = (queries.double()[:, None, :] - nearest).norm(dim=2)
    dist, order = dist.sort(dim=1)
    return dist, best_idx.gather(1, order)


def nearest_neighbours(samples, train_images, k: int = 1, extractor: Callable | None = None,
                       train_features=None, chunk_size: int = 5000, batch_size: int = 500) -> dict:
    """The k training images nearest to each sample: a check for memorisation.

    ``samples`` (N, C, H, W), ``train_images`` (M, C, H, W) (images as in the module's
    docstring). Returns a dict with ``distances`` (N, k), Euclidean in pixel space with
    pixels in [-1, 1], sorted, and ``indices`` (N, k) into ``train_images``: show
    ``train_images[indices[i, 0]]`` next to ``samples[i]``. With an ``extractor`` (or
    ``train_features`` (M, D) computed by the default one) it also returns
    ``feature_distances`` and ``feature_indices`` in feature space.

    The training set is scanned ``chunk_size`` images at a time (1,000 samples x 60,000
    training images needs about 100 MB). To judge the distances, compute the same for real
    held-out images: samples much closer to the training set than those are copies.
    """
    k = integer("k", k, minimum=1)
    chunk_size = integer("chunk_size", chunk_size, minimum=1)
    queries = as_float_images(samples).flatten(1).cpu()
    dist, idx = _knn_search(queries, train_images, k, chunk_size,
                            lambda im: as_float_images(im).flatten(1).cpu())
    result = dict(distances=dist, indices=idx)
    if extractor is not None or train_features is not None:
        query_feats = extract_features(samples, extractor, batch_size)
        if train_features is None:
            train_features = extract_features(train_images, extractor, batch_size)
        train_features = _as_features(train_features, "train_features")
        if len(train_features) != len(train_images):
            raise ValueError(f"train_features has {len(train_features)} rows but train_images "
                             f"{len(train_images)}: they must describe the same images, in order")
        f_dist, f_idx = _knn_search(query_feats, train_features, k, chunk_size, lambda f: f)
        result.update(feature_distances=f_dist, feature_indices=f_idx)
    return result


# ----------------------------------------------------------------------------- everything at once

def evaluate(samples, real=None, *, real_features=None, extractor: Callable | None = None,
             classifier: nn.Module | None | bool = None, k: int = 3, kid_subsets: int = 100,
             kid_subset_size: int = 1000, batch_size: int = 500, seed: int = 0) -> dict:
    """All scores of ``samples`` (N, C, H, W) against a reference of real images.

    The reference: ``real`` images (M, C, H, W), or their ``real_features`` (M, D) computed by
    the same extractor (for instance :func:`reference_features`, the training set's). The
    features come from ``extractor`` (default: the shipped classifier). Returns a dict:

    * ``fid``: Frechet distance of the features (FID-style with the default extractor);
    * ``kid``, ``kid_std``: :func:`kid` (subsets of ``kid_subset_size``);
    * ``precision``, ``recall``: :func:`precision_recall` with ``k``, against N reference
      points drawn at random (seeded), so both sets have the same size, as in the paper;
    * ``entropy``, ``confidence``: :func:`class_histogram_entropy` of the samples, by
      ``classifier`` (default: the shipped one; ``False`` skips them, e.g. for CIFAR-10);
    * ``n``, ``n_real``: the sizes.
    """
    if (real is None) == (real_features is None):
        raise ValueError("give the reference as either real images or real_features")
    probs = None
    if extractor is None and classifier is None:
        fake, probs = classifier_outputs(samples, batch_size=batch_size)
    else:
        fake = extract_features(samples, extractor, batch_size)
    ref = extract_features(real, extractor, batch_size) if real_features is None else real_features
    ref, fake = _feature_pair(ref, fake, ("the reference features", "the samples' features"))
    kid_value = kid(ref, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ref_subset = ref[torch.randperm(len(ref), generator=gen)[:len(fake)]]
    pr = precision_recall(ref_subset, fake, k=k)
    scores = dict(n=len(fake), n_real=len(ref), fid=frechet_distance(ref, fake), kid=kid_value.mean,
                  kid_std=kid_value.std, precision=pr.precision, recall=pr.recall, entropy=None, confidence=None)
    if classifier is not False:
        if probs is None:
            probs = classifier_outputs(samples, classifier, batch_size)[1]
        summary = _class_summary(probs)
        scores.update(entropy=summary["entropy"], confidence=summary["confidence"])
    return scores


def real_floor(n: int, *, dataset: str = "fashion_mnist", split: str = "test", reference_split: str = "train",
               real_features=None, extractor: Callable | None = None, seed: int = 0, **evaluate_kwargs) -> dict:
    """The scores of ``n`` real held-out images (drawn at random, seeded, from ``split``)
    against the reference (default: the training split's features), by :func:`evaluate`.

    This is the floor a perfect generator reaches with ``n`` samples: the Frechet distance
    is biased upwards at small n, so a model's score means something only next to the
    floor at the same n (and the same reference and extractor). At small n the floor also
    varies from draw to draw (with the shipped classifier and n = 500, the Frechet distance
    of three draws ranged from 2.5 to 4.5): vary ``seed`` to see by how much.
    """
    images, _ = load(dataset, split)
    if not 2 <= integer("n", n) <= len(images):
        raise ValueError(f"n must be in 2..{len(images)} (the {split} split), got {n}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    if real_features is None:
        real_features = reference_features(dataset, reference_split, extractor=extractor)
    return evaluate(images[idx], real_features=real_features, extractor=extractor, seed=seed, **evaluate_kwargs)
