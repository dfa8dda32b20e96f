"""Benchmarks: ddpm_lib's U-Net and training loop beside diffusers' ``UNet2DModel``.

    python -m ddpm_lib.bench                       # both networks, on the GPU if there is one
    python -m ddpm_lib.bench --nets small --steps 20 --json bench.json
    python -m ddpm_lib.bench --time-to-quality 30,60,120

Everything is measured side by side in one process, on one device, so that the ratios hold even
on a noisy machine. Two network sizes, each matched in parameters to a diffusers configuration:

* ``small``: the book's Fashion-MNIST network (1.1M parameters, 28x28x1);
* ``cifar``: the DDPM paper's CIFAR-10 network (35.7M parameters, 32x32x3), 33x the FLOPs.

Every variant trains through the same loop, so fused AdamW, the multi-tensor EMA and the
dataset on the GPU are common to all of them; the variants differ in the network and in
bf16, channels_last and ``torch.compile``. On a GPU without bf16 (T4, V100) the bf16 variants
run in fp16 with loss scaling instead, and are named so.

For each it prints training throughput (images/s), the time of one network evaluation when
sampling (eager, with the variant's autocast only: no channels_last, no compile), peak GPU
memory, and on a GPU the model-FLOPs utilisation (MFU): the FLOPs of that network's forward and
backward pass (counted by ``torch.utils.flop_counter``) per second, over the GPU's dense 16-bit
(bf16, or fp16 where there is no bf16) tensor-core peak. ``--time-to-quality`` trains the small
networks for wall-clock budgets on Fashion-MNIST and scores DDIM samples with :mod:`ddpm_lib.metrics`.

diffusers is needed only here: ``pip install diffusers``."""
from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import time
from pathlib import Path

import torch

from . import data, features, metrics, samplers
from .schedules import NoiseSchedule
from .accel import DEFAULT_COMPILE_MODE, gpu_has_bf16
from .train import train
from .unet import UNet, count_parameters

# Matched configurations: (ddpm_lib UNet kwargs, diffusers UNet2DModel kwargs, image shape)
NETS = {
    "small": (dict(in_channels=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(7,), dropout=0.0, image_size=28),
              dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                   layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
              (1, 28, 28)),
    "cifar": (dict(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), dropout=0.0, image_size=32),
              dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                   layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                         "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
              (3, 32, 32)),
}

# dense 16-bit tensor-core peak, FLOP/s, by a substring of the device name (vendor data
# sheets): bf16, and fp16 for the T4 and V100, which have no bf16. The first key contained in the
# name wins, so the more specific names come first ("L40S" before "L4", "H100 PCIe" before "H100").
PEAK_16BIT = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10G": 125e12, "T4": 65e12, "V100": 125e12}

# The variants measured: name -> (network, fast-path settings for TrainConfig)
EAGER_FP32 = dict(precision="fp32", channels_last=False, compile=False)
EAGER_BF16 = dict(precision="bf16", channels_last=False, compile=False)
VARIANTS = {
    "diffusers eager fp32": ("diffusers", EAGER_FP32),
    "diffusers eager bf16": ("diffusers", EAGER_BF16),
    "ddpm_lib eager fp32": ("ddpm_lib", EAGER_FP32),
    "ddpm_lib eager bf16": ("ddpm_lib", EAGER_BF16),
    "ddpm_lib fast": ("ddpm_lib", dict(precision="bf16", channels_last=True,
                                         compile=DEFAULT_COMPILE_MODE)),
}


def variant(name: str, device, fp16: bool = False) -> tuple[str, str, dict]:
    """``(name, network kind, fast-path settings)`` of a variant on ``device``. A GPU without bf16
    (compute capability < 8: T4, V100), or ``fp16=True``, runs the bf16 variants in fp16 with loss
    scaling, under a name that says so. Used by the Benchmarks appendix (benchmarks.md)."""
    kind, fast = VARIANTS[name]
    if fast["precision"] == "bf16" and (fp16 or (device.type == "cuda" and not gpu_has_bf16(device))):
        fast = {**fast, "precision": "fp16"}
        name = name.replace("bf16", "fp16") if "bf16" in name else name + " (fp16)"
    return name, kind, fast


