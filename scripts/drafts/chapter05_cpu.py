"""DRAFT (#22), not run yet: switch chapter 5's `cpu` profile from the 14x14 trousers problem to
the full problem with the CPU recipe that chapter 16's ablation found best
(``recipes.CPU_BEST``), for about five minutes of training on 2 cores. The next session runs
this once, re-executes the chapter in the cpu profile, rewrites the prose of the cells marked
TODO from the new outputs, and deletes this file.

    python scripts/drafts/chapter05_cpu.py && \
        python scripts/execute_chapter.py chapters/05_training.ipynb --profile cpu
"""
import json
from pathlib import Path

PATH = Path("chapters/05_training.ipynb")
nb = json.loads(PATH.read_text())
cells = {c["id"]: c for c in nb["cells"]}


def set_source(cell_id, text):
    cells[cell_id]["source"] = text.strip("\n").splitlines(keepends=True)


def replace(cell_id, old, new):
    src = "".join(cells[cell_id]["source"])
    assert old in src, (cell_id, old[:60])
    set_source(cell_id, src.replace(old, new))


# "A run": the full problem in every profile but smoke
set_source("33b8ae46", r"""
### A run: the full problem, for as long as the profile allows

The `gpu` profile trains the full recipe: all 60,000 images at $28\times28$, the shipped
configuration, 20,000 steps. The `cpu` profile trains the *same problem and network* for
1,300 steps, about five minutes on the idle 2-core CPU that made this page, with the recipe
that {doc}`16_training_recipes` found to buy the most quality per second on a CPU: batch 32
instead of 128, learning rate $10^{-3}$ instead of $5\cdot10^{-4}$, 20 warm-up steps instead of
200 (`recipes.CPU_BEST`; the folded cell below checks that the numbers are the library's).
Smaller batches mean four times as many optimiser steps in the same time, and at this budget
steps are what the network is short of. Five minutes does not make good samples, but it makes
recognisable garments of every class, which is enough to see every mechanism below: the loss
falling, the losses per timestep, EMA, and samples that turn from noise into clothes. The
`smoke` profile runs a tiny network for a few steps, only to test the code. The shipped model,
trained for 20,000 steps on a GPU, takes over at the end of the chapter.
""")

set_source("b22f4f15", r"""
run_train, run_test = train_images, test_images
print(
    f"{len(run_train)} training images, {len(run_test)} held-out images,"
    f" shape {tuple(run_train.shape[1:])}"
)
""")

replace("b42522d2", """model_config = cfg.pick(
    smoke=TINY_CONFIG, cpu=CPU_PROBLEM_CONFIG, gpu=SHIPPED_CONFIG
)
run_config = TrainConfig(
    steps=cfg.pick(smoke=20, cpu=600, gpu=20_000),
    batch_size=cfg.pick(smoke=16, cpu=64, gpu=128),
    lr=cfg.pick(smoke=1e-3, cpu=1e-3, gpu=5e-4),
    warmup_steps=cfg.pick(smoke=2, cpu=50, gpu=200),
    ema_decay=0.999,
    grad_clip=1.0,
    log_every=cfg.pick(smoke=2, cpu=25, gpu=100),""", """model_config = cfg.pick(
    smoke=TINY_CONFIG, cpu=SHIPPED_CONFIG, gpu=SHIPPED_CONFIG
)
# cpu: chapter 16's best recipe for a CPU (recipes.CPU_BEST), ~5 minutes
run_config = TrainConfig(
    steps=cfg.pick(smoke=20, cpu=1300, gpu=20_000),
    batch_size=cfg.pick(smoke=16, cpu=32, gpu=128),
    lr=cfg.pick(smoke=1e-3, cpu=1e-3, gpu=5e-4),
    warmup_steps=cfg.pick(smoke=2, cpu=20, gpu=200),
    ema_decay=0.999,
    grad_clip=1.0,
    log_every=cfg.pick(smoke=2, cpu=50, gpu=100),""")

# TODO next session: a folded check after b42522d2 that the cpu numbers equal
# recipes.settings(recipes.CPU_BEST); cell 3 ("Train here, or load the shipped weights?"),
# cells 30, 35, 36 (observations of the trousers run) rewritten from the new outputs;
# the first cell's "Time to run" and how_to_use.md.
PATH.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
print("rewrote", PATH)
