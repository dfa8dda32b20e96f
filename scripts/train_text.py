"""Train the text-to-image model of chapter 12 on captioned Fashion-MNIST, on any device, for a
wall-clock budget or a number of steps.

    python scripts/train_text.py --out runs/text --budget 3600 --threads 2
    python scripts/train_text.py --out /tmp/text --max-steps 20 --limit 512     # a quick check

The network is a :class:`ddpm_lib.text.TextConditionedUNet`: the U-Net of the shipped models
(32 base channels, levels 28/14/7, attention at 7x7) with a cross-attention block after each
self-attention, and a 2-layer text encoder of width ``--text-dim``, trained jointly with
caption dropout ``--label-dropout`` (a dropped caption is the empty one, the null of
classifier-free guidance). The data: :func:`ddpm_lib.captions.load_captioned` (one caption per
image from ``--seed``; the held-out pairs' images dropped). It writes into ``--out`` the EMA
weights (``fashion_mnist_text.pt``, the format of ``python -m ddpm_lib export``, loadable with
``ddpm_lib.pretrained.load_weights``) and ``train_text.json``: what was run and measured
(steps, seconds, seconds per 100 steps, the loss, the 1-minute load average before and after).
Training stops at ``--max-steps`` or at the first step past ``--budget`` seconds.

``--checkpoint`` makes the run resumable: the full training state is written to
``--out``/checkpoint.pt every 200 steps and at the end, and the same command run again
continues from it (give ``--max-steps`` as the total: the learning rate is constant after the
warm-up, so the total does not change the run). The JSON then records where this part started
(``resumed_from``) and only this part's seconds.

    python scripts/train_text.py --out runs/text --budget 3000 --max-steps 6000 --checkpoint
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

from ddpm_lib import captions, recipes
from ddpm_lib.bench import cpu_name
from ddpm_lib.io import load_checkpoint
from ddpm_lib.pretrained import save_weights
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.text import TextConditionedUNet
from ddpm_lib.train import train
from ddpm_lib.unet import count_parameters

UNET = dict(recipes.SMALL_UNET, num_heads=4)   # the shipped pixel network, 4 attention heads


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/text"))
    p.add_argument("--budget", type=float, default=600.0, help="training seconds (wall clock)")
    p.add_argument("--max-steps", type=int, default=10**7, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1, help="P(caption -> empty caption)")
    p.add_argument("--base-channels", type=int, default=UNET["base_channels"])
    p.add_argument("--text-dim", type=int, default=64, help="width of the text encoder")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the captions' seed and the run's seed")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", action="store_true",
                   help="write --out/checkpoint.pt every 200 steps and resume from it when present")
    args = p.parse_args()
    if args.max_steps < 1 or not args.budget > 0:
        p.error("--max-steps must be >= 1 and --budget > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    data = captions.load_captioned("train", limit=args.limit, seed=args.seed)
    schedule = NoiseSchedule.linear()
    torch.manual_seed(args.seed)
    network = dict(UNET, base_channels=args.base_channels)
    model = TextConditionedUNet(text_dim=args.text_dim, text_layers=args.text_layers, **network)
    recipe = dict(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                  ema_decay=args.ema_decay, grad_clip=1.0, label_dropout=args.label_dropout,
                  seed=args.seed, log_every=10 if args.max_steps < 1000 else 100)

    checkpoint = args.out / "checkpoint.pt" if args.checkpoint else None
    resumed_from = load_checkpoint(checkpoint)["step"] if checkpoint and checkpoint.exists() else 0
    if checkpoint:
        recipe["checkpoint_every"] = 200
    load_before = os.getloadavg()[0]        # was the machine idle? (1-minute load average)
    start = time.perf_counter()
    result = train(model, schedule, data.images, labels=data.tokens, steps=args.max_steps,
                   device=device, progress=False, checkpoint=checkpoint,
                   callback=lambda step, m, e: time.perf_counter() - start >= args.budget,
                   **recipe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    info = dict(
        steps=result.step, resumed_from=resumed_from, seconds=round(seconds, 1),
        seconds_per_100_steps=round(100 * seconds / max(result.step - resumed_from, 1), 1),
        final_loss=result.history["loss"][-1] if result.history["loss"] else None,
        losses=dict(step=result.history["step"], loss=result.history["loss"]),
        params=count_parameters(model), images=len(data.labels), limit=args.limit,
        held_out=captions.held_out_pairs(), device=device_name(device), recipe=recipe,
        network=model.config | {"vocabulary": len(model.vocabulary)},
        load_average_before=round(load_before, 2), load_average_after=round(os.getloadavg()[0], 2),
        date=time.strftime("%Y-%m-%d"), how="python " + shlex.join(sys.argv),
        torch=str(torch.__version__))
    info["sha256"] = save_weights(result.ema_model, schedule, args.out / "fashion_mnist_text.pt",
                                  {k: v for k, v in info.items() if k != "losses"})
    (args.out / "train_text.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