class DiffusersEps(torch.nn.Module):
    """A diffusers UNet2DModel behind ddpm_lib's model interface: ``(x_t, t) -> eps``.
    Used by the Benchmarks appendix and chapter 11, "The benchmark" (``ch11-benchmark``)."""

    def __init__(self, **config):
        super().__init__()
        from diffusers import UNet2DModel
        self.net = UNet2DModel(**config)

    def forward(self, x_t, t, y=None):
        return self.net(x_t, t).sample


def build(kind: str, net: str) -> torch.nn.Module:
    """``kind``'s network ``net``, seeded, as the Benchmarks appendix measures it."""
    torch.manual_seed(0)
    ours, theirs, _ = NETS[net]
    return UNet(**ours) if kind == "ddpm_lib" else DiffusersEps(**theirs)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU (nothing on a CPU) before reading a clock: Benchmarks appendix timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(model, shape, batch_size, device, backward: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    model = copy.deepcopy(model).to(device).train(backward)    # a copy: the caller's mode stays
    x = torch.randn((batch_size, *shape), device=device)
    t = torch.randint(1000, (batch_size,), device=device)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = model(x, t)
        if backward:
            out.float().square().mean().backward()
    return float(counter.get_total_flops())


def train_flops(model, shape, batch_size, device) -> float:
    """FLOPs of one forward and backward pass at ``batch_size`` (matrix products and convolutions).
    Taught in chapter 11, "FLOPs per step against milliseconds per step" (``ch11-benchmark``)."""
    return _count_flops(model, shape, batch_size, device, backward=True)


def forward_flops(model, shape, batch_size, device) -> float:
    """FLOPs of one forward pass without gradients at ``batch_size`` (one network evaluation
    when sampling; matrix products and convolutions).
    Taught in chapter 10, "FLOPs per network evaluation", and chapter 11 (``ch11-benchmark``)."""
    return _count_flops(model, shape, batch_size, device, backward=False)


def measure_training(kind, net, fast, device, batch_size, steps, warmup, images) -> dict:
    """Images/s over ``steps`` timed steps after ``warmup`` (which absorbs compilation).
    Used by the Benchmarks appendix (benchmarks.md) and chapter 11, "The benchmark"."""
    model = build(kind, net)
    marks = {}

    def clock(step, *_):
        if step in (warmup, warmup + steps):
            synchronize(device)
            marks[step] = time.perf_counter()
        return step >= warmup + steps

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train(model, NoiseSchedule.linear(), images, steps=warmup + steps, batch_size=batch_size, lr=1e-4,
          device=device, progress=False, log_every=10**9, data_on_device=device.type == "cuda",
          callback=clock, **fast)
    seconds = marks[warmup + steps] - marks[warmup]
    out = dict(images_per_s=steps * batch_size / seconds, ms_per_step=1e3 * seconds / steps,
               warmup_s=marks[warmup] - start, params=count_parameters(model))
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


@torch.no_grad()
def measure_sampling(kind, net, device, batch_size, half=None, reps=20) -> float:
    """Milliseconds per network evaluation (one sampler step's model call) at ``batch_size``,
    under autocast to ``half`` (torch.bfloat16 or torch.float16) if given.
    Used by the Benchmarks appendix (benchmarks.md) and chapter 11, "The benchmark"."""
    model = build(kind, net).to(device).eval()
    x = torch.randn((batch_size, *NETS[net][2]), device=device)
    t = torch.full((batch_size,), 500, device=device)
    with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
        for _ in range(3):
            model(x, t)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            model(x, t)
        synchronize(device)
    return 1e3 * (time.perf_counter() - start) / reps


def time_to_quality(device, budgets, batch_size, n_samples, variants, fp16=False) -> list[dict]:
    """Train each variant on Fashion-MNIST for wall-clock ``budgets`` (seconds, compilation
    included), snapshot the EMA weights at each, and score DDIM-50 samples of each snapshot. Used
    by ``--time-to-quality``, see the Benchmarks appendix (benchmarks.md)."""
    images, _ = data.load("fashion_mnist", "train")
    reference = features.reference_features("fashion_mnist", "train")
    schedule = NoiseSchedule.linear()
    rows = [dict(variant="real test images (floor)", budget_s=0, steps=0,
                 **metrics.real_floor(n_samples, real_features=reference))]
    for name in variants:
        name, kind, fast = variant(name, device, fp16)
        model = build(kind, "small")
        snapshots, todo = {}, sorted(budgets)
        start = time.perf_counter()

        def snap(step, model, ema):
            if todo and time.perf_counter() - start >= todo[0]:
                snapshots[todo.pop(0)] = (step, copy.deepcopy(ema.model).eval())
            return not todo

        train(model, schedule, images, steps=10**7, batch_size=batch_size, lr=5e-4, warmup_steps=200,
              ema_decay=0.999, device=device, progress=False, log_every=100, callback=snap, **fast)
        for budget, (step, ema_model) in snapshots.items():
            g = torch.Generator(device).manual_seed(0)
            samples = samplers.sample(ema_model, schedule, (n_samples, 1, 28, 28), sampler="ddim", steps=50,
                                      generator=g, device=device).cpu()
            scores = metrics.evaluate(samples, real_features=reference)
            rows.append(dict(variant=name, budget_s=budget, steps=step, **scores))
            print(f"  {name:22s} {budget:6.0f} s  {step:7d} steps  " +
                  "  ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float))), flush=True)
    return rows


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else what platform knows.
    Used by the Benchmarks appendix (benchmarks.md) and chapter 11, "The benchmark"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Date, versions and machine: a benchmark log's first line (chapter 11, "The benchmark")."""
    env = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, python=platform.python_version(),
               device=str(device), cpu=cpu_name(),
               threads=torch.get_num_threads())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def peak_flops(device) -> float | None:
    """The GPU's dense 16-bit peak FLOP/s, or None, for MFU (chapter 11, "The benchmark")."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_16BIT.items() if k in name), None)


def run(device, nets, variants, batch_sizes, steps, warmup, fp16=False) -> list[dict]:
    """Measure every variant of every network: the Benchmarks appendix's rows (benchmarks.md)."""
    images = {net: torch.rand((4096, *NETS[net][2])) * 2 - 1 for net in nets}
    rows = []
    for net in nets:
        B = batch_sizes[net]
        flops = {}     # per network kind: the two libraries' networks differ slightly
        for name in variants:
            name, kind, fast = variant(name, device, fp16)
            try:
                row = dict(net=net, variant=name, batch=B, **measure_training(
                    kind, net, fast, device, B, steps, warmup, images[net]))
                half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fast["precision"])
                row["ms_per_eval"] = measure_sampling(kind, net, device, B, half)
            except Exception as e:  # one variant failing (say, compile) must not hide the others
                row = dict(net=net, variant=name, batch=B, error=f"{type(e).__name__}: {e}"[:300])
            if "images_per_s" in row:
                if kind not in flops:
                    flops[kind] = train_flops(build(kind, net), NETS[net][2], B, device)
                row["tflops_per_s"] = flops[kind] * row["images_per_s"] / B / 1e12
                peak = peak_flops(device)
                row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak else None
            rows.append(row)
            print(format_row(row), flush=True)
        base = next((r for v in ("diffusers eager bf16", "diffusers eager fp16", "diffusers eager fp32")
                     for r in rows if r["net"] == net and r["variant"] == v and "images_per_s" in r), None)
        for r in rows:
            if r["net"] == net and base and "images_per_s" in r:
                r["vs_diffusers"] = r["images_per_s"] / base["images_per_s"]
                r["vs_diffusers_baseline"] = base["variant"]
    return rows


