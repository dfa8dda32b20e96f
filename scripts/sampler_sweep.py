"""Score samples of the shipped models for the Part III chapters; write one JSON.

    python scripts/sampler_sweep.py --n 2000 --out ddpm_lib/results/sweep.json [--weights ddpm_lib/weights]

* ``samplers``: the pretrained unconditional model with DDPM (1000 steps), DDIM (eta 0) and
  DPM-Solver++(2M) at several numbers of network evaluations (NFE);
* ``guidance``: the class-conditional model with classifier-free guidance at several w,
  n/10 samples per class: accuracy of the shipped classifier on them, and the scores;
* ``latent``: latent diffusion vs the pixel model trained for the same time;
* ``grid``: solver and timestep grid as two separate factors: DDIM (DPM-Solver++ of order
  1) and DPM-Solver++(2M), each on the grid even in t and on the grid even in log-SNR;
* ``sde``: the solvers of the reverse SDE and the probability-flow ODE at a budget of
  network evaluations (``--nfe``), each on three grids (even in t, EDM's noise levels, even
  in log-SNR): Euler-Maruyama (stochastic, first order), DDIM (= Euler on the ODE, first
  order), Heun (second order, two calls per step but the last: ``steps = (nfe + 1) // 2``)
  and DPM-Solver++(2M) (second order, one call per step);
* ``floor``: real held-out images of the same count.

Every score is :func:`ddpm_lib.metrics.evaluate` against the training set's features.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lib import autoencoder, book, features, metrics
from ddpm_lib.pretrained import load_pretrained, load_weights
from ddpm_lib.samplers import dpm_solver_sample, guided_model
from ddpm_lib.samplers import sample as run_sampler


def sample(model, schedule, n, sampler, nfe, device, batch, seed=0, clip_x0=True, **options):
    """n samples of the UNet ``model`` (shape from its config), in batches, and the seconds it
    took. ``sampler``: a key of ``SAMPLERS``, run with ``nfe`` network calls; ``options`` go to
    :func:`ddpm_lib.samplers.sample` (``spacing``, and the sampler's own, e.g. ``order``)."""
    c = model.config
    out = []
    start = time.perf_counter()
    for i in range(0, n, batch):
        g = torch.Generator(device).manual_seed(seed + i)
        shape = (min(batch, n - i), c["in_channels"], c["image_size"], c["image_size"])
        x = run_sampler(model, schedule, shape, sampler=sampler, steps=nfe, generator=g, device=device,
                        clip_x0=clip_x0, **options)
        out.append(x.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--weights", type=Path, default=Path("ddpm_lib/weights"))
    p.add_argument("--out", type=Path, default=Path("ddpm_lib/results/sweep.json"))
    p.add_argument("--nfe", default="5,10,20,50,100")
    p.add_argument("--ddpm", action="store_true", help="also DDPM with all 1000 steps")
    p.add_argument("--w", default="0,1,2,3,5")
    p.add_argument("--parts", default="floor,samplers,guidance,latent")
    p.add_argument("--grids", default="time,edm,logsnr", help="the grids of the sde part")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = args.parts.split(",")
    ref = features.reference_features("fashion_mnist", "train")
    result = dict(n=args.n, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    def score(x):
        return metrics.evaluate(x, real_features=ref)

    if "floor" in parts:
        result["floor"] = metrics.real_floor(args.n, real_features=ref)
        print("floor", result["floor"], flush=True)
        save()
    if "samplers" in parts:
        model, schedule, _ = load_pretrained(device=device)
        rows = []
        runs = [("ddpm", schedule.T)] if args.ddpm else []
        # chapter 8's two fast samplers at each NFE (one network call per step; the solvers
        # of ddpm_lib.sde, Heun's two calls per step included, are the "sde" part's)
        runs += [(s, int(k)) for s in ("ddim", "dpm_solver") for k in args.nfe.split(",")]
        for sampler, nfe in runs:
            x, seconds = sample(model, schedule, args.n, sampler, nfe, device, args.batch)
            rows.append(dict(sampler=sampler, nfe=nfe, seconds=round(seconds, 2), **score(x)))
            print(rows[-1], flush=True)
            result["samplers"] = rows
            save()
    if "sde" in parts:
        model, schedule, _ = load_pretrained(device=device)
        rows = []
        for nfe in (int(k) for k in args.nfe.split(",")):
            for spacing in args.grids.split(","):
                for solver in ("euler_maruyama", "ddim", "heun", "dpm_solver"):
                    steps = (nfe + 1) // 2 if solver == "heun" else nfe
                    calls = 2 * steps - 1 if solver == "heun" else steps
                    x, seconds = sample(model, schedule, args.n, solver, steps, device, args.batch,
                                        spacing=spacing)
                    rows.append(dict(solver=solver, spacing=spacing, steps=steps, nfe=calls,
                                     seconds=round(seconds, 2), **score(x)))
                    print(rows[-1], flush=True)
                    result["sde"] = rows
                    save()
    if "grid" in parts:
        model, schedule, _ = load_pretrained(device=device)
        rows = []
        for nfe in (int(k) for k in args.nfe.split(",")):
            for order, solver in ((1, "ddim"), (2, "dpm_solver_2m")):
                for spacing in ("time", "logsnr"):
                    x, seconds = sample(model, schedule, args.n, "dpm_solver", nfe, device, args.batch,
                                        order=order, spacing=spacing)
                    rows.append(dict(solver=solver, spacing=spacing, nfe=nfe, seconds=round(seconds, 2),
                                     **score(x)))
                    print(rows[-1], flush=True)
                    result["grid"] = rows
                    save()
    if "guidance" in parts and (args.weights / "fashion_mnist_cfg.pt").exists():
        model, schedule, _ = load_weights(args.weights / "fashion_mnist_cfg.pt", device)
        y = torch.arange(10).repeat_interleave(args.n // 10)
        rows = []
        for w in (float(v) for v in args.w.split(",")):
            xs = []
            for i in range(0, len(y), args.batch):
                y_batch = y[i:i + args.batch].to(device)
                g = torch.Generator(device).manual_seed(i)
                xs.append(dpm_solver_sample(guided_model(model, y_batch, w), schedule, (len(y_batch), 1, 28, 28),
                                            steps=20, generator=g, device=device).cpu())
            x = torch.cat(xs)
            rows.append(dict(w=w, accuracy=metrics.classifier_accuracy(x, y), **score(x)))
            print(rows[-1], flush=True)
            result["guidance"] = rows
            save()
    if "latent" in parts and (args.weights / "fashion_mnist_vae.pt").exists():
        vae = autoencoder.load_vae(args.weights / "fashion_mnist_vae.pt", device)
        # the two models of Chapter 10's equal-time run (ddpm_lib/results/latent_vs_pixel_cpu.json)
        latent_model, schedule, _ = load_weights(
            book.result_path("fashion_mnist_latent_equal_time.pt"), device)
        pixel_model, _, _ = load_weights(
            book.result_path("fashion_mnist_pixel_equal_time.pt"), device)
        z, seconds = sample(latent_model, schedule, args.n, "dpm_solver", 20, device, args.batch, clip_x0=False)
        x = torch.cat([vae.decode_latents(z[i:i + args.batch].to(device)).cpu() for i in range(0, len(z), args.batch)])
        result["latent"] = dict(seconds=round(seconds, 2), **score(x))
        x, seconds = sample(pixel_model, schedule, args.n, "dpm_solver", 20, device, args.batch)
        result["pixel_equal_time"] = dict(seconds=round(seconds, 2), **score(x))
        print(result["latent"], result["pixel_equal_time"], flush=True)
        save()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
