"""Data-parallel training with torchrun: two CPU processes (gloo) give the model that one
process gives with the same global batch, and resume like one process does."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from ddpm_lib.train import train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import tiny_problem  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(nproc, out, ckpt, steps):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), str(out), str(ckpt), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_close(a: dict, b: dict, atol=1e-4):
    """Equal up to float summation order. Adam divides each gradient by its running RMS, so a
    parameter whose true gradient is ~0 (the attention key bias: softmax ignores a shift) moves
    by up to lr = 1e-3 per step on rounding noise alone: 1e-4 is a tenth of one such step."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    model, schedule, images, config = tiny_problem()
    single = train(model, schedule, images, steps=4, device="cpu", **config)

    ddp = torchrun(2, tmp_path / "out.pt", tmp_path / "ddp.pt", steps=4)
    assert ddp["world"] == 2
    assert_close(ddp["model"], single.model.state_dict())
    assert_close(ddp["ema"], single.ema_model.state_dict())
    # the logged loss is the global batch's mean, and the per-timestep counts add up over processes
    assert ddp["history"]["loss"] == torch.tensor(single.history["loss"]).tolist() or torch.allclose(
        torch.tensor(ddp["history"]["loss"]), torch.tensor(single.history["loss"]), atol=1e-6)
    assert ddp["history"]["count_by_t"].sum().item() == 4 * 8
    assert torch.equal(ddp["history"]["count_by_t"], single.history["count_by_t"])

    # resuming the two-process run from its step-4 checkpoint to step 6 equals 6 steps straight
    resumed = torchrun(2, tmp_path / "out6.pt", tmp_path / "ddp.pt", steps=6)
    assert resumed["resumed_from"] == 4
    model, schedule, images, config = tiny_problem()
    straight = train(model, schedule, images, steps=6, device="cpu", **config)
    assert_close(resumed["model"], straight.model.state_dict())
    assert_close(resumed["ema"], straight.ema_model.state_dict())
