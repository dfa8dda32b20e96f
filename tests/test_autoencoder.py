"""The VAE of ddpm_lib.autoencoder: shapes, the KL formula, training, latent scaling,
saving, and the latent-diffusion pipeline end to end (tiny sizes, CPU, seconds)."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule
from ddpm_lib.autoencoder import (VAE, encode_dataset, kl_divergence, latent_unet, load_vae,
                                  reconstruction_error, save_vae, train_autoencoder, vae_loss)
from ddpm_lib.samplers import ddim_sample, dpm_solver_sample

TINY = dict(channels=(8, 16, 16), num_res_blocks=1)


def tiny_vae(seed=0, **kw):
    torch.manual_seed(seed)
    return VAE(**{**TINY, **kw})


def test_shapes():
    vae = tiny_vae()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert vae.latent_shape == (4, 7, 7) and vae.downsampling == 4
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (3, 4, 7, 7)
    z = vae.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 7, 7)
    x_hat, m2, lv2 = vae(x)
    assert x_hat.shape == x.shape and torch.equal(m2, mean) and torch.equal(lv2, logvar)
    assert VAE(channels=(8, 16), latent_channels=2).latent_shape == (2, 14, 14)
    assert VAE(channels=(8, 8, 8, 8), image_size=32, latent_channels=3).latent_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="shape"):
        vae.decode(torch.zeros(1, 3, 7, 7))
    with pytest.raises(ValueError, match="divisible"):
        VAE(channels=(8, 8, 8, 8), image_size=28)
    with pytest.raises(ValueError, match="scale_factor"):
        vae.encode_latents(x)


def test_sample_latent_is_the_reparameterisation():
    mean, logvar = torch.full((1, 4, 7, 7), 0.3), torch.full((1, 4, 7, 7), math.log(0.25))
    z = VAE.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z, 0.3 + 0.5 * noise)


def test_kl_closed_form_against_monte_carlo():
    """KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v), checked against the average of
    log q(z) - log p(z) over samples z ~ q, and against ddpm_lib.diffusion.gaussian_kl."""
    from ddpm_lib.diffusion import gaussian_kl
    mean = torch.tensor([0.0, 1.5, -0.7, 0.2], dtype=torch.float64)
    logvar = torch.tensor([0.0, -1.0, 0.8, -3.0], dtype=torch.float64)
    kl = kl_divergence(mean, logvar)
    assert kl[0].item() == 0.0
    assert torch.allclose(kl, gaussian_kl(mean, logvar.exp(), torch.zeros(4, dtype=torch.float64),
                                          torch.ones(4, dtype=torch.float64)))
    n = 400_000
    z = mean + (0.5 * logvar).exp() * torch.randn(n, 4, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    log_q = -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z ** 2 + math.log(2 * math.pi))
    samples = log_q - log_p
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    assert ((mc - kl).abs() < 5 * se + 1e-12).all(), (mc, kl, se)


def test_vae_loss_terms():
    vae = tiny_vae()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    terms = vae_loss(vae, x, kl_weight=0.5, generator=g())
    x_hat, mean, logvar = vae(x, generator=g())
    assert torch.allclose(terms["rec"], (x_hat - x).abs().mean())
    assert torch.allclose(terms["kl"], kl_divergence(mean, logvar).mean())
    assert torch.allclose(terms["loss"], terms["rec"] + 0.5 * terms["kl"])
    l2 = vae_loss(vae, x, reconstruction="l2", generator=g())
    assert torch.allclose(l2["rec"], (x_hat - x).pow(2).mean())
    with pytest.raises(ValueError, match="reconstruction"):
        vae_loss(vae, x, reconstruction="l3")


@pytest.fixture(scope="module")
def trained(fashion):
    train = fashion.train[:1000]
    vae = tiny_vae()
    history = train_autoencoder(vae, train, steps=100, batch_size=16, lr=3e-3, progress=False, seed=0)
    return vae, history


def test_training_reduces_held_out_error(fashion, trained):
    """100 steps of batch 16 on 1,000 images (a few seconds; 17 s on a heavily shared 2-core CPU).
    Measured held-out MSE (on the [-1, 1] scale): 0.69 at initialisation, 0.084 after
    (PSNR 16.8 dB); predicting the mean training image: 0.36."""
    train, test = fashion.train[:1000], fashion.test[:200]
    vae, history = trained
    before = reconstruction_error(tiny_vae(), test)["mse"]
    after = reconstruction_error(vae, test)
    mean_image = ((test - train.mean(0, keepdim=True)) ** 2).mean().item()
    assert after["mse"] < 0.15 < 0.5 * mean_image < before
    assert after["psnr"] == pytest.approx(10 * math.log10(4 / after["mse"]))
    assert history["rec"][-1] < 0.5 * history["rec"][0]
    assert len(history["step"]) == 10 and history["step"][-1] == 100


def test_training_is_deterministic(fashion):
    train = fashion.train[:1000]
    a, b = tiny_vae(), tiny_vae()
    ha = train_autoencoder(a, train[:200], steps=5, batch_size=8, progress=False, seed=1, log_every=1)
    hb = train_autoencoder(b, train[:200], steps=5, batch_size=8, progress=False, seed=1, log_every=1)
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_vae_training_resumes_exactly_from_a_checkpoint(fashion, tmp_path):
    """The pieces train() uses (ddpm_lib.runs) give the VAE checkpoints and an exact resume."""
    images, ckpt = fashion.train[:200], tmp_path / "vae.pt"
    kw = dict(batch_size=8, progress=False, seed=1, log_every=3, fit_scale=False)
    straight = tiny_vae()
    h_straight = train_autoencoder(straight, images, steps=6, **kw)
    train_autoencoder(tiny_vae(), images, steps=3, checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    resumed = tiny_vae(seed=5)                       # other initial weights: the checkpoint's win
    h_resumed = train_autoencoder(resumed, images, steps=6, checkpoint=ckpt, **kw)
    assert h_resumed == h_straight
    assert all(torch.equal(p, q) for p, q in zip(straight.state_dict().values(),
                                                 resumed.state_dict().values()))
    with pytest.raises(ValueError, match=r"kl_weight: checkpoint 0\.0001, this run 0\.01"):
        train_autoencoder(tiny_vae(), images, steps=8, checkpoint=ckpt, kl_weight=1e-2, **kw)
    with pytest.raises(ValueError, match="network channels"):
        train_autoencoder(tiny_vae(channels=(8, 16, 32)), images, steps=8, checkpoint=ckpt, **kw)
    # a VAE checkpoint is not a diffusion checkpoint, nor the other way round
    from ddpm_lib.train import train
    unet = latent_unet((4, 7, 7), base_channels=8, dropout=0.0)
    with pytest.raises(ValueError, match=r"vae\.pt is a VAE training checkpoint .*not a training checkpoint"):
        train(unet, NoiseSchedule.linear(T=10), images, steps=1, checkpoint=ckpt, progress=False)
    diffusion_ckpt = tmp_path / "ddpm.pt"
    latents = encode_dataset(straight, images, scaled=False)
    train(unet, NoiseSchedule.linear(T=10), latents, steps=1, batch_size=4, checkpoint=diffusion_ckpt,
          check_range=False, progress=False)
    with pytest.raises(ValueError, match=r"ddpm\.pt is a training checkpoint .*not a VAE training checkpoint"):
        train_autoencoder(tiny_vae(), images, steps=8, checkpoint=diffusion_ckpt, **kw)


def test_scaled_latents_have_unit_std(fashion, trained):
    train, test = fashion.train[:1000], fashion.test[:200]
    vae, history = trained
    assert history["scale_factor"] == vae.scale_factor > 0
    z = encode_dataset(vae, train, batch_size=300)
    assert z.shape == (1000, 4, 7, 7)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)       # by construction on the training set
    assert encode_dataset(vae, test).std().item() == pytest.approx(1.0, abs=0.15)   # and near 1 on new images
    assert torch.allclose(encode_dataset(vae, test[:5]), vae.encode_latents(test[:5]), atol=1e-5)
    assert torch.allclose(encode_dataset(vae, test[:5], scaled=False) * vae.scale_factor,
                          encode_dataset(vae, test[:5]), atol=1e-5)
    with torch.no_grad():   # decode_latents undoes the scaling
        x = vae.decode_latents(vae.encode_latents(test[:5]))
        assert torch.allclose(x, vae.decode(vae.encode(test[:5])[0]).clamp(-1, 1), atol=1e-5)
        assert x.abs().max() <= 1


def test_save_and_load(tmp_path, trained):
    vae, _ = trained
    path = tmp_path / "vae.pt"
    digest = save_vae(vae, path)
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format", "config", "state_dict", "scale_factor"}
    loaded = load_vae(path, sha256=digest)
    assert loaded.config == vae.config and loaded.scale_factor == vae.scale_factor and not loaded.training
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode_latents(x), vae.encode_latents(x))
    with pytest.raises(ValueError, match="sha256"):
        load_vae(path, sha256="0" * 64)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ddpm_lib VAE"):
        load_vae(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.pt")


def test_latent_unet_configuration():
    net = latent_unet((4, 7, 7), base_channels=16, num_res_blocks=1)
    assert net.config["channel_mults"] == [1] and net.config["image_size"] == 7
    assert net.config["attention_resolutions"] == [7] and net.config["in_channels"] == 4
    z = torch.randn(2, 4, 7, 7)
    assert net(z, torch.tensor([0, 999])).shape == z.shape
    even = latent_unet((4, 8, 8), base_channels=16, num_res_blocks=1, num_classes=10)
    assert even.config["channel_mults"] == [1, 2]
    assert even(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 10])).shape == (2, 4, 8, 8)


def test_latent_diffusion_pipeline(fashion, trained):
    """Latents -> a few steps of diffusion training -> sampling latents -> decoding images."""
    from ddpm_lib.train import train
    vae, _ = trained
    images = fashion.train[:1000]
    latents = encode_dataset(vae, images[:64])
    schedule = NoiseSchedule.linear(T=100, beta_start=1e-3, beta_end=0.1)
    torch.manual_seed(0)
    net = latent_unet(vae.latent_shape, base_channels=16, num_res_blocks=1, dropout=0.0)
    result = train(net, schedule, latents, steps=2, batch_size=8, progress=False, check_range=False)
    for sampler, kw in ((dpm_solver_sample, {"steps": 4}), (ddim_sample, {"steps": 3})):
        z = sampler(result.ema_model, schedule, (3, *vae.latent_shape), clip_x0=False,
                    generator=torch.Generator().manual_seed(0), **kw)
        assert z.shape == (3, 4, 7, 7)
        with torch.no_grad():
            x = vae.decode_latents(z)
        assert x.shape == (3, 1, 28, 28) and x.abs().max() <= 1
