import functools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_unet
from ddpm_lib import NoiseSchedule, diffusion
from ddpm_lib import train as train_module
from ddpm_lib.accel import fast_path
from ddpm_lib.checks import check_values, trusted_inputs
from ddpm_lib.io import CheckpointBusy, load_checkpoint, save_checkpoint
from ddpm_lib.objectives import diffusion_loss
from ddpm_lib.train import EMA, TrainConfig, loss_simple, train


# the tests' one U-Net factory, at 16 channels with attention at 14x14 and dropout 0.1
small_unet = functools.partial(tiny_unet, base_channels=16, attention_resolutions=(14,), dropout=0.1)


def test_training_lowers_the_loss(fashion):
    images = fashion.train[:256]
    schedule = NoiseSchedule.linear()
    result = train(small_unet(dropout=0.0), schedule, images, steps=60, batch_size=32, lr=2e-3,
                   log_every=10, progress=False)
    losses = result.history["loss"]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses      # from ~0.5+ down to ~0.15 in 60 steps
    assert result.history["count_by_t"].sum().item() == 60 * 32
    # the EMA model is a different, smoothed copy
    p, e = next(result.model.parameters()), next(result.ema_model.parameters())
    assert not torch.equal(p, e)


def test_resume_matches_uninterrupted_run(fashion, tmp_path):
    images = fashion.train[:256]
    schedule = NoiseSchedule.linear(T=100)
    kw = dict(batch_size=8, lr=1e-3, log_every=2, progress=False, ema_decay=0.9)
    straight = train(small_unet(dropout=0.1), schedule, images, steps=8, **kw)

    ckpt = tmp_path / "run.pt"
    first = train(small_unet(dropout=0.1), schedule, images, steps=5, checkpoint=ckpt, **kw)
    assert first.step == 5 and ckpt.exists()
    # a fresh process would build a fresh model: its weights are overwritten by the checkpoint
    torch.manual_seed(123)
    resumed = train(small_unet(dropout=0.1), schedule, images, steps=8, checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 5 and resumed.step == 8
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert straight.history["loss"] == resumed.history["loss"]
    # a finished run resumes to nothing new
    again = train(small_unet(dropout=0.1), schedule, images, steps=8, checkpoint=ckpt, **kw)
    assert again.resumed_from == 8 and again.history["loss"] == straight.history["loss"]


def test_class_conditional_training_runs(fashion, monkeypatch):
    images, labels = fashion.train[:256], fashion.train_labels[:256]
    seen = []

    def recording_loss(model, schedule, x0, t, eps, y=None, **kw):
        seen.append(y.clone())
        return diffusion_loss(model, schedule, x0, t, eps, y=y, **kw)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    result = train(small_unet(num_classes=10), NoiseSchedule.linear(T=100), images, labels=labels, steps=20,
                   batch_size=8, label_dropout=0.5, progress=False)
    assert result.step == 20
    # the labels reach the network, and label dropout replaces some of them by the null class 10
    y = torch.cat(seen)
    assert (y == 10).any() and (y < 10).any() and set(y.tolist()) <= set(labels.tolist()) | {10}


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert load_checkpoint(path)["step"] == 1

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1                      # the old one is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]                      # no temporary left behind


def test_corrupt_or_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete it"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")


def test_ema_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)           # (1 + 0) / (10 + 0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.9)       # 0.1 * 0 + 0.9 * 1
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_ema_decays_agree_until_the_warmup_reaches_the_smaller():
    """Chapter 16: (1 + n) / (10 + n) < 0.99 for n < 890, so decays 0.99 and 0.999 average the
    same weights up to update 890 (the ablation row ema_0.99 of a 700-step run is the shipped one)."""
    small, large = EMA(torch.nn.Linear(1, 1), decay=0.99), EMA(torch.nn.Linear(1, 1), decay=0.999)
    for n in (0, 100, 889, 890, 891, 5000):
        small.num_updates = large.num_updates = n
        assert (small.current_decay() == large.current_decay()) == (n <= 890), n


