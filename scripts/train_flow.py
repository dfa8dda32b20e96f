"""Flow matching beside DDPM at equal training, for the flow-matching chapter.

    python scripts/train_flow.py --out runs/flow_cpu --budget 1800 --n 1000 --threads 2

Two models with the same U-Net (the shipped model's configuration), data (Fashion-MNIST
train), seed, batch, optimiser, learning-rate schedule and wall-clock budget, trained one
after the other: ``eps`` (DDPM's L_simple) and ``flow`` (the straight-path velocity,
``prediction="flow"``). Each is then scored with :func:`ddpm_lib.metrics.evaluate` against
the training set's features at each number of network evaluations in ``--nfe``: the DDPM
model with DDIM and DPM-Solver++(2M), the flow model with Euler and Heun on its ODE (Heun:
``(nfe + 1) // 2`` steps, ``2 steps - 1`` calls), all from the same noise; and the floor,
``--n`` real test images. Writes ``--out``/flow_vs_ddpm.json and the two models' EMA weights
(``meta["prediction"]`` says what each predicts). The JSON records the 1-minute load average
before and after each training run, to show whether the machine was idle.

    python scripts/train_flow.py --out runs/flow_noise --weights-from runs/flow_cpu --nfe 10,20 \
        --noise-seeds 2,3 --n 500 --threads 2 --json flow_noise.json

re-scores the two saved models from other draws of the sampling noise (no training): the
spread of the score over noise draws, to read the first run's differences against.
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

from ddpm_lib import data, features, metrics
from ddpm_lib.bench import cpu_name
from ddpm_lib.flow import flow_sample
from ddpm_lib.io import sha256
from ddpm_lib.pretrained import load_weights, save_weights
from ddpm_lib.samplers import sample
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.train import train
from ddpm_lib.unet import UNet

NET = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,),
           dropout=0.0, image_size=28)
RECIPE = dict(batch_size=64, lr=5e-4, warmup_steps=200, ema_decay=0.999, grad_clip=1.0, log_every=50)


def timed_train(prediction, images, schedule, budget, max_steps, seed):
    torch.manual_seed(seed)
    model = UNet(**NET)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = train(model, schedule, images, steps=max_steps, progress=True, seed=seed,
                   prediction=prediction, device="cpu",
                   callback=lambda step, m, ema: time.perf_counter() - start >= budget, **RECIPE)
    seconds = time.perf_counter() - start
    info = dict(prediction=prediction, steps=result.step, seconds=round(seconds, 1),
                images_per_s=round(result.step * RECIPE["batch_size"] / seconds, 1),
                load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2),
                loss=result.history["loss"][-1] if result.history["loss"] else None)
    return result, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the weights")
    p.add_argument("--budget", type=float, default=1800, help="training seconds per model")
    p.add_argument("--max-steps", type=int, default=10**7, help="stop earlier at this many steps")
    p.add_argument("--n", type=int, default=1000, help="samples scored per sampler and NFE")
    p.add_argument("--nfe", default="5,10,20,50", help="network evaluations to score at")
    p.add_argument("--limit", type=int, default=None, help="train on the first LIMIT images only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-from", type=Path, default=None,
                   help="skip training: score the two models saved in this folder by an earlier run")
    p.add_argument("--noise-seeds", default=None,
                   help="comma-separated seeds of the sampling noise (default: seed + 1); "
                        "several measure the score's spread over noise draws")
    p.add_argument("--json", default="flow_vs_ddpm.json", help="name of the JSON written in --out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images = data.load("fashion_mnist", "train")[0]
    images = images[:args.limit] if args.limit else images
    schedule = NoiseSchedule.linear(T=1000)
    out = dict(command=" ".join(shlex.quote(a) for a in sys.argv), device=cpu_name(),
               threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               net=NET, recipe=RECIPE, budget_s=args.budget, n=args.n, training={}, scores=[])
    path = args.out / args.json
    models = {}
    for prediction in ("eps", "flow") if args.weights_from else ():
        weights = args.weights_from / f"fashion_mnist_{prediction}_equal_time.pt"
        models[prediction] = load_weights(weights)[0].eval()
        out[f"sha256_{prediction}"] = sha256(weights)
    for prediction in () if args.weights_from else ("eps", "flow"):
        result, info = timed_train(prediction, images, schedule, args.budget, args.max_steps, args.seed)
        out["training"][prediction] = info
        out[f"sha256_{prediction}"] = save_weights(
            result.ema_model, schedule, args.out / f"fashion_mnist_{prediction}_equal_time.pt",
            meta=dict(info))
        models[prediction] = result.ema_model.eval()
        print(info, flush=True)
        path.write_text(json.dumps(out, indent=1))
    ref = features.reference_features("fashion_mnist", "train")
    out["floor"] = metrics.real_floor(args.n, real_features=ref)
    seeds = [int(k) for k in args.noise_seeds.split(",")] if args.noise_seeds else [args.seed + 1]
    for noise_seed, nfe in ((s, int(k)) for s in seeds for k in args.nfe.split(",")):
        x_T = torch.randn(args.n, 1, 28, 28, generator=torch.Generator().manual_seed(noise_seed))
        runs = {
            ("eps", "ddim", nfe): lambda: sample(models["eps"], schedule, x_T.shape, sampler="ddim",
                                                 steps=nfe, x_T=x_T),
            ("eps", "dpm_solver", nfe): lambda: sample(models["eps"], schedule, x_T.shape,
                                                       sampler="dpm_solver", steps=nfe, x_T=x_T),
            ("flow", "euler", nfe): lambda: flow_sample(models["flow"], x_T.shape, steps=nfe,
                                                        method="euler", x_T=x_T),
            ("flow", "heun", 2 * ((nfe + 1) // 2) - 1): lambda: flow_sample(
                models["flow"], x_T.shape, steps=(nfe + 1) // 2, method="heun", x_T=x_T),
        }
        for (model, sampler, calls), run in runs.items():
            start = time.perf_counter()
            x = run().clamp(-1, 1)
            row = dict(model=model, sampler=sampler, nfe=calls, noise_seed=noise_seed,
                       seconds=round(time.perf_counter() - start, 1), **metrics.evaluate(x, real_features=ref))
            out["scores"].append(row)
            print(row, flush=True)
            path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
