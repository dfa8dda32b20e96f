"""A small variational autoencoder, for latent diffusion.

Latent diffusion (Rombach et al. 2022) trains the diffusion model not on pixels but on the
latents of an autoencoder: the encoder compresses an image to a small grid of numbers, the
diffusion model learns to generate such grids, and the decoder turns a generated grid back
into an image. Every network call of the sampler then works on the small grid.

The autoencoder here is a VAE (Kingma & Welling 2014) with a *small* KL weight, like the
KL-regularised autoencoder of Rombach et al. (2022): the encoder outputs a Gaussian
q(z | x) = N(mean, exp(logvar)) per latent number, the loss is::

    loss = reconstruction(x, decode(z)) + kl_weight * KL(q(z | x) || N(0, I)),   z ~ q(z | x)

with the reconstruction term the mean absolute error per pixel (L1, as Rombach et al.) and
the KL term the mean over latent numbers. The weight is small (default 1e-4): the KL term
only keeps the latent space smooth and its scale in check, it does not make the latents
a standard Gaussian; the decoder stays sharp.

Shapes (Fashion-MNIST): images (B, 1, 28, 28) in [-1, 1] -> latents (B, 4, 7, 7).
The encoder halves the size twice (28 -> 14 -> 7, a factor f = 4 like the LDM-f4 models)
and keeps 4 channels: 196 numbers per image instead of 784, 4x fewer, and 16x fewer
positions (49 instead of 784) for the diffusion model's convolutions and attention.
Why 7x7 and not 8x8: 28 = 4 * 7 divides without padding, and an f = 4 grid still keeps
the layout of the garment (a 4x4 grid would need many more channels per position).

The latent diffusion model: :class:`ddpm_lib.unet.UNet` halves H and W at each of its
``len(channel_mults) - 1`` levels and needs them divisible, so a 7x7 grid takes ONE level,
no downsampling: ``UNet(in_channels=4, channel_mults=(1,), attention_resolutions=(7,),
image_size=7)``. That is enough: at 7x7 the self-attention already sees the whole grid.
:func:`latent_unet` builds it. The whole recipe::

    vae = VAE()
    train_autoencoder(vae, images, steps=...)            # also sets vae.scale_factor
    latents = encode_dataset(vae, images)                # (N, 4, 7, 7), about unit std
    result = train.train(latent_unet(vae.latent_shape), schedule, latents, check_range=False, ...)
    z = samplers.dpm_solver_sample(result.ema_model, schedule, (16, *vae.latent_shape),
                                   clip_x0=False)        # latents are not in [-1, 1]: no clipping!
    images = vae.decode_latents(z)                       # (16, 1, 28, 28) in [-1, 1]

``scale_factor``: the diffusion schedule assumes data of roughly unit scale (the noise is
N(0, I)). The latents' scale is whatever training gave, so, as Rombach et al. do, they are
multiplied by ``scale_factor = 1 / std(latent means over the training set)``, stored in the
VAE and in its saved file; :meth:`VAE.decode_latents` divides it out again."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import integer, training_data
from .io import load_verified, save_checkpoint, sha256
from .runs import (Generators, hold_checkpoint, optimizer_step, read_resumable, resume_differences,
                   unusable_weights)
from .unet import UNet, _groups

Tensor = torch.Tensor

FORMAT, CHECKPOINT_FORMAT = "ddpm_lib.autoencoder.VAE/1", "ddpm_lib.autoencoder.train_autoencoder/1"


class AEBlock(nn.Module):
    """A residual block without time conditioning, (B, C_in, H, W) -> (B, C_out, H, W):
    ``x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x))))))`` (a 1x1 conv on the skip when the
    channel count changes). Taught in chapter 10, "The shipped autoencoder"."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, 2 * latent_channels, H / f, W / f), f = 2 ** (len(channels) - 1):
    the means and log-variances of q(z | x), stacked along the channels.
    Taught in chapter 10, "The shipped autoencoder"."""

    def __init__(self, in_channels: int, latent_channels: int, channels, num_res_blocks: int):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        ch = channels[0]
        for i, c in enumerate(channels):
            for _ in range(num_res_blocks):
                layers.append(AEBlock(ch, c))
                ch = c
            if i < len(channels) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))       # halve H and W
        layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, C, h * f, w * f), the encoder mirrored
    (nearest-neighbour upsampling followed by a convolution instead of strided convolutions).
    Taught in chapter 10, "The shipped autoencoder"."""

    def __init__(self, in_channels: int, latent_channels: int, channels, num_res_blocks: int):
        super().__init__()
        ch = channels[-1]
        layers = [nn.Conv2d(latent_channels, ch, 3, padding=1)]
        for i, c in reversed(list(enumerate(channels))):
            for _ in range(num_res_blocks):
                layers.append(AEBlock(ch, c))
                ch = c
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VAE(nn.Module):
    """A small convolutional VAE: images (B, C, H, W) <-> latents (B, latent_channels, H/f, W/f).

    Args:
        in_channels: image channels (1 for Fashion-MNIST).
        latent_channels: channels of the latent grid.
        channels: encoder channels at each resolution level; there are ``len(channels) - 1``
            halvings, so the downsampling factor is ``f = 2 ** (len(channels) - 1)`` and
            ``image_size`` must be divisible by f. Default (32, 64, 128): f = 4, 28 -> 7.
        num_res_blocks: residual blocks per level, in the encoder and in the decoder.
        image_size: H (= W) of the images.

    ``scale_factor`` (a float, None until fitted) maps posterior means to latents of about unit
    standard deviation; :func:`train_autoencoder` fits it at the end of training, or call
    :meth:`fit_scale_factor`. Taught in chapter 10, "The shipped autoencoder"."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, channels=(32, 64, 128),
                 num_res_blocks: int = 1, image_size: int = 28):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        f = 2 ** (len(channels) - 1)
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the downsampling factor {f} "
                             f"of {len(channels)} levels")
        if latent_channels < 1 or num_res_blocks < 0:
            raise ValueError("latent_channels must be >= 1 and num_res_blocks >= 0")
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, channels=list(channels),
                           num_res_blocks=num_res_blocks, image_size=image_size)
        self.in_channels, self.image_size, self.downsampling = in_channels, image_size, f
        self.latent_shape = (latent_channels, image_size // f, image_size // f)
        self.encoder = Encoder(in_channels, latent_channels, channels, num_res_blocks)
        self.decoder = Decoder(in_channels, latent_channels, channels, num_res_blocks)
        self.scale_factor: float | None = None

    def _check_images(self, x: Tensor) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must have shape (B, {', '.join(map(str, want))}), got {got}")

    def _check_latents(self, z: Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.latent_shape))}), got {got}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x): ``(mean, logvar)``, each (B, C_lat, h, w), logvar clamped to [-30, 20]."""
        self._check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample_latent(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + exp(logvar / 2) * noise, noise ~ N(0, I) (the reparameterisation trick)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: Tensor) -> Tensor:
        """(B, C_lat, h, w) -> reconstructed images (B, C, H, W), not clamped."""
        self._check_latents(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """``(x_hat, mean, logvar)``: decode a sample of q(z | x) (its mean if not ``sample``)."""
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar, generator) if sample else mean
        return self.decode(z), mean, logvar

    # -- latents for diffusion -------------------------------------------------------------
    @torch.no_grad()
    def fit_scale_factor(self, images: Tensor, batch_size: int = 256) -> float:
        """Set and return ``scale_factor = 1 / std`` of the posterior means of ``images``
        (the standard deviation over every latent number of every image)."""
        means = encode_dataset(self, images, batch_size=batch_size, scaled=False)
        std = means.double().std().item()
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"the latents have standard deviation {std}; cannot scale them")
        self.scale_factor = 1.0 / std
        return self.scale_factor

    def _scale(self) -> float:
        if self.scale_factor is None:
            raise ValueError("scale_factor is not set: train with train_autoencoder, or call "
                             "vae.fit_scale_factor(training_images) first")
        return self.scale_factor

    def encode_latents(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> diffusion latents ``mean * scale_factor`` (B, C_lat, h, w)."""
        return self.encode(x)[0] * self._scale()

    def decode_latents(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Diffusion latents (B, C_lat, h, w) -> images (B, C, H, W): ``decode(z / scale_factor)``,
        clamped to [-1, 1] unless ``clamp=False``."""
        x = self.decode(z / self._scale())
        return x.clamp(-1.0, 1.0) if clamp else x


# -- The loss and training ---------------------------------------------------------------
def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) per latent number (Kingma & Welling 2014, App. B)::

        KL = 0.5 * (mean^2 + exp(logvar) - 1 - logvar)

    Same shape as ``mean``. Taught in chapter 10, "The KL term in closed form"."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def vae_loss(vae: VAE, x: Tensor, kl_weight: float = 1e-4, reconstruction: str = "l1",
             generator: torch.Generator | None = None) -> dict:
    """The training loss on a batch x (B, C, H, W): ``{"loss", "rec", "kl"}`` (scalars), with
    ``rec`` the mean per-pixel |x - x_hat| (``"l1"``) or (x - x_hat)^2 (``"l2"``), ``kl`` the
    mean :func:`kl_divergence` per latent number and ``loss = rec + kl_weight * kl``.
    Taught in chapter 10, "Why a VAE, and why a small KL weight"."""
    x_hat, mean, logvar = vae(x, sample=True, generator=generator)
    if reconstruction == "l1":
        rec = (x_hat - x).abs().mean()
    elif reconstruction == "l2":
        rec = (x_hat - x).pow(2).mean()
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
    kl = kl_divergence(mean, logvar).mean()
    return {"loss": rec + kl_weight * kl, "rec": rec, "kl": kl}


