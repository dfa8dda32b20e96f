"""ddpm_lib.recipes: the ablation's rows change one thing each, and build what they describe."""
import pytest
import torch

from ddpm_lib import recipes
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.train import TrainConfig
from ddpm_lib.unet import UNet, count_parameters


def changed(row):
    base = recipes.settings("shipped")
    return {(i, k) for i, (a, b) in enumerate(zip(base, recipes.settings(row))) for k in a if a[k] != b[k]}


def test_each_row_changes_one_setting():
    for row in recipes.ABLATION:
        expected = {"shipped": 0, "zero_snr_v": 2}.get(row, 1)    # zero terminal SNR needs v
        assert len(changed(row)) == expected, row
    assert changed("v+batch_32") == changed("v") | changed("batch_32")


def test_rows_build_and_unknown_rows_are_refused():
    net, recipe, sched = recipes.settings("shipped")
    assert count_parameters(UNet(**net)) == 1_112_801                 # the shipped network
    TrainConfig(**recipe)                                              # every field is a config field
    assert not recipes.schedule(**sched).zero_terminal_snr
    net, recipe, sched = recipes.settings("zero_snr_v")
    s = recipes.schedule(**sched)
    assert recipe["prediction"] == "v" and float(s.alpha_bars[-1]) == 0.0 and s.T == 1000
    cosine = recipes.schedule(**recipes.settings("cosine")[2])
    assert torch.equal(cosine.betas, NoiseSchedule.cosine(1000).betas)
    with pytest.raises(ValueError, match="unknown ablation row 'v2'.*shipped"):
        recipes.settings("v+v2")
    with pytest.raises(ValueError, match="'linear' or 'cosine'"):
        recipes.schedule("sigmoid")


def test_train_defaults_per_device():
    """`ddpm train`'s flags default to GPU_TRAIN on a GPU, to the ablation's best row on a CPU,
    and its help says both."""
    from ddpm_lib.__main__ import build_parser
    gpu, cpu = recipes.train_defaults("cuda"), recipes.train_defaults("cpu")
    assert gpu == recipes.GPU_TRAIN and set(cpu) == set(gpu)
    net, recipe, sched = recipes.settings(recipes.CPU_BEST)
    assert (cpu["lr"], cpu["base_channels"], cpu["schedule"]) == (recipe["lr"], net["base_channels"],
                                                                  sched["kind"])
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for flag in gpu:
        assert actions[flag].default is None, flag              # resolved once the device is known
    text = " ".join(train.format_help().split())
    assert all(f"(default: {gpu[k]} on a GPU, {cpu[k]} on a CPU)" in text for k in gpu if gpu[k] != cpu[k])


def test_timed_run_keeps_snapshots_and_score_reads_the_target(tmp_path):
    """A run of a row stops at its budget with its snapshots; score() samples each file with
    the target it was trained on (here v) and equals the Frechet distance computed by hand."""
    from ddpm_lib import data, features, metrics
    from ddpm_lib.pretrained import load_weights
    from ddpm_lib.samplers import sample
    images = data.load("fashion_mnist", "train", limit=256)[0]
    record = recipes.timed_run("v+batch_32+width_16", images, 0.5, tmp_path, snapshots=2)
    assert record["steps"] >= 1 and record["seconds"] >= 0.5 and record["recipe"]["prediction"] == "v"
    first, last = record["snapshots"]
    assert first["seconds"] >= 0.25 and first["step"] <= last["step"] == record["steps"]
    model, schedule, meta = load_weights(last["path"])
    assert meta["prediction"] == "v" and model.config["base_channels"] == 16
    reference = features.extract_features(images[:64])
    with torch.no_grad():
        x = sample(model, schedule, (8, 1, 28, 28), sampler="ddim", steps=2, prediction="v",
                   generator=torch.Generator().manual_seed(1234))
    by_hand = metrics.frechet_distance(features.extract_features(x), reference)
    assert recipes.score(last["path"], n=8, steps=2, reference=reference) == pytest.approx(by_hand, rel=1e-9)
