"""Run by tests/test_distributed.py under torchrun: train a tiny UNet with DDP (gloo, CPU).

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT CHECKPOINT STEPS
"""
import sys

import torch

from conftest import tiny_unet
from ddpm_lib import NoiseSchedule
from ddpm_lib.accel import distributed_info, init_distributed
from ddpm_lib.train import train


def tiny_problem():
    g = torch.Generator().manual_seed(0)
    images = torch.rand((64, 1, 8, 8), generator=g) * 2 - 1
    model = tiny_unet(attention_resolutions=(4,), image_size=8)
    config = dict(batch_size=8, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=2, progress=False)
    return model, NoiseSchedule.linear(T=50), images, config


if __name__ == "__main__":
    out, ckpt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    device = init_distributed("gloo")
    model, schedule, images, config = tiny_problem()
    result = train(model, schedule, images, steps=steps, checkpoint=ckpt, device=device, **config)
    rank, world = distributed_info()
    if rank == 0:
        torch.save({"model": result.model.state_dict(), "ema": result.ema_model.state_dict(),
                    "history": result.history, "world": world, "resumed_from": result.resumed_from}, out)
    torch.distributed.destroy_process_group()
