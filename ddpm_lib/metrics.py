"""Scores for generated images: the Frechet distance (FID-style, or FID with Inception
features), KID, precision and recall, class statistics, a memorisation check. Taught in
chapter 7, "Evaluating samples", a section each (``ch07-frechet`` ... ``ch07-memorisation``).
Every score compares two sets of images through features (:mod:`ddpm_lib.features` says which
images and extractors it takes): by default the shipped Fashion-MNIST classifier's (a
"FID-style" Frechet distance); ``extractor=features.inception_extractor()`` gives the usual FID.
The distances are biased upwards at small N: compare at the same N, next to :func:`real_floor`,
what real held-out images score. :func:`evaluate` computes all the scores at once::

    from ddpm_lib import features, metrics
    ref = features.reference_features()                # the 60,000 training images (cached)
    scores = metrics.evaluate(samples, real_features=ref)
    floor = metrics.real_floor(len(samples), real_features=ref)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from . import features
from .checks import integer, integer_dtype
from .data import DEFAULT_DATASET, load

Tensor = torch.Tensor


def _feature_pair(feats_a, feats_b, names=("feats_a", "feats_b")) -> tuple[Tensor, Tensor]:
    """Two sets of features (N_a, D), (N_b, D) as float64 tensors, with the same D."""
    fa, fb = features.as_features(feats_a, names[0]), features.as_features(feats_b, names[1])
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {names[0]} has {fa.shape[1]}, {names[1]} "
                         f"{fb.shape[1]} (both sets must come from the same extractor)")
    return fa, fb


# ----------------------------------------------------------------------------- Frechet distance

def feature_statistics(feats) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) (unbiased, divided by N - 1) of features (N, D), float64.
    Taught in chapter 7, "The Fréchet distance" (``ch07-frechet``)."""
    f = features.as_features(feats)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    mu = f.mean(dim=0)
    return mu, (f - mu).T @ (f - mu) / (len(f) - 1)


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
    """``Tr((S1 S2)^(1/2))`` for symmetric positive semi-definite S1, S2 (D, D). Taught in
    chapter 7, "The Fréchet distance" (``ch07-frechet``).

    S1 S2 is similar to the symmetric positive semi-definite ``S1^(1/2) S2 S1^(1/2)``: the
    same eigenvalues, all real and >= 0, so the trace is the sum of their square roots, in
    float64 and with no complex arithmetic (``scipy.linalg.sqrtm(S1 @ S2)`` returns imaginary
    rounding noise to throw away). Eigenvalues of order -1e-15 relative to the largest (a
    rank-deficient covariance, N <= D) are set to zero; one below -1e-8 times the largest
    means an input is not a covariance matrix: an error, not something to round away.
    """
    root1 = _psd_sqrt(torch.as_tensor(sigma1, dtype=torch.float64))
    middle = root1 @ torch.as_tensor(sigma2, dtype=torch.float64) @ root1
    eigvals = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return float(_nonnegative(eigvals, "sigma1^(1/2) sigma2 sigma1^(1/2)").sqrt().sum())


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)::

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    mu (D,), sigma (D, D); computed in float64. (FID is this with Inception features.)
    Taught in chapter 7, "The Fréchet distance" (``ch07-frechet``).
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
    """Frechet distance between Gaussians fitted to features (N_a, D) and (N_b, D).
    Taught in chapter 7, "The Fréchet distance" (``ch07-frechet``)."""
    fa, fb = _feature_pair(feats_a, feats_b)
    return frechet_distance_from_statistics(*feature_statistics(fa), *feature_statistics(fb))


def fid(images_a, images_b, extractor: Callable | None = None, batch_size: int = 500) -> float:
    """Frechet distance between the features of two image sets (N_a, C, H, W), (N_b, C, H, W).
    Taught in chapter 7, "The Fréchet distance" (``ch07-frechet``).

    With ``extractor=None`` the features are the shipped classifier's (a FID-style score for
    Fashion-MNIST); with ``extractor=features.inception_extractor()`` it is the usual FID. To
    compare many sample sets with one reference, compute its features once
    (:func:`ddpm_lib.features.reference_features`) and call :func:`frechet_distance` instead.
    """
    return frechet_distance(features.extract_features(images_a, extractor, batch_size),
                            features.extract_features(images_b, extractor, batch_size))


# ----------------------------------------------------------------------------- KID