# what a resumed VAE run shares with its checkpoint, besides the network and the image count
VAE_RESUME_MUST_MATCH = ("seed", "batch_size", "kl_weight", "reconstruction", "weight_decay")


def train_autoencoder(vae: VAE, images: Tensor, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                      kl_weight: float = 1e-4, *, reconstruction: str = "l1", weight_decay: float = 0.0,
                      grad_clip: float | None = 1.0, device=None, progress: bool = True, seed: int = 0,
                      log_every: int = 10, fit_scale: bool = True, checkpoint=None,
                      checkpoint_every: int = 0) -> dict:
    """Train ``vae`` on ``images`` (N, C, H, W) in [-1, 1] with :func:`vae_loss` and AdamW.
    Taught in chapter 10, "Training a VAE, then diffusion on its latents (the API)".

    Deterministic given the VAE's initial weights and ``seed`` (which draws the batches and
    the latent noise). At the end (``fit_scale``) it sets ``vae.scale_factor`` from the
    training images (at most 10,000 of them) and puts the VAE in eval mode. With
    ``checkpoint``, the run is saved there every ``checkpoint_every`` steps and at the end, and
    resumed from it when it exists, with :func:`ddpm_lib.train.train`'s guarantees (the pieces
    of :mod:`ddpm_lib.runs`): a lock, the same settings (:data:`VAE_RESUME_MUST_MATCH`), no
    checkpoint with unusable weights, and the same weights as a run never interrupted.

    Returns the history: ``{"step": [...], "loss": [...], "rec": [...], "kl": [...]}``
    (averages over each ``log_every`` steps), and ``"scale_factor"``."""
    training_data(images, None, None, check_range=False)
    steps, batch_size = integer("steps", steps, minimum=1), integer("batch_size", batch_size, minimum=1)
    vae._check_images(images[:1])
    settings = dict(seed=seed, batch_size=batch_size, kl_weight=kl_weight, reconstruction=reconstruction,
                    weight_decay=weight_decay, lr=lr, steps=steps, grad_clip=grad_clip)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae.to(device).train()
    gens = Generators.seeded(seed, device)         # cpu: which images; noise: the latent noise
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=weight_decay)
    history, running, step = {"step": [], "loss": [], "rec": [], "kl": []}, {"loss": [], "rec": [], "kl": []}, 0
    probe = images[:4].to(device)

    def loss_on_probe(net):    # a fixed batch and fixed noise: the training's streams untouched
        return vae_loss(net, probe, kl_weight, reconstruction, torch.Generator(device).manual_seed(0))["loss"]

    def save():
        problem = unusable_weights({"the VAE": vae}, optimizer, loss_on_probe, device)
        if problem:
            raise FloatingPointError(f"after step {step} {problem}: {checkpoint} was not overwritten; "
                                     f"resume from its last good state with a lower lr (now {lr})")
        save_checkpoint({"format": CHECKPOINT_FORMAT, "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "running": running, "rng": gens.state_dict(), "config": settings,
                         "model_config": dict(vae.config), "num_images": images.shape[0]}, checkpoint)

    with hold_checkpoint(checkpoint, device):
        if checkpoint is not None and Path(checkpoint).exists():
            state = read_resumable(checkpoint, lambda state: resume_differences(
                state, vae, settings, VAE_RESUME_MUST_MATCH, images.shape[0]), "vae_checkpoint")
            vae.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, running, step = state["history"], state["running"], state["step"]
            gens.load_state_dict(state["rng"])
            if problem := unusable_weights({"the VAE": vae}, optimizer, loss_on_probe, device):
                raise ValueError(f"{checkpoint} (step {step}) cannot be resumed: {problem}")
        for step in tqdm(range(step + 1, steps + 1), desc="VAE", disable=not progress):
            idx = torch.randint(images.shape[0], (batch_size,), generator=gens.cpu)
            terms = vae_loss(vae, images[idx].to(device), kl_weight, reconstruction, generator=gens.noise)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"the VAE loss became {terms['loss'].item()} at step {step}; lower lr")
            optimizer_step(terms["loss"], optimizer, None, vae.parameters(), grad_clip)
            for k in running:
                running[k].append(terms[k].item())
            if step % log_every == 0 or step == steps:
                history["step"].append(step)
                for k in running:
                    history[k].append(sum(running[k]) / len(running[k]))
                    running[k] = []
            if checkpoint is not None and (step == steps or checkpoint_every and step % checkpoint_every == 0):
                save()
    vae.eval()
    if fit_scale:
        vae.fit_scale_factor(images[:10_000])
    history["scale_factor"] = vae.scale_factor
    return history


