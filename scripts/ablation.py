"""The training ablation of issue #22: what buys sample quality per second of CPU training.

    python scripts/ablation.py run shipped x0 v --budget 600 --threads 2
    python scripts/ablation.py run shipped --seed 1
    python scripts/ablation.py table

Every row is the shipped recipe (``shipped``: chapter 5's recipe on the book's small U-Net,
eps-prediction, uniform weights, linear schedule) with one thing changed
(``ddpm_lib.recipes.ABLATION``; ``a+b`` combines two rows). A run trains on the 60,000
Fashion-MNIST training images for ``--budget`` seconds of wall clock (stopping at the first step past
it), keeps ``--snapshots`` snapshots of the EMA weights evenly spaced in time (default 2: at
half the budget and at the end), then scores each: ``--n`` samples of DDIM in ``--steps`` steps
from a fixed noise, by the Frechet distance of the shipped classifier's features to the
training set's (``ddpm_lib.metrics``), next to the floor of ``--n`` real test images. Training
and scoring run one after the other in one process; run the rows one after the other on an
otherwise idle machine (the JSON records the 1-minute load average before and after training).
Each run adds a record to ``--out/ablation.json`` (written atomically) and its weights to
``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ddpm_lib import data, features, metrics, recipes
from ddpm_lib.bench import cpu_name


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": records}, indent=1) + "\n")
    os.replace(tmp, path)


def run_row(name: str, args, images, reference, floor: dict) -> dict:
    """Train row ``name`` for the budget (:func:`ddpm_lib.recipes.timed_run`), then score each
    snapshot (:func:`ddpm_lib.recipes.score`); the record that goes into the JSON."""
    record = recipes.timed_run(name, images, args.budget, args.out, seed=args.seed,
                               snapshots=args.snapshots)
    t0 = time.perf_counter()
    curve = [dict(seconds=s["seconds"], step=s["step"],
                  fd=round(recipes.score(s["path"], args.n, args.steps, reference), 2))
             for s in record.pop("snapshots")]
    half = [c for c in curve if c["seconds"] >= args.budget / 2][0]
    return dict(record, half=half, full=curve[-1], curve=curve, fd_floor=round(floor["fid"], 2),
                n=args.n, sampler=f"ddim-{args.steps}", scoring_s=round(time.perf_counter() - t0, 1),
                finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"cpu ({cpu_name()}, {os.cpu_count()} logical CPUs, "
                        f"{torch.get_num_threads()} threads)",
                command=" ".join(["python", *sys.argv]))


def cmd_run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        try:
            recipes.settings(name)                   # unknown rows fail before any training
        except ValueError as err:
            raise SystemExit(f"error: {err}")
    images, _ = data.load("fashion_mnist", "train")
    reference = features.reference_features()
    floor = metrics.real_floor(args.n, real_features=reference)
    path = args.out / "ablation.json"
    for name in args.rows:
        record = run_row(name, args, images, reference, floor)
        records = [r for r in load_records(path) if (r["row"], r["seed"]) != (name, args.seed)]
        write_records(path, records + [record])
        print(f"{name:>16} seed {args.seed}: {record['steps']:5d} steps, "
              f"FD {record['half']['fd']:7.2f} at {record['half']['seconds']} s, "
              f"{record['full']['fd']:7.2f} at {record['seconds']} s "
              f"(floor {record['fd_floor']}); load {record['load_average_before']} -> "
              f"{record['load_average_after']}", flush=True)


def cmd_table(args) -> None:
    records = load_records(args.out / "ablation.json")
    print(f"{'row':>16} {'seed':>4} {'steps':>6} {'img/s':>6} {'FD half':>8} {'FD full':>8} "
          f"{'x floor':>7}")
    for r in sorted(records, key=lambda r: r["full"]["fd"]):
        print(f"{r['row']:>16} {r['seed']:>4} {r['steps']:>6} {r['images_per_s']:>6} "
              f"{r['half']['fd']:>8} {r['full']['fd']:>8} {r['full']['fd'] / r['fd_floor']:>7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score rows, one after the other")
    r.add_argument("rows", nargs="+", help=f"rows: {', '.join(recipes.ABLATION)}; combine with +")
    r.add_argument("--budget", type=float, default=600.0, help="training seconds per row")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--n", type=int, default=500, help="samples scored per snapshot")
    r.add_argument("--steps", type=int, default=50, help="DDIM steps of the scored samples")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    r.add_argument("--snapshots", type=int, default=2, help="EMA snapshots scored, evenly spaced "
                   "in time, the last at the end (2: at half the budget and at the end)")
    t = sub.add_parser("table", help="print the runs so far, best first")
    for q in (r, t):
        q.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = p.parse_args()
    if args.command == "run":
        torch.set_num_threads(args.threads)
        cmd_run(args)
    else:
        cmd_table(args)


if __name__ == "__main__":
    main()