def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``k(x, y) = (x.y / d + 1)^3`` for rows of x (M, d) and y (N, d): an (M, N) matrix.
    Taught in chapter 7, "KID: an unbiased alternative" (``ch07-kid``)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased estimate of MMD^2 between the distributions of rows of x (m, d) and y (n, d).
    Taught in chapter 7, "KID: an unbiased alternative" (``ch07-kid``)::

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
    """What :func:`kid` returns. Taught in chapter 7, "KID: an unbiased alternative" (``ch07-kid``)."""
    mean: float
    std: float


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel inception distance (Binkowski et al. 2018): :func:`mmd2_unbiased` with the cubic
    polynomial kernel on ``subsets`` random subsets of ``subset_size`` rows (without
    replacement; fewer if a set is smaller) of features (N_a, D) and (N_b, D). Returns
    ``KID(mean, std)`` over the subsets. Unbiased: about 0 (possibly slightly negative) for
    two samples of the same distribution, at any N. Taught in chapter 7, "KID: an unbiased
    alternative" (``ch07-kid``).
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
    """Distance from each row of feats (N, D) to its k-th nearest other row: (N,), float64.
    Taught in chapter 7, "Precision and recall" (``ch07-precision-recall``)."""
    f = features.as_features(feats)
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
    """What :func:`precision_recall` returns. Taught in chapter 7, "Precision and recall"."""
    precision: float
    recall: float


def precision_recall(real_feats, fake_feats, k: int = 3, chunk_size: int = 1000) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features (N_real, D), (N_fake, D).

    Each set's manifold is the union of balls around its points, of radius the distance to
    the point's k-th nearest neighbour in the same set. Precision = share of fake points
    inside the real manifold; recall = share of real points inside the fake manifold. Both
    depend on N and k: compare at equal sizes (the paper uses equal N for both sets).
    Taught in chapter 7, "Precision and recall" (``ch07-precision-recall``).
    """
    real, fake = _feature_pair(real_feats, fake_feats, ("real_feats", "fake_feats"))
    precision = _manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = _manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return PrecisionRecall(precision, recall)


# ----------------------------------------------------------------------------- classes

def histogram_entropy(histogram) -> float:
    """Entropy in nats of a histogram (counts or probabilities, (C,)): log C when uniform.
    Taught in chapter 7, "Mode coverage through the classifier" (``ch07-classes``)."""
    h = torch.as_tensor(histogram, dtype=torch.float64)
    if h.ndim != 1 or not torch.isfinite(h).all() or (h < 0).any() or not h.sum() > 0:
        raise ValueError("a histogram is a 1-D sequence of counts >= 0 with a positive total, "
                         f"got {h.tolist()}")
    p = (h / h.sum())[h > 0]
    return float(-(p * p.log()).sum())


def class_histogram_entropy(images, classifier: nn.Module | None = None, batch_size: int = 500) -> dict:
    """How the classifier (default: the shipped one) sees ``images`` (N, 1, 28, 28).
    Taught in chapter 7, "Mode coverage through the classifier" (``ch07-classes``).

    Returns a dict: ``counts`` (C,) of predicted classes, ``histogram`` (C,) their shares,
    ``entropy`` of the histogram in nats (log 10 = 2.303 when the ten classes are equally
    frequent, as in the real data; low when the model collapses onto a few classes), and
    ``confidence``, the mean max-probability (low when samples look like no class).
    """
    _, probs = features.classifier_outputs(images, classifier, batch_size)
    return _class_summary(probs)


def _class_summary(probs: Tensor) -> dict:
    counts = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
    return dict(counts=counts, histogram=counts.double() / counts.sum(), entropy=histogram_entropy(counts),
                confidence=float(probs.max(dim=1).values.mean()))


def classifier_accuracy(images, labels, classifier: nn.Module | None = None, batch_size: int = 500) -> float:
    """Share of ``images`` (N, 1, 28, 28) whose predicted class is ``labels`` (N,): for
    class-conditional samples, how often they show the class they were asked for. Taught in
    chapter 7, "Every score compares features" (``ch07-features``), and chapter 9, "The
    trade-off, measured"."""
    _, probs = features.classifier_outputs(images, classifier, batch_size)
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
    best_d2, best_idx = torch.full((len(q32), 0), math.inf), torch.zeros((len(q32), 0), dtype=torch.long)
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
    dist, order = (queries.double()[:, None, :] - nearest).norm(dim=2).sort(dim=1)
    return dist, best_idx.gather(1, order)


