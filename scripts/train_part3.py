"""Train the Part III models that ship with the book, on any device, for a wall-clock budget.

    python scripts/train_part3.py cfg    --out ddpm_lib/weights --budget 100
    python scripts/train_part3.py latent --out ddpm_lib/weights --budget 45 --vae-steps 4000
    python scripts/train_part3.py latent --vae ddpm_lib/weights/fashion_mnist_vae.pt \
        --out results/equal_time_cpu --budget 600 --warmup-steps 20 --threads 1

``cfg``: the class-conditional U-Net of the guidance chapter (the shipped unconditional
network's configuration plus a class embedding with a learned null class), trained with
label dropout 0.1 (Ho & Salimans 2022). ``latent``: the VAE of the latent-diffusion chapter,
then a U-Net on its 4x7x7 latents; and, for the comparison at equal training time, a pixel
U-Net trained for the same budget from scratch. Each writes its weights (EMA, exported like
``python -m ddpm_lib export``) and a JSON of what it measured (steps, seconds, throughput)
into ``--out``. The budget stops training at the first step past it (compilation included).
Without ``--only``, the latent and the pixel model train one after the other, with the same
recipe and warm-up (the third command: Chapter 10's comparison at equal training time); the
JSON records the 1-minute load average before and after each, to show the machine was idle.
The book keeps that run's files in ddpm_lib/results/ under the names Chapter 10 reads:
train_latent.json -> latent_vs_pixel_cpu.json, fashion_mnist_latent_unet.pt ->
fashion_mnist_latent_equal_time.pt, fashion_mnist_pixel_equal_time.pt unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ddpm_lib import autoencoder, data, recipes
from ddpm_lib.bench import cpu_name
from ddpm_lib.pretrained import save_weights, sha256
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.train import train
from ddpm_lib.unet import UNet, count_parameters

SMALL = recipes.SMALL_UNET                   # the network of every shipped pixel model
RECIPE = dict(recipes.SHIPPED, log_every=100)   # chapter 5's recipe (batch 128, lr 5e-4)


def budget_stop(seconds: float, start: float):
    return lambda step, model, ema: time.perf_counter() - start >= seconds


def export(result, schedule, path: Path, meta: dict) -> str:
    return save_weights(result.ema_model, schedule, path, meta)


def timed_train(model, schedule, images, budget, device, **kw):
    load_before = os.getloadavg()[0]  # was the machine idle? (1-minute load average)
    start = time.perf_counter()
    result = train(model, schedule, images, steps=10**7, device=device, progress=False,
                   callback=budget_stop(budget, start), **{**RECIPE, **kw})
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, batch_size = time.perf_counter() - start, kw.get("batch_size", RECIPE["batch_size"])
    return result, dict(steps=result.step, seconds=round(seconds, 1), batch_size=batch_size,
                        images_per_s=round(result.step * batch_size / seconds, 1),
                        final_loss=result.history["loss"][-1] if result.history["loss"] else None,
                        load_average_before=round(load_before, 2), load_average_after=round(os.getloadavg()[0], 2))


def cmd_cfg(args, device, images, labels, schedule) -> dict:
    torch.manual_seed(0)
    model = UNet(**SMALL, num_classes=10)
    result, info = timed_train(model, schedule, images, args.budget, device, labels=labels, label_dropout=0.1)
    info.update(params=count_parameters(model), device=_device_name(device), recipe={**RECIPE, "label_dropout": 0.1})
    info["sha256"] = export(result, schedule, args.out / "fashion_mnist_cfg.pt", info)
    return info


def cmd_latent(args, device, images, labels, schedule) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.vae:              # an autoencoder trained before (its own JSON says how)
        vae = autoencoder.load_vae(args.vae, device)
        vae_info = dict(file=str(args.vae), sha256=sha256(args.vae))
    else:
        vae = autoencoder.VAE()
        vae_history = autoencoder.train_autoencoder(vae, images, steps=args.vae_steps, batch_size=128, lr=1e-3,
                                                    device=device, progress=False)
        vae_info = dict(steps=args.vae_steps, seconds=round(time.perf_counter() - start, 1),
                        final_loss=vae_history["loss"][-1],
                        sha256=autoencoder.save_vae(vae, args.out / "fashion_mnist_vae.pt"))
    test_images, _ = data.load("fashion_mnist", "test")
    rec = autoencoder.reconstruction_error(vae, test_images)
    vae_info.update(test_mse=rec["mse"], test_psnr=rec["psnr"], scale_factor=vae.scale_factor,
                    params=count_parameters(vae))
    info = dict(device=_device_name(device), budget_s=args.budget, threads=torch.get_num_threads(),
                recipe=dict(RECIPE), vae=vae_info)
    if args.only in (None, "latent"):
        latents = autoencoder.encode_dataset(vae, images)
        torch.manual_seed(0)
        latent_model = autoencoder.latent_unet(vae.latent_shape, base_channels=args.latent_channels, dropout=0.0)
        latent_result, latent_info = timed_train(latent_model, schedule, latents, args.budget, device,
                                                 check_range=False)
        latent_info.update(params=count_parameters(latent_model))
        latent_info["sha256"] = export(latent_result, schedule, args.out / "fashion_mnist_latent_unet.pt", latent_info)
        info["latent"] = latent_info
    if args.only in (None, "pixel"):
        torch.manual_seed(0)
        pixel_model = UNet(**SMALL)
        pixel_result, pixel_info = timed_train(pixel_model, schedule, images, args.budget, device)
        pixel_info.update(params=count_parameters(pixel_model))
        pixel_info["sha256"] = export(pixel_result, schedule, args.out / "fashion_mnist_pixel_equal_time.pt", pixel_info)
        info["pixel"] = pixel_info
    return info


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {os.cpu_count()} logical CPUs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["cfg", "latent"])
    p.add_argument("--out", type=Path, default=Path("ddpm_lib/weights"))
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per diffusion model")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--latent-channels", type=int, default=64, help="base channels of the latent U-Net")
    p.add_argument("--vae", type=Path, default=None, help="latent: use this trained VAE file")
    p.add_argument("--only", choices=["latent", "pixel"], default=None, help="latent: train only this model")
    p.add_argument("--warmup-steps", type=int, default=RECIPE["warmup_steps"],
                   help="learning-rate warm-up in steps, the same for every model of the run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (for a quick check)")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    RECIPE["warmup_steps"] = args.warmup_steps
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = data.load("fashion_mnist", "train", limit=args.limit)
    schedule = NoiseSchedule.linear()
    info = (cmd_cfg if args.what == "cfg" else cmd_latent)(args, device, images, labels, schedule)
    info["date"] = time.strftime("%Y-%m-%d")
    info["how"] = "python " + shlex.join(sys.argv)
    info["torch"] = torch.__version__
    (args.out / f"train_{args.what}{'_' + args.only if args.only else ''}.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
