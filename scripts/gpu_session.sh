#!/bin/bash
# The measurements that still need a GPU, as one script for a device session without network.
#
#   bash scripts/gpu_session.sh prepare   # with network: diffusers wheels and Fashion-MNIST into .gpu/
#   bash scripts/gpu_session.sh run       # on the GPU machine (carry .gpu); writes to $OUT
#   bash scripts/gpu_session.sh check     # the same stages, tiny, on this machine's CPU (OUT=/tmp/...)
#
# Stages, most important first; each has its own time limit, so a slow one (compilation) cannot
# eat the others' time, and each writes its JSON as soon as it ends:
#   1. the CIFAR-size network's fast path beside diffusers (the 2x target and MFU, chapter 11);
#   2. the bf16 variants in float16 with loss scaling, the configuration of a T4, on this GPU;
#   3. DDIM and DPM-Solver++ at 200 and 500 steps (chapter 8's curve beyond 100 NFE).
# Afterwards: copy the JSON files into ddpm_lib/results/ and update the text of chapters 8 and 11 with
# what was measured. scripts/benchmarks_page.py does not read these three files yet: add a
# table for each there (it reads bench_h200.log, bench_cpu.json, sweep_h200.json today).
set -u
cd "$(dirname "$0")/.."
mode=${1:-}

if [ "$mode" = prepare ]; then
    mkdir -p .gpu/whl .gpu/data
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl diffusers==0.42.1 importlib_metadata==8.7.0
    cp /usr/share/datasets/fashion-mnist/*.gz .gpu/data/
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    ls -l .gpu/whl .gpu/data
    exit 0
fi

if [ "$mode" = run ]; then
    net=cifar steps=30 warmup=10 batch=128 n=2000 nfe=200,500 limits=(270 120 150)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD DDPM_DATA=$PWD/.gpu/data
elif [ "$mode" = check ]; then
    net=small steps=1 warmup=1 batch=4 n=8 nfe=5 limits=(900 900 900)   # (compiling the CIFAR net on a CPU takes long)
    OUT=${OUT:-$(mktemp -d)}
else
    echo "usage: bash scripts/gpu_session.sh prepare|run|check" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
stage() { echo "=== $1 at $(( $(date +%s) - start )) s"; }

stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
python3 -c "import torch; print('torch', torch.__version__)"

stage "1: CIFAR-size network, fast path beside diffusers"
timeout "${limits[0]}" python3 -m ddpm_lib.bench --nets $net --steps $steps --warmup $warmup --batch-size $batch \
    --variants "diffusers eager bf16,ddpm_lib eager bf16,ddpm_lib fast" --json "$OUT/bench_cifar.json"

stage "2: float16 with loss scaling (a T4's configuration)"
timeout "${limits[1]}" python3 -m ddpm_lib.bench --nets small --steps $steps --warmup $warmup --batch-size $batch \
    --variants "diffusers eager bf16,ddpm_lib eager fp32,ddpm_lib eager bf16,ddpm_lib fast" --fp16 --json "$OUT/bench_fp16.json"

stage "3: DDIM and DPM-Solver++ beyond 100 steps"
timeout "${limits[2]}" python3 scripts/sampler_sweep.py --parts floor,samplers --nfe $nfe --n $n \
    --out "$OUT/sweep_long.json"

stage done
ls -l "$OUT"