def test_bad_training_input(fashion):
    images, labels = fashion.train[:256], fashion.train_labels[:256]
    sched = NoiseSchedule.linear(T=10)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train(small_unet(), sched, (images + 1) * 127.5, steps=1, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        train(small_unet(), sched, images, labels=labels, steps=1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        train(small_unet(), sched, images[:, 0], steps=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train(small_unet(), sched, images * float("nan"), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"labels must be integers in 0\.\.9"):
        train(small_unet(num_classes=10), sched, images, labels=labels + 1, steps=1, progress=False)
    for bad in (dict(steps=0), dict(lr=-1.0), dict(ema_decay=1.0), dict(batch_size=2.5), dict(grad_clip=0.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_fast_path_follows_the_plain_loss_curve(fashion):
    """bf16 autocast + channels_last + torch.compile train like float32 eager (on the CPU here;
    the GPU comparison is in the benchmark). Same seed, so the same batches, t and noise."""
    images = fashion.train[:256]
    schedule = NoiseSchedule.linear()
    kw = dict(steps=40, batch_size=16, lr=2e-3, log_every=10, progress=False, seed=3)
    plain = train(small_unet(dropout=0.0), schedule, images, precision="fp32", channels_last=False,
                  compile=False, **kw)
    fast = train(small_unet(dropout=0.0), schedule, images, precision="bf16", channels_last=True,
                 compile="default", **kw)
    a, b = torch.tensor(plain.history["loss"]), torch.tensor(fast.history["loss"])
    assert b[-1] < 0.6 * b[0]                                  # the fast path learns
    # bf16 rounds every activation, and after a few steps the two runs' weights differ, so
    # their losses on the same batches drift apart a little (measured: at most 9% at 40 steps)
    assert ((a - b).abs() / a).max() < 0.15, (a, b)
    # the trained weights load into a plain model (no compile prefixes, ordinary layout)
    missing = small_unet().load_state_dict(fast.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys


def test_callback_stops_training(fashion):
    images = fashion.train[:256]
    seen = []
    result = train(small_unet(), NoiseSchedule.linear(T=10), images, steps=50, batch_size=4, progress=False,
                   callback=lambda step, model, ema: seen.append(step) or step == 3)
    assert seen == [1, 2, 3] and result.step == 3


def test_fast_path_settings_are_checked():
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="fastest")
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'bf16', 'fp16'\)"):
        TrainConfig(precision="fp64")


@pytest.mark.parametrize("capability, precision, expected", [
    ((9, 0), "auto", "bf16"),          # H100: bf16
    ((8, 0), "auto", "bf16"),          # A100
    ((7, 5), "auto", "fp16"),          # T4: no bf16, so fp16 + loss scaling
    ((7, 5), "fp32", "fp32"),          # asked for float32
    ((9, 0), "fp16", "fp16"),          # asked for fp16
    ((9, 0), "fp32", "fp32"),
])
def test_mixed_precision_defaults_by_gpu(monkeypatch, capability, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    settings = dict(channels_last=None, compile=None, data_on_device=None)
    fast = fast_path(precision, **settings, device=torch.device("cuda", 0))
    assert fast.precision == expected
    assert fast.channels_last and fast.data_on_device and fast.compile == "reduce-overhead"
    on_cpu = fast_path("auto", **settings, device=torch.device("cpu"))
    assert on_cpu.precision == "fp32"                             # all off on a CPU
    assert not (on_cpu.channels_last or on_cpu.compile or on_cpu.data_on_device)
    cpu = torch.device("cpu")                                     # loss scaling for fp16 only
    assert fast_path(expected, **settings, device=cpu).grad_scaler(cpu).is_enabled() == (expected == "fp16")


@pytest.fixture(scope="module")
def small_images(fashion):
    # 12x12 crops of 2x-downsampled images: fp16 convolutions are slow on a CPU
    return F.avg_pool2d(fashion.train[:256], 2)[:, :, 1:13, 1:13].contiguous()


def test_fp16_with_loss_scaling_follows_the_float32_curve(small_images):
    """fp16 autocast + GradScaler (the default on GPUs without bf16) trains like float32."""
    schedule = NoiseSchedule.linear()
    kw = dict(steps=60, batch_size=16, lr=3e-3, log_every=10, progress=False, seed=3)
    plain = train(tiny_unet(), schedule, small_images, precision="fp32", **kw)
    half = train(tiny_unet(), schedule, small_images, precision="fp16", **kw)
    a, b = torch.tensor(plain.history["loss"]), torch.tensor(half.history["loss"])
    assert b[-1] < 0.5 * b[0]
    assert ((a - b).abs() / a).max() < 0.01, (a, b)                # measured: under 0.1%
    assert not torch.equal(next(plain.model.parameters()), next(half.model.parameters()))  # fp16 did round


def test_fp16_resume_restores_the_loss_scale(small_images, tmp_path, monkeypatch):
    """A large initial scale makes the first steps overflow: the scaler skips them and halves
    the scale each time (measured: 2^20 falls to 2^16 in the first 6 steps). A resumed run must
    continue with the reduced scale; starting over at 2^20 would skip steps again."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    schedule = NoiseSchedule.linear(T=100)
    kw = dict(batch_size=8, lr=1e-3, log_every=2, progress=False, precision="fp16")
    straight = train(tiny_unet(), schedule, small_images, steps=10, **kw)
    ckpt = tmp_path / "run.pt"
    train(tiny_unet(), schedule, small_images, steps=6, checkpoint=ckpt, **kw)
    scale = load_checkpoint(ckpt)["scaler"]["scale"]
    assert 1.0 < scale <= 2.0 ** 19                                # overflows were met and skipped
    resumed = train(tiny_unet(), schedule, small_images, steps=10, checkpoint=ckpt, **kw)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    start = tiny_unet().state_dict()
    assert not all(torch.equal(start[k], v) for k, v in straight.model.state_dict().items())  # steps were taken


def test_horizontal_flips(fashion, monkeypatch):
    images = fashion.train[:1]                     # one image, not left-right symmetric
    assert not torch.equal(images, images.flip(-1))
    seen = []

    def recording_loss(model, schedule, x0, *args, **kw):
        seen.append(x0.clone())
        return diffusion_loss(model, schedule, x0, *args, **kw)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    for hflip in (False, True):
        seen.clear()
        train(small_unet(), NoiseSchedule.linear(T=10), images, steps=4, batch_size=16, progress=False, hflip=hflip)
        x0 = torch.cat(seen)
        flipped = (x0 == images.flip(-1)).flatten(1).all(1)
        assert (flipped | (x0 == images).flatten(1).all(1)).all()
        assert flipped.sum() == 0 if not hflip else 16 < flipped.sum() < 48, flipped.sum()


def test_no_host_reads_inside_the_training_loop(fashion, monkeypatch):
    """Between logged steps ddpm_lib's code never reads a tensor's value on the host: on a GPU
    each read would wait for the queued work (a synchronisation). Counted here on the CPU by
    wrapping the ways Python reads a tensor value. (The CPU's AdamW reads its step counters;
    the fused AdamW that train() uses on a GPU does not, so only ddpm_lib's reads count.)"""
    images, labels = fashion.train[:256], fashion.train_labels[:256]
    reads = [0]
    package = os.path.dirname(diffusion.__file__)

    def counting(name):
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def wrapper(self, *args, **kw):
            reads[0] += sys._getframe(1).f_code.co_filename.startswith(package)
            return original(self, *args, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        counting(name)
    at_step = {}

    def record(step, model, ema):
        at_step[step] = reads[0]
        return False

    train(small_unet(num_classes=10), NoiseSchedule.linear(T=50), images, labels=labels, steps=6, batch_size=4,
          grad_clip=1.0, log_every=100, progress=False, callback=record)
    assert at_step[1] > 0                                           # the wrapping works: the set-up reads
    assert at_step[6] == at_step[1], at_step


def test_trusted_inputs_switches_value_checks_off():
    schedule = NoiseSchedule.linear(T=10)
    bad_t = torch.tensor([3, 12])
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule.check_t(bad_t)
    with trusted_inputs():
        assert not check_values()
        schedule.check_t(bad_t)                                     # not checked inside
        with pytest.raises(ValueError, match="1-D"):                # shape checks still run
            schedule.check_t(torch.zeros(2, 2, dtype=torch.long))
    assert check_values()
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule.check_t(bad_t)


# ----------------------------------------------------------------------------------------
# Nothing lost: no poisoned checkpoint, no silent resume with other settings, one run per file
# ----------------------------------------------------------------------------------------
def weights_give_finite_loss(weights: dict) -> bool:
    model = tiny_unet().eval()
    model.load_state_dict(weights)
    x0 = torch.rand((4, 1, 12, 12), generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.tensor([0, 5, 10, 19])
    with torch.no_grad():
        loss = loss_simple(model, NoiseSchedule.linear(T=20), x0, t, torch.randn_like(x0))
    return bool(torch.isfinite(loss))


def test_a_diverging_run_keeps_no_poisoned_checkpoint(small_images, tmp_path):
    """lr 1e6: after step 1 the weights are ~1e6, finite, and every forward pass gives NaN.
    Such a checkpoint must not be written (the old code kept it at step 1, and a resumed run
    or an export then failed the same way)."""
    schedule = NoiseSchedule.linear(T=20)
    ckpt = tmp_path / "run.pt"
    kw = dict(batch_size=8, log_every=1, checkpoint_every=1, progress=False)
    never_saved = (r"after step 1 .* nan loss .*not overwritten; no checkpoint of this run was "
                   r"written: train afresh with a lower lr")
    with pytest.raises(FloatingPointError, match=never_saved):
        train(tiny_unet(), schedule, small_images, steps=4, lr=1e6, checkpoint=ckpt, **kw)
    assert not ckpt.exists()

    # a good run to step 2, then a diverging resume: the step-2 checkpoint survives, the error
    # says where it is, and resuming from it with a sane lr equals a run never interrupted
    train(tiny_unet(), schedule, small_images, steps=2, lr=1e-3, checkpoint=ckpt, **kw)
    last_good = (rf"last good checkpoint is step 2 in {re.escape(str(ckpt))}: resume from it "
                 r"with a lower lr")
    with pytest.raises(FloatingPointError, match=last_good):
        train(tiny_unet(), schedule, small_images, steps=6, lr=1e6, checkpoint=ckpt, **kw)
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 2 and weights_give_finite_loss(saved["model"])
    assert weights_give_finite_loss(saved["ema"]["model"])
    resumed = train(tiny_unet(), schedule, small_images, steps=4, lr=1e-3, checkpoint=ckpt, **kw)
    straight = train(tiny_unet(), schedule, small_images, steps=4, lr=1e-3, **kw)
    assert resumed.resumed_from == 2
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_nan_loss_message_names_the_last_good_checkpoint(small_images, tmp_path, monkeypatch):
    """A loss that turns NaN between checkpoints (here: one poisoned batch at step 3)."""
    ckpt = tmp_path / "run.pt"
    kw = dict(batch_size=8, log_every=1, checkpoint_every=2, progress=False)
    train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=2, checkpoint=ckpt, **kw)
    calls = [0]

    def nan_at_third_step(model, schedule, x0, t, eps, y=None, reduction="mean", **kw):
        calls[0] += reduction == "none"                 # the training steps', not the checks'
        per_image = diffusion_loss(model, schedule, x0, t, eps, y=y, reduction=reduction, **kw)
        return per_image * float("nan") if calls[0] == 1 and reduction == "none" else per_image

    monkeypatch.setattr(train_module, "diffusion_loss", nan_at_third_step)
    message = (r"loss became nan at step 3; the last good checkpoint is step 2 in "
               + re.escape(str(ckpt)))
    with pytest.raises(FloatingPointError, match=message):
        train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=6, checkpoint=ckpt, **kw)
    assert load_checkpoint(ckpt)["step"] == 2


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_resume_refuses_a_checkpoint_with_unusable_weights(small_images, tmp_path, poison):
    """Checkpoints older code kept after a divergence: NaN weights, or finite ~1e6 weights
    whose loss is NaN."""
    schedule = NoiseSchedule.linear(T=20)
    ckpt = tmp_path / "run.pt"
    kw = dict(batch_size=8, progress=False)
    train(tiny_unet(), schedule, small_images, steps=2, checkpoint=ckpt, **kw)
    state = load_checkpoint(ckpt)
    for weights in (state["model"], state["ema"]["model"]):
        for k, v in weights.items():
            if v.is_floating_point():
                weights[k] = v * 1e6 if poison == "huge" else v * float("nan")
    save_checkpoint(state, ckpt)
    refused = r"run\.pt \(step 2\) cannot be resumed: .*(NaN|nan).*lower lr"
    with pytest.raises(ValueError, match=refused):
        train(tiny_unet(), schedule, small_images, steps=4, lr=2e-4, checkpoint=ckpt, **kw)


def test_resume_with_other_settings_is_refused_before_any_step(small_images, tmp_path):
    ckpt = tmp_path / "run.pt"
    kw = dict(batch_size=8, progress=False)
    train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=2, checkpoint=ckpt, **kw)
    steps_run = []

    def resume(model=None, schedule=None, images=small_images, **changes):
        return train(model or tiny_unet(), schedule or NoiseSchedule.linear(T=20), images, steps=3,
                     checkpoint=ckpt, callback=lambda step, m, e: steps_run.append(step),
                     **{**kw, **changes})

    other_betas = (r"step 2\) was made by a run with other settings:\n  schedule: checkpoint T=20, "
                   r"betas 0\.0001 \.\. 0\.02, this run T=20, betas ")
    with pytest.raises(ValueError, match=other_betas):
        resume(schedule=NoiseSchedule.cosine(T=20))
    with pytest.raises(ValueError, match="schedule: checkpoint T=20, .*this run T=30"):
        resume(schedule=NoiseSchedule.linear(T=30))
    wider = tiny_unet(base_channels=16)
    with pytest.raises(ValueError, match="network base_channels: checkpoint 8, this run 16"):
        resume(model=wider)
    # every difference at once, each with both values, and what to do
    with pytest.raises(ValueError) as err:
        resume(seed=1, batch_size=4, hflip=True, ema_decay=0.9, images=small_images[:100])
    message = str(err.value)
    for line in ("seed: checkpoint 0, this run 1", "batch_size: checkpoint 8, this run 4",
                 "hflip: checkpoint False, this run True",
                 "ema_decay: checkpoint 0.9999, this run 0.9",
                 f"number of images: checkpoint {len(small_images)}, this run 100",
                 "pass another checkpoint path"):
        assert line in message, message
    assert steps_run == [] and load_checkpoint(ckpt)["step"] == 2
    # what may change on resume: steps, lr, warm-up, clipping, logging, the fast-path switches
    result = resume(lr=1e-4, warmup_steps=3, grad_clip=None, log_every=1, checkpoint_every=1,
                    precision="fp32", channels_last=True)
    assert result.resumed_from == 2 and steps_run == [3]


def test_a_refused_resume_touches_nothing(small_images, tmp_path):
    """The checkpoint is checked before the model is moved, the generators seeded or the RNG
    reseeded: a refusal leaves the caller's state as it was."""
    ckpt = tmp_path / "run.pt"
    train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=1, batch_size=8,
          checkpoint=ckpt, progress=False)
    model, rng = tiny_unet(), torch.get_rng_state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="seed: checkpoint 0, this run 1"):
        train(model, NoiseSchedule.linear(T=20), small_images, steps=2, batch_size=8, seed=1,
              checkpoint=ckpt, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="one setting now: precision="):
        train(model, NoiseSchedule.linear(T=20), small_images, steps=1, bf16=True)


def test_resume_from_a_file_that_is_not_a_checkpoint(small_images, tmp_path):
    from ddpm_lib.pretrained import save_weights
    weights = tmp_path / "w.pt"
    save_weights(tiny_unet(), NoiseSchedule.linear(T=20), weights)
    message = r"w\.pt is an exported weights file .*not a training checkpoint.*new checkpoint path"
    with pytest.raises(ValueError, match=message):
        train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=1, checkpoint=weights,
              progress=False)


def test_an_unwritable_checkpoint_path_fails_before_training(small_images, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    steps_run = []

    def train_into(checkpoint):
        train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, steps=3, batch_size=4,
              progress=False, checkpoint=checkpoint,
              callback=lambda step, m, e: steps_run.append(step))

    with pytest.raises(NotADirectoryError, match=r"a_file is a file, so no checkpoint can be"):
        train_into(a_file / "run.pt")
    with pytest.raises(ValueError, match="is a folder"):
        train_into(tmp_path)
    assert steps_run == []


def test_two_runs_on_one_checkpoint(small_images, tmp_path):
    """A second run on a checkpoint whose lock a live process holds is refused before it does
    anything; a lock left by a dead process is taken over; the lock goes when train ends,
    however it ends."""
    import socket
    from ddpm_lib.io import lock_path
    ckpt = tmp_path / "run.pt"
    lock = lock_path(ckpt)
    kw = dict(steps=2, batch_size=4, progress=False, checkpoint=ckpt)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid} {socket.gethostname()}\n")
        busy = rf"in use by another run \(process {holder.pid} .*run\.pt\.lock"
        with pytest.raises(CheckpointBusy, match=busy):
            train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, **kw)
        assert not ckpt.exists()
    finally:
        holder.kill()
        holder.wait()
    result = train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, **kw)   # taken over
    assert result.step == 2 and ckpt.exists() and not lock.exists()

    def inside(step, model, ema):
        assert lock.read_text().split()[0] == str(os.getpid())      # held while training
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_unet(), NoiseSchedule.linear(T=20), small_images, **{**kw, "steps": 4},
              callback=inside)
    assert not lock.exists()


def test_lr_warmup_and_the_loss_log():
    """The pieces train() is made of (ddpm_lib.runs): the linear warm-up reaches lr at step
    warmup_steps - 1; the loss log averages the logged window and sums per timestep."""
    from ddpm_lib.runs import LossLog, lr_at
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 2e-4) == 2e-4
    log = LossLog(T=5, device=torch.device("cpu"))
    for loss, t in ((1.0, [0, 1]), (2.0, [1, 1]), (6.0, [4, 0])):
        log.add(torch.tensor(loss), torch.tensor([loss, loss]), torch.tensor(t))
    assert log.write(3) == 3.0 and log.history["step"] == [3] and log.running == []
    assert log.history["count_by_t"].tolist() == [2, 3, 0, 0, 1]
    assert log.history["loss_sum_by_t"].tolist() == [7, 5, 0, 0, 6]
    log.add(torch.tensor(float("nan")), torch.tensor([0.0]), torch.tensor([2]))
    with pytest.raises(FloatingPointError, match="the loss became nan at step 4"):
        log.flush(4)
