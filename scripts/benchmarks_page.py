"""Write the tables of benchmarks.md from the measured results in ddpm_lib/results/.

    python scripts/benchmarks_page.py          # rewrite the generated part of benchmarks.md
    python scripts/benchmarks_page.py --check  # exit 1 if benchmarks.md is not up to date

Everything between the markers ``<!-- generated -->`` and ``<!-- end generated -->`` comes
from the files in ddpm_lib/results/ (written by ddpm_lib.bench and scripts/*.py); nothing is typed by
hand, and tests/test_repository.py checks that the page matches the files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ddpm_lib, installed or not
from ddpm_lib.bench import read_log  # noqa: E402

PAGE = ROOT / "benchmarks.md"
RESULTS = ROOT / "ddpm_lib" / "results"
BEGIN, END = "<!-- generated -->", "<!-- end generated -->"


def page_row(r: dict) -> dict:
    """A throughput row of ``ddpm_lib.bench`` (from a log or a JSON file) with the memory and
    the MFU as the table prints them."""
    return dict(net=r["net"], variant=r["variant"], params=r["params"], batch=r["batch"],
                images_per_s=r["images_per_s"], ms_per_step=r["ms_per_step"], ms_per_eval=r["ms_per_eval"],
                memory=f"{r['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in r else "n/a",
                mfu=f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a")


def parse_log(path: Path) -> tuple[str, list[dict]]:
    """The environment (as "on DATE, key: value, ...") and the table rows of a saved output of
    ``python -m ddpm_lib.bench``, read by ``ddpm_lib.bench.read_log``."""
    env, rows = read_log(path)
    described = ", ".join([f"on {env['date']}"] + [f"{k}: {v}" for k, v in env.items() if k != "date"])
    return described, [page_row(r) for r in rows]


def throughput_table(rows: list[dict], baseline: str, gpu: bool) -> list[str]:
    """Markdown rows, each with its ratio to ``baseline`` on the same network; on a GPU also
    the peak memory and the MFU (a CPU has neither). Narrow columns, so the table fits the page."""
    extra = " memory | MFU |" if gpu else ""
    out = [f"| network | variant | images/s | vs {baseline.replace('eager ', '')} | ms/step | ms/eval |{extra}",
           "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if gpu else "")]
    for r in rows:
        base = next((b for b in rows if b["net"] == r["net"] and b["variant"] == baseline), None)
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "n/a"
        figures = (f"{r['images_per_s']:,.0f} | {ratio} | {r['ms_per_step']:.1f} | {r['ms_per_eval']:.2f} | "
                   f"{r['memory']} | {r['mfu']} |" if gpu else
                   f"{r['images_per_s']:,.1f} | {ratio} | {r['ms_per_step']:,.0f} | {r['ms_per_eval']:,.0f} |")
        out.append(f"| {r['net']} ({r['params'] / 1e6:.1f}M) | {r['variant']} | {figures}")
    return out


def json_throughput_rows(result: dict) -> list[dict]:
    return [page_row(r) for r in result["throughput"] if "error" not in r]


def score_row(name: str, s: dict, extra: str = "") -> str:
    return (f"| {name} | {extra}{s['fid']:.2f} | {s['kid']:.2f} | {s['precision']:.3f} | {s['recall']:.3f} | "
            f"{s['entropy']:.3f} | {s['confidence']:.3f} |")


def generated() -> str:
    lines = []
    gpu_log = RESULTS / "bench_h200.log"
    if gpu_log.exists():
        env, rows = parse_log(gpu_log)
        lines += ["### Training throughput on a GPU", "",
                  f"`python -m ddpm_lib.bench --steps 30 --warmup 10`, batch 128. Measured {env}. "
                  "*ms/step*: one training step; *ms/eval*: one network evaluation when sampling; "
                  "*memory*: peak GPU memory in training.", ""]
        lines += throughput_table(rows, "diffusers eager bf16", gpu=True)
        nets = {r["net"] for r in rows if r["variant"] == "ddpm_lib fast"}
        if "cifar" not in nets:
            lines += ["", "The fast path of the CIFAR-size network has no row: that run reached the time limit of "
                      "the session's GPU command while `torch.compile` was still compiling, and was not repeated."]
        lines.append("")
    cpu = RESULTS / "bench_cpu.json"
    if cpu.exists():
        result = json.loads(cpu.read_text())
        env = result["environment"]
        lines += ["### Training throughput on a CPU", "",
                  f"`python -m ddpm_lib.bench --nets small --steps {result['steps']} --warmup {result['warmup']} "
                  f"--batch-size 64` on a shared 2-core x86-64 machine, one torch thread "
                  f"(torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}). The machine was loaded by "
                  "other jobs, enough to change a figure several-fold between two measurements: the last column "
                  "times the network alone, without compilation, so *eager bf16* and *fast* run the same "
                  "computation there, yet differ 4x. Treat these rows as a check that everything runs on a "
                  "CPU, not as a speed comparison.", ""]
        lines += throughput_table(json_throughput_rows(result), "diffusers eager fp32", gpu=False)
        lines.append("")
    sweep = RESULTS / "sweep_h200.json"
    if sweep.exists():
        s = json.loads(sweep.read_text())
        header = ["| samples | FID-style | KID | precision | recall | class entropy | confidence |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += ["### Sample quality by sampler", "",
                  f"`python scripts/sampler_sweep.py --n {s['n']} --ddpm` on an {s['device']} (torch {s['torch']}, "
                  f"{s['date']}): {s['n']} samples of the shipped unconditional model per row, scored by "
                  "`ddpm_lib.metrics.evaluate` against the 60,000 training images in the features of the "
                  "shipped classifier (FID-style, not Inception FID). KID is in the same features (its raw "
                  "value, not multiplied by 1000).", ""]
        lines += header + [score_row(f"real test images (floor, N = {s['floor']['n']})", s["floor"])]
        for r in s.get("samplers", []):
            name = {"ddpm": "DDPM", "ddim": "DDIM", "dpm_solver": "DPM-Solver++(2M)"}[r["sampler"]]
            lines.append(score_row(f"{name}, {r['nfe']} steps ({r['seconds']:.2f} s)", r))
        if s.get("guidance"):
            lines += ["", "### Classifier-free guidance", "",
                      "The shipped class-conditional model, DPM-Solver++(2M) with 20 steps, "
                      f"{s['n'] // 10} samples per class; accuracy is the shipped classifier's on the "
                      "intended classes.", "",
                      "| guidance weight w | accuracy | FID-style | KID | precision | recall | class entropy | confidence |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in s["guidance"]:
                lines.append(score_row(f"{r['w']:g}", r, extra=f"{r['accuracy']:.3f} | "))
        lines.append("")
    lvp = RESULTS / "latent_vs_pixel_cpu.json"
    if lvp.exists():
        r = json.loads(lvp.read_text())
        lines += ["### Latent vs pixel diffusion at equal training time", "",
                  f"`{r['how']}`"
                  f" ({r['date']}): the two models one after the other, {r['budget_s']:g} s each, on {r['device']}, "
                  f"{r['threads']} thread, warm-up {r['recipe']['warmup_steps']} steps for both. The load average "
                  "(1 minute) before and after each says whether the machine was otherwise idle.", "",
                  "| model | parameters | steps in the budget | images/s | last logged loss | load before / after |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("latent", "pixel"):
            m = r[name]
            loss = f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "n/a (fewer steps than one log)"
            lines.append(f"| {name} | {m['params']:,} | {m['steps']:,} | {m['images_per_s']:.1f} | {loss} | "
                         f"{m['load_average_before']:.2f} / {m['load_average_after']:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{PAGE} lacks the markers {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{generated()}{END}{tail}"


def main() -> None:
    text = PAGE.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            raise SystemExit("benchmarks.md is out of date: run python scripts/benchmarks_page.py")
        return
    PAGE.write_text(new)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
