"""The shipped model's negative log-likelihood bound on the Fashion-MNIST test set, in bits
per dimension (ddpm_lib.likelihood.nll_bound), written to ddpm_lib/results/nll_bound_cpu.json for
Chapter 3.

    python scripts/likelihood_bound.py                     # 1000 test images, 32 strata of t
    python scripts/likelihood_bound.py --n 200 --strata 8 --out /tmp/nll.json

Each image gets its own noise and its own draw of one timestep per stratum, so the standard
error over images includes the Monte Carlo noise of the estimate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ddpm_lib.bench import cpu_name
from ddpm_lib.data import load
from ddpm_lib.likelihood import _strata_edges, nll_bound
from ddpm_lib.pretrained import PRETRAINED, load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion_mnist_ddpm", choices=sorted(PRETRAINED))
    p.add_argument("--n", type=int, default=1000, help="test images (the first N)")
    p.add_argument("--strata", type=int, default=32, help="timesteps per image for the sum over t")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], default="beta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "ddpm_lib" / "results" / "nll_bound_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, schedule, _ = load_pretrained(args.model)
    images, _ = load("fashion_mnist", "test", limit=args.n)
    start = time.time()
    bound = nll_bound(model, schedule, images, num_timesteps=args.strata, sigma=args.sigma,
                      generator=torch.Generator().manual_seed(args.seed))
    seconds = time.time() - start
    record = dict(
        model=args.model, sha256=PRETRAINED[args.model]["sha256"], split="test", sigma=args.sigma,
        strata=args.strata, strata_edges=_strata_edges(schedule.T, args.strata).tolist(), seed=args.seed,
        **bound.summary(),
        decoder_standard_error=(bound.decoder.std() / len(images) ** 0.5).item(),
        diffusion_standard_error=(bound.diffusion.std() / len(images) ** 0.5).item(),
        seconds=round(seconds), threads=torch.get_num_threads(), device=cpu_name(),
        cpu_count=os.cpu_count(), torch=torch.__version__, date=datetime.date.today().isoformat(),
        how="python scripts/likelihood_bound.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    tmp = Path(args.out).with_suffix(".json.part")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
