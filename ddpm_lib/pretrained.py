"""Weights that ship with the book, and loading exported weights.

``python -m ddpm_lib export`` (or :func:`save_weights`) writes a file that holds the EMA
weights, the UNet's configuration and the schedule's betas; :func:`load_weights` reads it back with
``torch.load(..., weights_only=True)`` (no pickled code is ever run). :func:`load_pretrained`
loads a model that ships inside the package, after checking its sha256.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .schedules import NoiseSchedule
from .train import save_checkpoint
from .unet import UNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> file in WEIGHTS_DIR, its sha256, and the command that made it
PRETRAINED: dict[str, dict] = {
    "fashion_mnist_ddpm": dict(
        file="fashion_mnist_ddpm.pt",
        sha256="ac9200d0fba4796e0d66746dd8e4b99bfb23b2c291bd835a7e1b3628e5a326b2",
        # 3250 steps (3.5 epochs) in 102 minutes on a shared 2-core CPU with one torch thread
        recipe=("python -m ddpm_lib train --checkpoint runs/fashion_ddpm.pt --batch-size 64 --lr 5e-4 "
                "--warmup-steps 200 --ema-decay 0.999 --base-channels 32 --channel-mults 1,2,2 "
                "--num-res-blocks 1 --attention-resolutions 7 --dropout 0.0 --steps 3250; "
                "python -m ddpm_lib export runs/fashion_ddpm.pt ddpm_lib/weights/fashion_mnist_ddpm.pt"),
    ),
    "fashion_mnist_cfg": dict(
        file="fashion_mnist_cfg.pt",
        sha256="1753d8ee84845c73c64471317fda7014cd6d9c97fd409daac00a8c96a9cd180a",
        # class-conditional (10 classes + the null label), label dropout 0.1: 4035 steps at batch
        # 128 in 80 s on an NVIDIA H200 (fast path, compilation included)
        recipe="python scripts/train_part3.py cfg --out ddpm_lib/weights --budget 80",
    ),
    "fashion_mnist_latent": dict(
        file="fashion_mnist_latent_unet.pt",
        sha256="c2a7080357e831f63a5d28565d85a1eeb1065d395fbb5e728bac806094a65663",
        # a UNet on the 4x7x7 latents of the shipped VAE (load_pretrained_vae): 1099 steps at
        # batch 128 in 1500 s on a shared 2-core CPU with one thread (results/latent_vs_pixel_cpu.json)
        recipe=("python scripts/train_part3.py latent --vae ddpm_lib/weights/fashion_mnist_vae.pt "
                "--only latent --threads 1 --budget 1500 --out ddpm_lib/weights"),
    ),
}

# The autoencoder of latent diffusion (ddpm_lib.autoencoder.VAE): 3000 steps at batch 128 on
# an NVIDIA H200
PRETRAINED_VAE = dict(file="fashion_mnist_vae.pt",
                      sha256="b72d734813ee6356d59008f9c33389da4dea0bf5f580a20cd619c9c01339d6e3",
                      recipe="python scripts/train_part3.py latent --vae-steps 3000 --out ddpm_lib/weights")


def sha256(path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: UNet, schedule: NoiseSchedule, path, meta: dict | None = None) -> str:
    """Write ``model``'s weights (usually the EMA model), its configuration and the schedule's
    betas to ``path``, atomically, in the format :func:`load_weights` reads. Returns the sha256."""
    if getattr(model, "config", None) is None:
        raise ValueError("model has no .config: save_weights takes a ddpm_lib UNet")
    blob = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "model_config": model.config, "betas": schedule.float64("betas"), "meta": dict(meta or {})}
    save_checkpoint(blob, path)
    return sha256(path)


def load_weights(path, device="cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """Load an exported model: ``(model in eval mode, schedule, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "model_config" not in blob:
        raise ValueError(f"{path} is not a ddpm_lib weights file (made by `python -m ddpm_lib export`)")
    model = UNet(**blob["model_config"]).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), NoiseSchedule(blob["betas"], device=device), blob.get("meta", {})


def load_pretrained(name: str = "fashion_mnist_ddpm", device="cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """Load shipped weights by name, after checking the file's sha256."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; available: {sorted(PRETRAINED) or 'none yet'}")
    entry = PRETRAINED[name]
    path = WEIGHTS_DIR / entry["file"]
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, expected {entry['sha256']}: the file is damaged or "
                         "not the shipped one; reinstall ddpm_lib or fetch the file again")
    return load_weights(path, device)


def load_pretrained_vae(device="cpu"):
    """The shipped Fashion-MNIST VAE (28x28 images <-> 4x7x7 latents), after its sha256 check."""
    from .autoencoder import load_vae
    return load_vae(WEIGHTS_DIR / PRETRAINED_VAE["file"], device, sha256=PRETRAINED_VAE["sha256"])