@torch.no_grad()
def reconstruction_error(vae: VAE, images: Tensor, batch_size: int = 256) -> dict:
    """Reconstruct ``images`` through the posterior means (no sampling) and return
    ``{"mse": ..., "psnr": ...}``: the mean squared error per pixel on the [-1, 1] scale, and
    the PSNR in dB with the images mapped to [0, 1] (peak 1): ``10 log10(4 / mse)``.
    Taught in chapter 10, "Reconstructions"."""
    vae.eval()
    device = next(vae.parameters()).device
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        x_hat = vae.decode(vae.encode(x)[0]).clamp(-1.0, 1.0)
        total += (x_hat - x).double().pow(2).sum().item()
        count += x.numel()
    mse = total / count
    return {"mse": mse, "psnr": 10.0 * math.log10(4.0 / mse) if mse > 0 else math.inf}


@torch.no_grad()
def encode_dataset(vae: VAE, images: Tensor, batch_size: int = 256, scaled: bool = True) -> Tensor:
    """Latents of a whole dataset for diffusion training: the posterior means (no sampling)
    times ``vae.scale_factor`` (unless ``scaled=False``). (N, C, H, W) -> (N, C_lat, h, w),
    float32 on the CPU, in batches of ``batch_size`` on the VAE's device.
    Taught in chapter 10, "Training a VAE, then diffusion on its latents (the API)"."""
    vae.eval()
    device = next(vae.parameters()).device
    scale = vae._scale() if scaled else 1.0
    out = [vae.encode(images[i:i + batch_size].to(device))[0].float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) * scale


