"""Command line: train, export and sample without notebooks.

    python -m ddpm_lib train  --checkpoint runs/fashion.pt --steps 20000
    python -m ddpm_lib export runs/fashion.pt weights.pt
    python -m ddpm_lib sample --weights weights.pt --n 64 --out samples.png --npy samples.npy
    torchrun --nproc_per_node=4 -m ddpm_lib train --checkpoint runs/fashion.pt   # several GPUs

``train`` resumes from ``--checkpoint`` when it exists. ``export`` keeps the EMA weights,
the model's configuration and the schedule, in a file that loads with
``torch.load(..., weights_only=True)``. ``sample`` writes a PNG grid and a ``.npy`` of
uint8 images of shape (N, H, W) (or (N, H, W, 3) for colour).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .pretrained import load_weights, save_weights
from .samplers import ddim_sample, ddpm_sample
from .schedules import NoiseSchedule
from .train import TrainConfig, distributed_info, init_distributed, load_checkpoint, train
from .unet import UNet, count_parameters


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _switch(text: str):
    """auto -> None (on on a GPU), on -> True, off -> False."""
    return {"auto": None, "on": True, "off": False}[text]


def cmd_train(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = data.load(args.data, "train", limit=args.limit)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:   # started by torchrun
        device = init_distributed()
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    schedule = (NoiseSchedule.cosine(args.T) if args.schedule == "cosine" else NoiseSchedule.linear(args.T))
    torch.manual_seed(args.seed)
    model = UNet(in_channels=images.shape[1], base_channels=args.base_channels,
                 channel_mults=_ints(args.channel_mults), num_res_blocks=args.num_res_blocks,
                 attention_resolutions=_ints(args.attention_resolutions), dropout=args.dropout,
                 num_classes=10 if args.conditional else None, image_size=images.shape[-1])
    main_process = distributed_info()[0] == 0
    if main_process:
        print(f"{args.data}: {len(images)} images | UNet {count_parameters(model):,} parameters | {device}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         hflip=args.hflip, bf16=_switch(args.bf16), fp16=_switch(args.fp16),
                         channels_last=_switch(args.channels_last),
                         compile={"auto": None, "off": False}.get(args.compile, args.compile))
    start = time.time()
    result = train(model, schedule, images, config, labels=labels if args.conditional else None,
                   checkpoint=args.checkpoint, device=device, progress=not args.no_progress)
    if main_process:
        resumed = f"resumed from step {result.resumed_from}, " if result.resumed_from is not None else ""
        print(f"{resumed}trained to step {result.step} in {time.time() - start:.0f} s this run; "
              f"last loss {result.history['loss'][-1] if result.history['loss'] else float('nan'):.4f}; "
              f"checkpoint {args.checkpoint}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cmd_export(args) -> None:
    state = load_checkpoint(args.checkpoint)
    if state.get("model_config") is None:
        raise ValueError(f"{args.checkpoint} has no model configuration; it was not made by ddpm_lib.train")
    meta = {"step": state["step"], "train_config": state["config"], "source": Path(args.checkpoint).name}
    if args.meta:
        meta.update(json.loads(args.meta))
    ema_model = UNet(**state["model_config"])
    ema_model.load_state_dict(state["ema"]["model"])
    digest = save_weights(ema_model, NoiseSchedule(state["betas"]), args.out, meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB), sha256 {digest}")


def cmd_sample(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, schedule, _ = load_weights(args.weights, device)
    c, s = model.config["in_channels"], model.config["image_size"]
    g = torch.Generator(device).manual_seed(args.seed)
    shape = (args.n, c, s, s)
    with torch.no_grad():
        if args.sampler == "ddpm":
            x = ddpm_sample(model, schedule, shape, generator=g, progress=True)
        else:
            x = ddim_sample(model, schedule, shape, steps=args.steps, eta=args.eta, generator=g, progress=True)
    from .viz import save_grid
    if args.out:
        save_grid(x, args.out, nrow=int(np.ceil(np.sqrt(args.n))))
        print(f"wrote {args.out}")
    if args.npy:
        u8 = data.to_uint8(x)
        u8 = u8[:, 0] if c == 1 else u8.transpose(0, 2, 3, 1)
        np.save(args.npy, u8)
        print(f"wrote {args.npy} {u8.shape} {u8.dtype}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddpm_lib", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a UNet with L_simple (resumes from --checkpoint)")
    t.add_argument("--data", default="fashion_mnist", choices=sorted(data.DATASETS))
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--ema-decay", type=float, default=0.9999)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--T", type=int, default=1000)
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    t.add_argument("--base-channels", type=int, default=64)
    t.add_argument("--channel-mults", default="1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=2)
    t.add_argument("--attention-resolutions", default="7")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--conditional", action="store_true", help="class-conditional (labels, null class)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--device", default=None)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips (CIFAR-10; not for digits)")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on GPUs of compute capability 8 and newer)")
    t.add_argument("--fp16", choices=["auto", "on", "off"], default="auto",
                   help="fp16 autocast with loss scaling (auto: on older GPUs such as the T4, when --bf16 is auto)")
    t.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    t.add_argument("--compile", choices=["auto", "off", "default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"], default="auto",
                   help="torch.compile mode (auto: reduce-overhead on a GPU, off on a CPU)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="keep the EMA weights of a checkpoint for sampling")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--meta", default=None, help="JSON object of extra metadata to store")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("sample", help="sample images: a PNG grid and/or a .npy of uint8")
    s.add_argument("--weights", required=True)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npy", default=None)
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_sample)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