def format_row(r: dict) -> str:
    """A printed row of the benchmark; chapter 11, "The benchmark", reads it back with read_log."""
    if "error" in r:
        return f"{r['net']:6s} {r['variant']:22s} failed: {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "  n/a"
    mem = f"{r['peak_memory_gb']:6.2f} GB" if "peak_memory_gb" in r else "     n/a"
    return (f"{r['net']:6s} {r['variant']:22s} {r['params']:>11,d} params  batch {r['batch']:4d}  "
            f"{r['images_per_s']:9.1f} img/s  {r['ms_per_step']:8.2f} ms/step  {r['ms_per_eval']:8.2f} ms/eval  "
            f"{mem}  MFU {mfu}  (warm-up {r['warmup_s']:.1f} s)")


# One line of format_row, read back: every figure as rounded as printed.
ROW = re.compile(r"(?P<net>\S+)\s+(?P<variant>\S.*?)\s+(?P<params>[\d,]+) params\s+"
                 r"batch\s+(?P<batch>\d+)\s+(?P<images_per_s>[\d.]+) img/s\s+"
                 r"(?P<ms_per_step>[\d.]+) ms/step\s+(?P<ms_per_eval>[\d.]+) ms/eval\s+"
                 r"(?:(?P<peak_memory_gb>[\d.]+) GB|n/a)\s+MFU\s+(?:(?P<mfu>[\d.]+)%|n/a)\s+"
                 r"\(warm-up (?P<warmup_s>[\d.]+) s\)")