def latent_unet(latent_shape=(4, 7, 7), *, base_channels: int = 128, channel_mults=None,
                num_res_blocks: int = 2, dropout: float = 0.1, num_classes: int | None = None,
                num_heads: int = 4) -> UNet:
    """A :class:`ddpm_lib.unet.UNet` for latents of shape (C_lat, h, w), e.g. ``vae.latent_shape``.

    ``channel_mults`` defaults to ``(1,)`` (no downsampling) when h is odd, as for 7x7
    latents: the UNet's stride-2 convolution would take 7 to 4 and the upsampling 4 to 8,
    which no longer matches the 7x7 skip connection. For an even h it defaults to (1, 2).
    Self-attention runs at the full latent resolution h (49 positions for 7x7: cheap).
    ``num_classes`` makes it class-conditional (for classifier-free guidance).
    Taught in chapter 10, "Training a VAE, then diffusion on its latents (the API)"."""
    c, h, w = (int(s) for s in latent_shape)
    if h != w:
        raise ValueError(f"the UNet takes square inputs, got latents of shape {tuple(latent_shape)}")
    if channel_mults is None:
        channel_mults = (1,) if h % 2 else (1, 2)
    return UNet(in_channels=c, base_channels=base_channels, channel_mults=channel_mults,
                num_res_blocks=num_res_blocks, attention_resolutions=(h,), dropout=dropout,
                num_classes=num_classes, image_size=h, num_heads=num_heads)


# -- Saving and loading ------------------------------------------------------------------
def save_vae(vae: VAE, path) -> str:
    """Write ``{"format", "config", "state_dict", "scale_factor"}`` (tensors and plain
    Python values only, loadable with ``weights_only=True``) to ``path``; return its sha256.
    Used by scripts/train_part3.py to write the VAE of chapter 10, "The shipped autoencoder"."""
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    save_checkpoint({"format": FORMAT, "config": dict(vae.config), "state_dict": state,
                     "scale_factor": vae.scale_factor}, path)      # atomically: never half a file
    return sha256(path)


def load_vae(path, device="cpu", sha256: str | None = None) -> VAE:
    """Load a VAE written by :func:`save_vae` (in eval mode, ``scale_factor`` restored),
    with ``torch.load(..., weights_only=True)``. With ``sha256``, the file's digest is
    checked first and a mismatch raises ``ValueError``; so does an unreadable (empty,
    truncated, foreign) file, naming it. A missing one raises ``FileNotFoundError``.
    Used in chapter 10, "The shipped autoencoder" (through ``load_pretrained_vae``)."""
    path = Path(path)
    blob = load_verified(path, sha256, map_location=device, what="VAE file",
                         remedy="save it again with save_vae (or reinstall ddpm_lib for the "
                                "shipped one)")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddpm_lib VAE file (made by ddpm_lib.autoencoder.save_vae)")
    vae = VAE(**blob["config"]).to(device)
    vae.load_state_dict(blob["state_dict"])
    vae.scale_factor = blob["scale_factor"]
    return vae.eval()
