"""python -m ddpm_lib train / export / sample, end to end on a tiny model."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_lib.pretrained import load_pretrained, load_weights

TINY = ["--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1",
        "--attention-resolutions", "14", "--limit", "64", "--batch-size", "8", "--T", "50", "--no-progress"]


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "ddpm_lib", *args], capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def test_train_export_sample(tmp_path):
    ckpt, weights = tmp_path / "run.pt", tmp_path / "w.pt"
    rc, out = cli("train", "--checkpoint", str(ckpt), "--steps", "2", "--log-every", "1", *TINY)
    assert rc == 0, out
    rc, out = cli("train", "--checkpoint", str(ckpt), "--steps", "3", "--log-every", "1", *TINY)  # resumes
    assert rc == 0 and "step 3" in out, out
    rc, out = cli("export", str(ckpt), str(weights))
    assert rc == 0 and "sha256" in out, out
    model, schedule, meta = load_weights(weights)
    assert meta["step"] == 3 and schedule.T == 50 and model.config["base_channels"] == 16
    png, npy = tmp_path / "s.png", tmp_path / "s.npy"
    rc, out = cli("sample", "--weights", str(weights), "--n", "6", "--out", str(png), "--npy", str(npy))
    assert rc == 0, out
    images = np.load(npy)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert png.stat().st_size > 100
    rc, out = cli("sample", "--weights", str(weights), "--n", "2", "--sampler", "ddim", "--steps", "5",
                  "--out", str(png))
    assert rc == 0, out


def test_cli_errors_are_clear(tmp_path):
    rc, out = cli("sample", "--weights", str(tmp_path / "missing.pt"))
    assert rc == 2 and "no weights file" in out
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    rc, out = cli("sample", "--weights", str(bad))
    assert rc == 2 and "not a ddpm_lib weights file" in out
    with pytest.raises(ValueError, match="no pretrained model"):
        load_pretrained("nonexistent")


def test_benchmark_runs_and_writes_its_table(tmp_path):
    """`python -m ddpm_lib.bench` end to end on the CPU, tiny: one variant, one timed step."""
    import json

    from ddpm_lib import bench
    out = tmp_path / "bench.json"
    bench.main(["--nets", "small", "--variants", "ddpm_lib eager fp32", "--steps", "1", "--warmup", "1",
                "--batch-size", "4", "--json", str(out)])
    result = json.loads(out.read_text())
    row, = result["throughput"]
    assert row["variant"] == "ddpm_lib eager fp32" and row["params"] == 1_112_801
    assert row["images_per_s"] > 0 and row["ms_per_eval"] > 0 and row["tflops_per_s"] > 0
    assert result["environment"]["device"] == "cpu"