def nearest_neighbours(samples, train_images, k: int = 1, extractor: Callable | None = None,
                       train_features=None, chunk_size: int = 5000, batch_size: int = 500) -> dict:
    """The k training images nearest to each sample: a check for memorisation. Taught in
    chapter 7, "Memorisation: nearest neighbours in the training set" (``ch07-memorisation``).

    ``samples`` (N, C, H, W), ``train_images`` (M, C, H, W). Returns a dict with ``distances``
    (N, k), Euclidean in pixel space with pixels in [-1, 1], sorted, and ``indices`` (N, k)
    into ``train_images``: show ``train_images[indices[i, 0]]`` next to ``samples[i]``. With
    an ``extractor`` (or ``train_features`` (M, D) computed by the default one) it also
    returns ``feature_distances`` and ``feature_indices`` in feature space.

    The training set is scanned ``chunk_size`` images at a time (1,000 samples x 60,000
    training images needs about 100 MB). To judge the distances, compute the same for real
    held-out images: samples much closer to the training set than those are copies.
    """
    k = integer("k", k, minimum=1)
    chunk_size = integer("chunk_size", chunk_size, minimum=1)
    queries = features.as_float_images(samples).flatten(1).cpu()
    dist, idx = _knn_search(queries, train_images, k, chunk_size,
                            lambda im: features.as_float_images(im).flatten(1).cpu())
    result = dict(distances=dist, indices=idx)
    if extractor is not None or train_features is not None:
        query_feats = features.extract_features(samples, extractor, batch_size)
        if train_features is None:
            train_features = features.extract_features(train_images, extractor, batch_size)
        train_features = features.as_features(train_features, "train_features")
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
    Taught in chapter 7, "Scores of the pretrained model" (``ch07-pretrained``).

    The reference: ``real`` images (M, C, H, W), or their ``real_features`` (M, D) by the same
    ``extractor`` (default: the shipped classifier), e.g. from
    :func:`ddpm_lib.features.reference_features`. Returns a dict:

    * ``fid``: Frechet distance of the features (FID-style with the default extractor);
      ``n``, ``n_real``: the sizes;
    * ``kid``, ``kid_std``: :func:`kid` (subsets of ``kid_subset_size``);
    * ``precision``, ``recall``: :func:`precision_recall` with ``k``, against N reference
      points drawn at random (seeded), so both sets have the same size, as in the paper;
    * ``entropy``, ``confidence``: :func:`class_histogram_entropy` of the samples, by
      ``classifier`` (default: the shipped one; ``False`` skips them, e.g. for CIFAR-10).
    """
    if (real is None) == (real_features is None):
        raise ValueError("give the reference as either real images or real_features")
    probs = None
    if extractor is None and classifier is None:
        fake, probs = features.classifier_outputs(samples, batch_size=batch_size)
    else:
        fake = features.extract_features(samples, extractor, batch_size)
    ref = features.extract_features(real, extractor, batch_size) if real_features is None else real_features
    ref, fake = _feature_pair(ref, fake, ("the reference features", "the samples' features"))
    kid_value = kid(ref, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    ref_subset = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:len(fake)]]
    pr = precision_recall(ref_subset, fake, k=k)
    scores = dict(n=len(fake), n_real=len(ref), fid=frechet_distance(ref, fake), kid=kid_value.mean,
                  kid_std=kid_value.std, precision=pr.precision, recall=pr.recall, entropy=None, confidence=None)
    if classifier is not False:
        if probs is None:
            probs = features.classifier_outputs(samples, classifier, batch_size)[1]
        summary = _class_summary(probs)
        scores.update(entropy=summary["entropy"], confidence=summary["confidence"])
    return scores


def real_floor(n: int, *, dataset: str = DEFAULT_DATASET, split: str = "test", reference_split: str = "train",
               real_features=None, extractor: Callable | None = None, seed: int = 0, **evaluate_kwargs) -> dict:
    """The scores of ``n`` real held-out images (drawn at random, seeded, from ``split``)
    against the reference (default: the training split's features), by :func:`evaluate`.
    Taught in chapter 7, "The sample count bias, and the floor" (``ch07-floor``).

    The floor a perfect generator reaches with ``n`` samples: the Frechet distance is biased
    upwards at small n, so a model's score means something only next to the floor at the same
    n (and reference and extractor). At small n the floor varies from draw to draw too (shipped
    classifier, n = 500: from 2.5 to 4.5 in three draws): vary ``seed`` to see by how much.
    """
    images, _ = load(dataset, split)
    if not 2 <= integer("n", n) <= len(images):
        raise ValueError(f"n must be in 2..{len(images)} (the {split} split), got {n}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    if real_features is None:
        real_features = features.reference_features(dataset, reference_split, extractor=extractor)
    return evaluate(images[idx], real_features=real_features, extractor=extractor, seed=seed, **evaluate_kwargs)
