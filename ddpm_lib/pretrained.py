"""Weights that ship with the book, and loading exported weights.

``python -m ddpm_lib export`` (or :func:`save_weights`) writes a file that holds the EMA
weights, the network's configuration (a UNet's, or a text model's: its vocabulary, encoder
size and U-Net, chapter 12) and the schedule's betas; :func:`load_weights` reads it back with
``torch.load(..., weights_only=True)`` (no pickled code is ever run). :func:`load_pretrained`
loads a model that ships inside the package, after checking its sha256.
"""
from __future__ import annotations

from pathlib import Path

from .autoencoder import VAE, load_vae
from .io import FILE_KINDS, file_kind, load_verified, save_checkpoint, sha256
from .schedules import NoiseSchedule
from .text import TextConditionedUNet
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
        # batch 128 in 1500 s on a shared 2-core CPU with one thread, trained at the same time as a
        # pixel U-Net (ddpm_lib/results/train_latent_shipped_cpu.json)
        recipe=("python scripts/train_part3.py latent --vae ddpm_lib/weights/fashion_mnist_vae.pt "
                "--only latent --threads 1 --budget 1500 --out ddpm_lib/weights"),
        latent=True,        # its samples are latents: decode them with load_pretrained_vae()
    ),
    "fashion_mnist_text": dict(
        file="fashion_mnist_text.pt",
        sha256="f4b0f4a5f0c01f49facccd12641e1eacbae7404d88b02942aa4b0689d604c2fb",
        # the text-to-image model of chapter 12 (TextConditionedUNet, 1.28 M parameters): 3871
        # steps at batch 128 in 6102 s on a 2-core CPU (AMD EPYC, 2 threads), in two parts, the
        # second resumed from the first's checkpoint (ddpm_lib/results/train_text_cpu.json)
        recipe=("python scripts/train_text.py --out runs/text --budget 2100 --max-steps 6000 "
                "--checkpoint --threads 2; python scripts/train_text.py --out runs/text --budget "
                "4000 --max-steps 4000 --checkpoint --threads 2; "
                "cp runs/text/fashion_mnist_text.pt ddpm_lib/weights/"),
    ),
}

# The autoencoder of latent diffusion (ddpm_lib.autoencoder.VAE): 3000 steps at batch 128 on
# an NVIDIA H200
PRETRAINED_VAE = dict(file="fashion_mnist_vae.pt",
                      sha256="b72d734813ee6356d59008f9c33389da4dea0bf5f580a20cd619c9c01339d6e3",
                      recipe="python scripts/train_part3.py latent --vae-steps 3000 --out ddpm_lib/weights")


def save_weights(model: UNet, schedule: NoiseSchedule, path, meta: dict | None = None) -> str:
    """Write ``model``'s weights (usually the EMA model), its configuration and the schedule's
    betas to ``path``, atomically, in the format :func:`load_weights` reads. Returns the sha256.
    Used in chapter 11, "Mixed precision: bf16" (snapshots of the EMA weights); the format is
    the one ``export`` writes in chapter 5, "A simulated disconnect". A text model's
    configuration round-trips too (chapter 12, "Training on captions")."""
    if getattr(model, "config", None) is None:
        raise ValueError("model has no .config: save_weights takes a ddpm_lib UNet")
    blob = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "model_config": model.config, "betas": schedule.float64("betas"), "meta": dict(meta or {})}
    save_checkpoint(blob, path)
    return sha256(path)


def prediction_of(meta: dict) -> str:
    """What the network of a weights file predicts (``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``):
    ``meta["prediction"]``, else its training configuration's, else ``"eps"`` (every file made
    before the target was recorded, the shipped ones included, predicts eps)."""
    return meta.get("prediction") or (meta.get("train_config") or {}).get("prediction", "eps")


def build_model(model_config: dict) -> UNet:
    """The (untrained) network a saved ``model_config`` describes: a
    :class:`~ddpm_lib.text.TextConditionedUNet` when it holds a ``vocabulary`` (chapter 12),
    else a :class:`~ddpm_lib.unet.UNet`. Taught in chapter 12, "Training on captions"."""
    if "vocabulary" in model_config:
        return TextConditionedUNet(**model_config)
    return UNet(**model_config)


def _not_weights_advice(path: Path, kind: str) -> str:
    if kind == "checkpoint":
        return f"export its EMA weights first: python -m ddpm_lib export {path} weights.pt"
    if kind == "vae":
        return "load it with ddpm_lib.autoencoder.load_vae"
    return "pass a file made by `python -m ddpm_lib export` (or save_weights)"


def load_weights(path, device="cpu", sha256: str | None = None) -> tuple[UNet, NoiseSchedule, dict]:
    """Load an exported model: ``(model in eval mode, schedule, metadata)``.

    With ``sha256``, the file's digest is checked first. A missing file raises
    ``FileNotFoundError``; an unreadable one, or a file of another kind (a training
    checkpoint, say), a ``ValueError`` that says what the file is and what to pass instead.
    Used in chapter 5, "A simulated disconnect" (``ch05-checkpoints``), for an exported file.
    """
    path = Path(path)
    remedy = ("reinstall ddpm_lib or fetch the file again" if sha256 is not None
              else "export it again (python -m ddpm_lib export CHECKPOINT OUT) or fetch it again")
    blob = load_verified(path, sha256, map_location=device, what="weights file", remedy=remedy)
    kind = file_kind(blob)
    if kind != "weights":
        raise ValueError(f"{path} is not a ddpm_lib weights file (made by `python -m ddpm_lib "
                         f"export`): it is {FILE_KINDS[kind]}; {_not_weights_advice(path, kind)}")
    model = build_model(blob["model_config"]).to(device)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the network its model_config "
                         f"describes ({e})") from e
    return model.eval(), NoiseSchedule(blob["betas"], device=device), blob.get("meta", {})


def load_pretrained(name: str = "fashion_mnist_ddpm", device="cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """Load shipped weights by name, after checking the file's sha256.
    Taught in chapter 5, "The final model"; chapters 3 and 6 to 11 use it too."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; available: {sorted(PRETRAINED) or 'none yet'}")
    entry = PRETRAINED[name]
    return load_weights(WEIGHTS_DIR / entry["file"], device, sha256=entry["sha256"])


def load_pretrained_vae(device="cpu") -> VAE:
    """The shipped Fashion-MNIST VAE (28x28 images <-> 4x7x7 latents), after its sha256 check.
    Used in chapter 10, "The shipped autoencoder"."""
    return load_vae(WEIGHTS_DIR / PRETRAINED_VAE["file"], device, sha256=PRETRAINED_VAE["sha256"])
