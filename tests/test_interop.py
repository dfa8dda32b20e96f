"""ddpm_lib beside diffusers (ddpm_lib/interop.py): the same schedule, the same DDIM update on
the same grid, the differing default grids, and a diffusers UNet2DModel driven by the book's
samplers. Skipped without diffusers (requirements.txt installs it, so CI runs it)."""
import pytest
import torch

from ddpm_lib import NoiseSchedule
from ddpm_lib.interop import DiffusersUNet, diffusers_timesteps, schedule_from_diffusers
from ddpm_lib.samplers import SAMPLERS, ddim_sample, ddim_timesteps, sample

diffusers = pytest.importorskip("diffusers")


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    # random weights far from zero, so the prediction matters
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def _linear(cls=None, **kw):
    cls = cls or diffusers.DDPMScheduler
    return cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw)


def test_the_linear_schedule_is_the_same():
    ours = NoiseSchedule.linear(T=1000, beta_start=1e-4, beta_end=0.02)
    theirs = schedule_from_diffusers(_linear())
    assert theirs.T == 1000
    diff = (ours.float64("alpha_bars") - torch.as_tensor(_linear().alphas_cumprod).double()).abs().max()
    assert diff < 1e-6, f"alpha_bar differs by {diff:.1e} (float32 rounding is about 1e-7)"
    assert torch.allclose(theirs.float64("alpha_bars"), ours.float64("alpha_bars"), rtol=0, atol=1e-6)


def _diffusers_ddim(unet, scheduler, x_T, steps):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_on_diffusers_grid_matches_ddim_scheduler(clip):
    unet = _tiny_unet()
    scheduler = _linear(diffusers.DDIMScheduler, clip_sample=clip, set_alpha_to_one=True)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = diffusers_timesteps(scheduler, 10)
    assert grid == list(range(900, -1, -100)), grid          # "leading" spacing
    theirs = _diffusers_ddim(unet, scheduler, x_T, 10)
    ours = ddim_sample(DiffusersUNet(unet), schedule_from_diffusers(scheduler), x_T.shape,
                       timesteps=grid, x_T=x_T, clip_x0=clip)
    if clip:
        # diffusers keeps the network's eps after clipping x0_hat; the book re-derives it
        assert (ours - theirs).abs().max() > 1e-4
        scheduler = _linear(diffusers.DDIMScheduler, clip_sample=True, set_alpha_to_one=True)
        scheduler.set_timesteps(10)
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        theirs = x
    assert (ours - theirs).abs().max() < 1e-4


def test_default_grids_differ():
    scheduler = _linear(diffusers.DDIMScheduler)
    assert ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    assert diffusers_timesteps(scheduler, 4) == [750, 500, 250, 0]
    linspace = _linear(diffusers.DDIMScheduler, timestep_spacing="linspace")
    assert diffusers_timesteps(linspace, 4) == [999, 666, 333, 0]
    # same grid, but diffusers steps from t to t - T/steps (999 -> 749), the book to the next
    # grid point (999 -> 666): the samples differ
    unet = _tiny_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    linspace.config.clip_sample = False
    theirs = _diffusers_ddim(unet, linspace, x_T, 4)
    ours = ddim_sample(DiffusersUNet(unet), schedule_from_diffusers(linspace), x_T.shape,
                       timesteps=[999, 666, 333, 0], x_T=x_T, clip_x0=False)
    assert (ours - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_book_sampler_drives_a_diffusers_unet(name):
    unet = DiffusersUNet(_tiny_unet())
    # DDPM visits every step (it refuses steps=): a 10-step schedule keeps it fast
    schedule = NoiseSchedule.linear(T=10) if name == "ddpm" else schedule_from_diffusers(_linear())
    steps = None if name == "ddpm" else 4
    x = sample(unet, schedule, (2, 1, 8, 8), sampler=name, steps=steps,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