def parse_row(line: str) -> dict | None:
    """The inverse of :func:`format_row`: a dict with the keys it reads (net, variant, params,
    batch, images_per_s, ms_per_step, ms_per_eval, peak_memory_gb where printed, mfu as a fraction
    or None, warmup_s), or None for any other line, a failed row included. Used by :func:`read_log`
    (chapter 11, "The benchmark")."""
    m = ROW.fullmatch(line.strip())
    if m is None:
        return None
    r = m.groupdict()
    row = dict(net=r["net"], variant=r["variant"], params=int(r["params"].replace(",", "")),
               batch=int(r["batch"]))
    row.update({k: float(r[k]) for k in ("images_per_s", "ms_per_step", "ms_per_eval")})
    if r["peak_memory_gb"] is not None:
        row["peak_memory_gb"] = float(r["peak_memory_gb"])
    row["mfu"] = float(r["mfu"]) / 100 if r["mfu"] is not None else None
    row["warmup_s"] = float(r["warmup_s"])
    return row


def read_log(path) -> tuple[dict, list[dict]]:
    """``(env, rows)`` of a saved output of ``python -m ddpm_lib.bench``: ``env`` the first
    environment line as ``{key: value}`` strings (date, torch, python, device, ..., gpu on a
    GPU), ``rows`` the :func:`parse_row` dicts of its throughput rows in order (failed rows
    left out). Taught in chapter 11, "The benchmark" (``ch11-benchmark``)."""
    env, rows = {}, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("date:") and not env:
            env = dict(kv.split(": ", 1) for kv in line.strip().split(" | "))
        elif (row := parse_row(line)) is not None:
            rows.append(row)
    return env, rows


def table(rows: list[dict]) -> str:
    """A Markdown table of the throughput rows, printed by ``main`` (Benchmarks appendix)."""
    lines = ["| network | variant | params | batch | images/s | vs diffusers | ms/eval | peak memory | MFU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['net']} | {r['variant']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ratio = f"{r['vs_diffusers']:.2f}x" if "vs_diffusers" in r else "n/a"
        mem = f"{r['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in r else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['net']} | {r['variant']} | {r['params']:,} | {r['batch']} | {r['images_per_s']:,.0f} | "
                     f"{ratio} | {r['ms_per_eval']:.2f} | {mem} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m ddpm_lib.bench``: its results are in the Benchmarks appendix (benchmarks.md)."""
    p = argparse.ArgumentParser(prog="python -m ddpm_lib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--nets", default="small,cifar", help=f"comma-separated, from {sorted(NETS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on a GPU, 5 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 15 on a GPU, 2 on a CPU)")
    p.add_argument("--time-to-quality", default="", help="comma-separated wall-clock budgets in seconds")
    p.add_argument("--ttq-samples", type=int, default=1000)
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    p.add_argument("--fp16", action="store_true",
                   help="run the bf16 variants in fp16 with loss scaling, as on a GPU without bf16 (a T4)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, known in (("nets", NETS), ("variants", VARIANTS)):
        bad = [v for v in (nets if name == "nets" else variants) if v not in known]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(known)}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed (pip install diffusers): measuring ddpm_lib alone")
        variants = [v for v in variants if not v.startswith("diffusers")]
    steps = args.steps or (50 if gpu else 5)
    warmup = args.warmup or (15 if gpu else 2)
    env = environment(device)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    rows = [] if args.no_throughput else run(device, nets, variants, {n: args.batch_size for n in nets},
                                             steps, warmup, args.fp16)
    if rows:
        print()
        print(table(rows))
    result = dict(environment=env, steps=steps, warmup=warmup, throughput=rows)
    if args.time_to_quality:
        budgets = [float(b) for b in args.time_to_quality.split(",")]
        ttq = [v for v in ("diffusers eager bf16" if gpu else "diffusers eager fp32",
                           "ddpm_lib fast" if gpu else "ddpm_lib eager fp32") if v in variants]
        print(f"\ntime to quality: {ttq}, budgets {budgets} s")
        result["time_to_quality"] = time_to_quality(device, budgets, args.batch_size, args.ttq_samples, ttq, args.fp16)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
