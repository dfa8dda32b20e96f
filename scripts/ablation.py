"""The training ablation of issue #22: what buys sample quality per second of CPU training.

    python scripts/ablation.py run shipped x0 v --budget 600 --threads 2
    python scripts/ablation.py run shipped --seed 1
    python scripts/ablation.py table

Every row is the shipped recipe (``shipped``: chapter 5's recipe on the book's small U-Net,
eps-prediction, uniform weights, linear schedule) with one thing changed (:data:`ROWS`). A run
trains on the 60,000 Fashion-MNIST training images for ``--budget`` seconds of wall clock
(stopping at the first step past it), keeps a snapshot of the EMA weights at half the budget,
then scores both snapshots: ``--n`` samples of DDIM in ``--steps`` steps from a fixed noise,
by the Frechet distance of the shipped classifier's features to the training set's
(``ddpm_lib.metrics``), next to the floor of ``--n`` real test images. Training and scoring run
one after the other in one process; run the rows one after the other on an otherwise idle
machine (the JSON records the 1-minute load average before and after training). Each run adds
a record to ``--out/ablation.json`` (written atomically) and its weights to ``--out``.
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

from ddpm_lib import data, features, metrics
from ddpm_lib.bench import cpu_name
from ddpm_lib.pretrained import load_weights, save_weights
from ddpm_lib.samplers import sample
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.train import train
from ddpm_lib.unet import UNet, count_parameters

NET = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
           attention_resolutions=(7,), dropout=0.0, image_size=28)
RECIPE = dict(batch_size=128, lr=5e-4, warmup_steps=200, ema_decay=0.999, grad_clip=1.0,
              log_every=10, prediction="eps", weighting="uniform")
SCHEDULE = dict(kind="linear", zero_terminal_snr=False)

# row -> what it changes from the shipped recipe: "net", "recipe" or "schedule" overrides
ROWS: dict[str, dict] = {
    "shipped": {},
    # prediction target
    "x0": dict(recipe=dict(prediction="x0")),
    "v": dict(recipe=dict(prediction="v")),
    # loss weighting (of the eps loss)
    "min_snr": dict(recipe=dict(weighting="min_snr")),
    "elbo": dict(recipe=dict(weighting="elbo")),
    # schedule (zero terminal SNR needs v- or x0-prediction: it is compared with "v")
    "cosine": dict(schedule=dict(kind="cosine")),
    "zero_snr_v": dict(schedule=dict(zero_terminal_snr=True), recipe=dict(prediction="v")),
    # optimisation
    "lr_1e-3": dict(recipe=dict(lr=1e-3)),
    "lr_2e-3": dict(recipe=dict(lr=2e-3)),
    "warmup_20": dict(recipe=dict(warmup_steps=20)),
    "batch_32": dict(recipe=dict(batch_size=32)),
    "batch_64": dict(recipe=dict(batch_size=64)),
    "ema_0.99": dict(recipe=dict(ema_decay=0.99)),
    # network
    "width_16": dict(net=dict(base_channels=16)),
    "width_48": dict(net=dict(base_channels=48)),
    "depth_2": dict(net=dict(num_res_blocks=2)),
    "no_attention": dict(net=dict(attention_resolutions=())),
}


def row_settings(name: str) -> tuple[dict, dict, dict]:
    """(net, recipe, schedule) of row ``name``; a row "a+b" combines rows a and b."""
    net, recipe, schedule = dict(NET), dict(RECIPE), dict(SCHEDULE)
    for part in name.split("+"):
        if part not in ROWS:
            raise SystemExit(f"unknown row {part!r}; rows: {', '.join(ROWS)} (combine with +)")
        net.update(ROWS[part].get("net", {}))
        recipe.update(ROWS[part].get("recipe", {}))
        schedule.update(ROWS[part].get("schedule", {}))
    return net, recipe, schedule


def build_schedule(kind: str, zero_terminal_snr: bool) -> NoiseSchedule:
    make = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine}[kind]
    return make(1000, zero_terminal_snr=zero_terminal_snr)


def score(path: Path, n: int, steps: int, reference) -> float:
    """Frechet distance of ``n`` DDIM samples of the weights at ``path`` (same noise for all)."""
    model, schedule, meta = load_weights(path)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        x = sample(model, schedule, (n, 1, 28, 28), sampler="ddim", steps=steps,
                   prediction=meta["prediction"], generator=gen)
    return metrics.frechet_distance(features.extract_features(x), reference)


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": records}, indent=1) + "\n")
    os.replace(tmp, path)


def run_row(name: str, args, images, reference, floor: dict) -> dict:
    net_cfg, recipe, sched_cfg = row_settings(name)
    schedule = build_schedule(**sched_cfg)
    torch.manual_seed(args.seed)
    model = UNet(**net_cfg)
    tag = f"{name}_s{args.seed}"
    half = args.out / f"{tag}_half.pt"
    meta = dict(row=name, prediction=recipe["prediction"], seed=args.seed)
    state = {"half_step": None}
    start = time.perf_counter()

    def callback(step, model, ema):
        elapsed = time.perf_counter() - start
        if state["half_step"] is None and elapsed >= args.budget / 2:
            state["half_step"], state["half_s"] = step, round(elapsed, 1)
            save_weights(ema.model, schedule, half,
                         {**meta, "step": step})
        return elapsed >= args.budget

    load_before = os.getloadavg()[0]
    result = train(model, schedule, images, steps=10**7, seed=args.seed, progress=False,
                   callback=callback, **recipe)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    full = args.out / f"{tag}_full.pt"
    save_weights(result.ema_model, schedule, full, {**meta, "step": result.step})
    t0 = time.perf_counter()
    fd_half = score(half, args.n, args.steps, reference)
    fd_full = score(full, args.n, args.steps, reference)
    return dict(row=name, seed=args.seed, net=net_cfg, recipe=recipe, schedule=sched_cfg,
                params=count_parameters(model), steps=result.step, seconds=round(seconds, 1),
                images_per_s=round(result.step * recipe["batch_size"] / seconds, 1),
                final_loss=result.history["loss"][-1],
                half=dict(step=state["half_step"], seconds=state.get("half_s"), fd=round(fd_half, 2)),
                full=dict(step=result.step, seconds=round(seconds, 1), fd=round(fd_full, 2)),
                fd_floor=round(floor["fid"], 2), n=args.n, sampler=f"ddim-{args.steps}",
                scoring_s=round(time.perf_counter() - t0, 1),
                load_average_before=round(load_before, 2), load_average_after=round(load_after, 2),
                finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"cpu ({cpu_name()}, {os.cpu_count()} logical CPUs, "
                        f"{torch.get_num_threads()} threads)",
                command=" ".join(["python", *sys.argv]))


def cmd_run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        row_settings(name)                           # unknown rows fail before any training
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
    r.add_argument("rows", nargs="+", help=f"rows: {', '.join(ROWS)}; combine with +")
    r.add_argument("--budget", type=float, default=600.0, help="training seconds per row")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--n", type=int, default=500, help="samples scored per snapshot")
    r.add_argument("--steps", type=int, default=50, help="DDIM steps of the scored samples")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads")
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
