"""ddpm_lib.metrics and ddpm_lib.features: the Frechet distance against its closed form, KID,
precision/recall, class statistics, nearest neighbours; the image conversions, the shipped
classifier on real Fashion-MNIST, and the book's FID Inception against pytorch-fid's."""
import importlib.util
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from ddpm_lib import features, metrics


def exact_distances(a, b):
    """Euclidean distances between the rows of a (M, D) and b (N, D) in float64, from the
    differences themselves. (torch.cdist takes a matrix-multiply route for more than 25 rows,
    |a|^2 + |b|^2 - 2 a.b, whose rounding makes the distance of a row to itself about 1e-6
    instead of 0, differently on different CPUs.) Relative error about 1e-15."""
    return (a.double()[:, None, :] - b.double()[None, :, :]).norm(dim=2)


def random_spd(d, gen, floor=0.1):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + floor * torch.eye(d, dtype=torch.float64)


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_closed_form_non_commuting(gen):
    """With S2 = M S1 M (M symmetric positive definite), S1^(1/2) S2 S1^(1/2) = (S1^(1/2) M S1^(1/2))^2,
    so Tr((S1 S2)^(1/2)) = Tr(M S1) exactly, although S1 and S2 do not commute."""
    d = 6
    s1, m = random_spd(d, gen), random_spd(d, gen)
    s2 = m @ s1 @ m
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(float(torch.trace(m @ s1)), rel=1e-10)
    expected = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(m @ s1))
    assert metrics.frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_closed_form_diagonal_and_1d():
    # diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())  # 10 + 4 + 1
    assert expected == pytest.approx(15.0)
    got = metrics.frechet_distance_from_statistics(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance_from_statistics([3.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


def test_trace_sqrt_product_agrees_with_scipy_sqrtm(gen):
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_spd(8, gen), random_spd(8, gen)
    root = linalg.sqrtm((s1 @ s2).numpy())
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(float(root.trace().real), rel=1e-8)
    assert abs(root.trace().imag) < 1e-8


def test_frechet_distance_of_samples(gen):
    """Features drawn from two Gaussians: the distance of the fitted Gaussians approaches the
    closed form; a set has distance 0 to itself; rank-deficient covariances (N < D) work."""
    d, n = 4, 20000
    s1, m = random_spd(d, gen), random_spd(d, gen)
    s2 = m @ s1 @ m
    mu2 = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    b = mu2 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    exact = metrics.frechet_distance_from_statistics(torch.zeros(d), s1, mu2, s2)
    assert metrics.frechet_distance(a, b) == pytest.approx(exact, rel=0.05)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    few = torch.randn(10, 32, generator=gen)  # covariance of rank 9 in 32 dimensions
    assert metrics.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(few, few + 1.0) == pytest.approx(32.0, rel=1e-6)


def test_feature_statistics_and_errors(gen):
    f = torch.randn(50, 3, generator=gen)
    mu, sigma = metrics.feature_statistics(f)
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (3, 3)
    assert torch.allclose(sigma, torch.cov(f.double().T))
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(f, f[:, :2])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.frechet_distance(f[0], f)
    not_a_covariance = torch.diag(torch.tensor([1.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.frechet_distance_from_statistics(mu, not_a_covariance, mu, sigma)
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.frechet_distance_from_statistics(mu, sigma, mu, not_a_covariance)


def test_fid_accepts_any_extractor(gen):
    x = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    mean_and_std = lambda im: torch.stack([im.mean((1, 2, 3)), im.std((1, 2, 3))], 1)  # noqa: E731
    assert metrics.fid(x, x, extractor=mean_and_std, batch_size=7) == pytest.approx(0.0, abs=1e-9)
    assert metrics.fid(x, (x + 0.5).clamp(-1, 1), extractor=mean_and_std) > 0.05
    # uint8 images are the same images
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(features.as_float_images(u8), x, atol=1 / 127.5)
    assert features.as_float_images(u8[:, 0]).shape == (40, 1, 28, 28)
    rgb = (torch.arange(2 * 3 * 32 * 32) % 256).to(torch.uint8).reshape(2, 3, 32, 32)
    channels_last = rgb.permute(0, 2, 3, 1).numpy()               # as `sample --npy` writes colour
    assert torch.equal(features.as_float_images(channels_last), features.as_float_images(rgb))


# ----------------------------------------------------------------------------- KID

def test_kid_same_and_different_distributions(gen):
    a = torch.randn(1500, 8, generator=gen)
    b = torch.randn(1500, 8, generator=gen)
    c = torch.randn(1500, 8, generator=gen) * 1.2 + 0.3
    same = metrics.kid(a, b, subsets=20, subset_size=500)
    diff = metrics.kid(a, c, subsets=20, subset_size=500)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert diff.mean > 5 * diff.std > 0
    assert metrics.kid(a, b, subsets=20, subset_size=500) == same  # seeded


def test_mmd2_unbiased_matches_the_definition(gen):
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(float(xx + yy - 2 * xy), rel=1e-12)


# ----------------------------------------------------------------------------- precision and recall

def test_precision_recall_on_toy_manifolds(gen):
    real = torch.randn(2000, 2, generator=gen)
    same = torch.randn(2000, 2, generator=gen)
    corner = torch.randn(8000, 2, generator=gen)
    corner = corner[corner[:, 0] > 1.0][:1000]  # a part of the real manifold only
    off = torch.randn(1000, 2, generator=gen) + 6.0  # elsewhere
    pr_same = metrics.precision_recall(real, same, k=3)
    pr_corner = metrics.precision_recall(real, corner, k=3)
    pr_off = metrics.precision_recall(real, off, k=3)
    assert pr_same.precision > 0.9 and pr_same.recall > 0.9
    assert pr_corner.precision > 0.95 and pr_corner.recall < 0.35
    assert pr_off.precision < 0.05 and pr_off.recall < 0.05


def test_knn_radii_brute_force(gen):
    f = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    expected = exact_distances(f, f).sort(dim=1).values[:, 3]
    # knn_radii uses torch.cdist in float64, whose |a|^2 + |b|^2 - 2 a.b route rounds away a few
    # 1e-16 of |a|^2 (about 3 here; 2e-6 absolute for the 784-pixel rows below, measured): radii
    # of order 1 agree to far better than 1e-9, on any CPU
    assert torch.allclose(metrics.knn_radii(f, k=3, chunk_size=7), expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- class statistics

def test_histogram_entropy():
    assert metrics.histogram_entropy(torch.ones(10)) == pytest.approx(math.log(10))
    assert metrics.histogram_entropy([5, 0, 0]) == 0.0
    assert metrics.histogram_entropy([1, 1, 0, 0]) == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- nearest neighbours

def test_nearest_neighbours_brute_force(gen):
    train = torch.rand(300, 1, 28, 28, generator=gen) * 2 - 1
    samples = torch.cat([train[[5, 123, 299]], torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1])
    nn = metrics.nearest_neighbours(samples, train, k=3, chunk_size=64)
    assert nn["indices"][:3, 0].tolist() == [5, 123, 299]
    assert torch.all(nn["distances"][:3, 0] == 0)
    expected_d, expected_i = exact_distances(samples.flatten(1), train.flatten(1)).sort(dim=1)
    assert torch.equal(nn["indices"], expected_i[:, :3])
    # both are float64 norms of the same differences, summed in a different order: ~1e-15 relative
    assert torch.allclose(nn["distances"], expected_d[:, :3], rtol=1e-12, atol=0)
    # uint8 NumPy arrays (N, H, W), as `python -m ddpm_lib sample --npy` writes them
    nn_u8 = metrics.nearest_neighbours(features.to_uint8(samples)[:3, 0], features.to_uint8(train)[:, 0], k=1)
    assert nn_u8["indices"][:, 0].tolist() == [5, 123, 299] and torch.all(nn_u8["distances"] == 0)
    with pytest.raises(ValueError, match="only 2 rows"):
        metrics.nearest_neighbours(samples, train[:2], k=3)


# ----------------------------------------------------------------------------- the FID network

def test_inception_extractor_never_downloads_silently(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("inception_extractor downloaded without download=True")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    for path in (None, tmp_path / "missing.pth"):
        with pytest.raises(FileNotFoundError) as info:
            features.inception_extractor(weights_path=path)
        assert features.FID_INCEPTION_URL in str(info.value) and "download=True" in str(info.value)


def test_fid_inception_network_shapes():
    pytest.importorskip("torchvision")
    net = features.build_fid_inception()  # random weights: the architecture only
    assert net(torch.zeros(2, 3, 299, 299)).shape == (2, 2048)


def random_fid_inception_weights():
    """A state dict of the FID Inception with random weights of sensible size (He-scaled
    convolutions, batch norms near the identity), so that features neither vanish nor explode."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for key, value in features.build_fid_inception().net.state_dict().items():
        noise = 0.1 * torch.randn(value.shape, generator=g)
        if not value.is_floating_point():
            weights[key] = value
        elif key.endswith("conv.weight"):
            weights[key] = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            weights[key] = 1 + noise.abs()
        else:                                   # batch norm biases and means, the unused fc
            weights[key] = noise
    return weights


def test_book_inception_matches_pytorch_fid(tmp_path, monkeypatch):
    """"The usual FID", checked rather than assumed: with the same weights (random: the real
    ones are a 91 MB download), uint8 grey 28x28 images through inception_extractor, with the
    book's port or pytorch-fid's network, give the 2048 features that pytorch-fid's own pipeline
    (its InceptionV3 with its resize and scaling, on RGB images in [0, 1]) gives. Runs where
    pytorch-fid (the `fid` extra) and torchvision are installed."""
    pytorch_fid = pytest.importorskip("pytorch_fid.inception")
    weights = random_fid_inception_weights()
    torch.save(weights, tmp_path / "random_inception.pth")
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: weights)
    reference = pytorch_fid.InceptionV3([3]).eval()           # pytorch-fid's defaults
    images = torch.randint(0, 256, (2, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference(images[:, None].float().div(255).repeat(1, 3, 1, 1))[0].flatten(1).double()
    assert expected.shape == (2, 2048) and expected.std() > 1e-2
    for implementation in ("ddpm_lib", "pytorch-fid", "auto"):
        extract = features.inception_extractor(tmp_path / "random_inception.pth", device="cpu",
                                               implementation=implementation)
        torch.testing.assert_close(extract(images), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert extract.implementation == "pytorch-fid"            # auto prefers pytorch-fid


def test_inception_implementation_is_checked(tmp_path):
    torch.save({}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="implementation must be one of"):
        features.inception_extractor(tmp_path / "weights.pth", implementation="tensorflow")
    if importlib.util.find_spec("pytorch_fid") is None:
        with pytest.raises(ImportError, match=r"ddpm_lib\[fid\]"):
            features.inception_extractor(tmp_path / "weights.pth", device="cpu", implementation="pytorch-fid")


# ----------------------------------------------------------------------------- the shipped classifier

def test_classifier_sha256_mismatch(tmp_path):
    bad = tmp_path / "classifier.pt"
    shutil.copy(features.WEIGHTS_DIR / features.CLASSIFIER_FILE, bad)
    with open(bad, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="sha256 .* expected_sha256=None"):
        features.load_classifier(path=bad)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(ValueError, match="classifier weights"):       # through io.load_verified
        features.load_classifier(path=truncated, expected_sha256=None)
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        features.load_classifier(path=tmp_path / "absent.pt")


@pytest.fixture(scope="module")
def scored(fashion):
    """The shared Fashion-MNIST subset (conftest's ``fashion``) and the shipped classifier's
    outputs on it, computed once."""
    classifier = features.load_classifier()
    test_feats, test_probs = features.classifier_outputs(fashion.test, classifier)
    return dict(train=fashion.train, test=fashion.test, test_labels=fashion.test_labels,
                classifier=classifier, train_feats=features.extract_features(fashion.train),
                test_feats=test_feats, test_probs=test_probs)


def test_shipped_classifier(scored):
    c = scored["classifier"]
    assert c.meta["test_accuracy"] > 0.9 and "train_classifier.py" in c.meta["recipe"]
    acc = metrics.classifier_accuracy(scored["test"][:500], scored["test_labels"][:500], c)
    assert acc > 0.88
    assert scored["test_feats"].shape == (2000, c.config["feature_dim"])
    # the test split is balanced: predicted classes are close to uniform, and the classifier is sure
    stats = metrics.class_histogram_entropy(scored["test"][:1000], c)
    assert stats["counts"].sum() == 1000 and stats["histogram"].sum() == pytest.approx(1.0)
    assert math.log(10) - 0.05 < stats["entropy"] <= math.log(10)
    assert stats["confidence"] > 0.85
    # one class only: entropy 0
    one = scored["test"][scored["test_labels"] == 1][:50]
    assert metrics.class_histogram_entropy(one, c)["entropy"] < 0.2


def test_damaged_images_score_worse_than_held_out_images(scored):
    ref, test = scored["train_feats"], scored["test"][:500]
    held_out = metrics.frechet_distance(ref, scored["test_feats"][:500])
    blurred = metrics.frechet_distance(ref, features.extract_features(F.avg_pool2d(test, 3, 1, 1)))
    shifted = metrics.frechet_distance(ref, features.extract_features(test.roll(4, dims=3)))
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    noisy_images = (test + 0.3 * noise).clamp(-1, 1)    # images stay in [-1, 1]
    noisy = metrics.frechet_distance(ref, features.extract_features(noisy_images))
    assert blurred > 2 * held_out and shifted > 2 * held_out and noisy > 2 * held_out
    kid_held_out = metrics.kid(ref, scored["test_feats"][:500], subsets=10, subset_size=500)
    kid_blurred = metrics.kid(ref, features.extract_features(F.avg_pool2d(test, 3, 1, 1)), subsets=10, subset_size=500)
    assert kid_blurred.mean > kid_held_out.mean + 3 * kid_blurred.std


def test_real_images_approach_the_floor_as_n_grows(scored):
    """The Frechet distance is biased upwards at small N: real held-out images against the
    training features score lower with more images."""
    ref, test = scored["train_feats"], scored["test_feats"]
    scores = [metrics.frechet_distance(ref, test[:n]) for n in (100, 500, 2000)]
    assert scores[0] > scores[1] > scores[2] > 0


def test_evaluate(scored):
    test = scored["test"]
    real = metrics.evaluate(test[:300], real_features=scored["train_feats"], kid_subsets=5, kid_subset_size=300)
    assert set(real) >= {"fid", "kid", "kid_std", "precision", "recall", "entropy", "confidence", "n", "n_real"}
    assert real["n"] == 300 and real["n_real"] == 6000
    # the same features as evaluate computes them (a batch of 300: a float32 convolution's rounding
    # can depend on the batch size, and the Frechet distance, a difference of traces, magnifies it)
    same_features = features.extract_features(test[:300])
    same_fid = metrics.frechet_distance(scored["train_feats"], same_features)
    assert real["fid"] == pytest.approx(same_fid, rel=1e-9)
    assert real["precision"] > 0.6 and real["recall"] > 0.6 and real["entropy"] > 2.2
    blurred = metrics.evaluate(F.avg_pool2d(test[:300], 3, 1, 1), real=scored["train"][:3000],
                               kid_subsets=5, kid_subset_size=300)
    assert blurred["fid"] > real["fid"] and blurred["kid"] > real["kid"]
    assert blurred["precision"] < real["precision"]
    assert blurred["confidence"] < real["confidence"]
    no_classes = metrics.evaluate(test[:50], real=test[50:100], classifier=False, kid_subsets=2)
    assert no_classes["entropy"] is None


def test_nearest_training_image_is_itself(scored):
    train = scored["train"]
    nn = metrics.nearest_neighbours(train[[0, 2500, 5999]], train, k=2, train_features=scored["train_feats"],
                                     chunk_size=1000)
    assert nn["indices"][:, 0].tolist() == [0, 2500, 5999]
    assert torch.all(nn["distances"][:, 0] == 0) and torch.all(nn["distances"][:, 1] > 0)
    assert nn["feature_indices"][:, 0].tolist() == [0, 2500, 5999]
    held_out = metrics.nearest_neighbours(scored["test"][:20], train)
    assert torch.all(held_out["distances"] > 0)


# ----------------------------------------------------------------------------- bad input

def test_float_images_outside_minus_one_one_are_refused(gen):
    x = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    pixels = ((x + 1) * 127.5).round()                      # 0..255 as floats
    mean_and_std = lambda im: torch.stack([im.mean((1, 2, 3)), im.std((1, 2, 3))], 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"range from 0 to 255.*uint8.*x / 127.5 - 1"):
        metrics.fid(pixels, x, extractor=mean_and_std)
    as_uint8 = metrics.fid(pixels.to(torch.uint8), x, extractor=mean_and_std)
    as_floats = metrics.fid(pixels / 127.5 - 1, x, extractor=mean_and_std)
    assert as_uint8 == pytest.approx(as_floats, abs=1e-9) and as_uint8 < 1e-3
    # rounding-sized overshoot, as a sampler's last step leaves it, is clamped
    assert features.as_float_images(x.clamp(-1, 1) * 1.0005).abs().max().item() == 1.0
    with pytest.raises(ValueError, match="NaN"):
        features.as_float_images(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="grey 28x28"):
        features.extract_features(torch.zeros(2, 3, 32, 32))


def test_metric_arguments_are_checked(gen):
    a, b = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    for kwargs, message in ((dict(subsets=0), "subsets"), (dict(subset_size=1), "subset_size"),
                            (dict(subsets=2.5), "subsets")):
        with pytest.raises(ValueError, match=message):
            metrics.kid(a, b, **kwargs)
    with pytest.raises(ValueError, match="m, n >= 2"):
        metrics.mmd2_unbiased(a[:1], b[:1])
    with pytest.raises(ValueError, match="dimensions differ: real_feats has 8, fake_feats 4"):
        metrics.precision_recall(a, b[:, :4])
    with pytest.raises(ValueError, match="k must"):
        metrics.precision_recall(a, b, k=0)
    images = torch.rand(6, 1, 28, 28, generator=gen) * 2 - 1
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be an integer"):
            metrics.nearest_neighbours(images[:2], images, k=k)
    with pytest.raises(ValueError, match="784 values each but the reference rows 196"):
        metrics.nearest_neighbours(images[:2], torch.zeros(5, 1, 14, 14))
    with pytest.raises(ValueError, match="train_features has 3 rows but train_images 6"):
        metrics.nearest_neighbours(images[:2], images, train_features=torch.zeros(3, 128))
    with pytest.raises(ValueError, match="chunk_size"):
        metrics.nearest_neighbours(images[:2], images, chunk_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        features.extract_features(images, batch_size=0)
    with pytest.raises(ValueError, match="labels must be integers"):
        metrics.classifier_accuracy(images, torch.full((6,), 1.5))
    for histogram in ([0, 0, 0], [1, -1, 3]):
        with pytest.raises(ValueError, match="histogram"):
            metrics.histogram_entropy(histogram)
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance_from_statistics([float("nan")], [[1.0]], [0.0], [[1.0]])

