"""python -m ddpm_lib train / export / sample, end to end on a tiny model."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_unet
from ddpm_lib import recipes
from ddpm_lib.data import DATASETS
from ddpm_lib.pretrained import PRETRAINED, load_pretrained, load_weights
from ddpm_lib.samplers import SAMPLERS

TINY = ["--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1",
        "--attention-resolutions", "14", "--limit", "64", "--batch-size", "8", "--T", "50", "--no-progress"]


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "ddpm_lib", *args], capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def test_train_export_sample(tmp_path):
    ckpt, weights = tmp_path / "run.pt", tmp_path / "w.pt"
    rc, out = cli("train", "--checkpoint", str(ckpt), "--steps", "2", "--log-every", "1", *TINY)
    assert rc == 0, out
    config, cpu = torch.load(ckpt, weights_only=True)["config"], recipes.train_defaults("cpu")
    assert all(config[k] == cpu[k] for k in ("lr", "warmup_steps", "ema_decay", "prediction"))
    rc, out = cli("train", "--checkpoint", str(ckpt), "--steps", "3", "--log-every", "1",
                  "--lr", "1e-4", *TINY)                                # resumes, at a new lr
    assert rc == 0 and "resumed from step 2, trained to step 3" in out, out
    assert torch.load(ckpt, weights_only=True)["config"]["lr"] == 1e-4
    rc, out = cli("train", "--checkpoint", str(tmp_path / "x.pt"), "--precision", "fp64", *TINY)
    assert rc == 2 and "invalid choice: 'fp64'" in out and "'bf16'" in out, out
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


def test_train_with_another_target_and_sample_converts_it(tmp_path):
    """--prediction v on a zero-terminal-SNR schedule with min-SNR weights: export records the
    target, and `sample` converts the network's v as the library's sample(prediction="v") does."""
    from ddpm_lib import features
    from ddpm_lib.__main__ import main
    from ddpm_lib.samplers import sample
    ckpt, weights, npy = tmp_path / "run.pt", tmp_path / "w.pt", tmp_path / "s.npy"
    rc, out = cli("train", "--checkpoint", str(ckpt), "--steps", "2", "--prediction", "v",
                  "--weighting", "min_snr", "--zero-terminal-snr", *TINY)
    assert rc == 0, out
    assert cli("export", str(ckpt), str(weights))[0] == 0
    model, schedule, meta = load_weights(weights)
    assert meta["prediction"] == "v" and meta["train_config"]["weighting"] == "min_snr"
    assert schedule.zero_terminal_snr and float(schedule.alpha_bars[-1]) == 0.0
    main(["sample", "--weights", str(weights), "--n", "4", "--sampler", "ddim", "--steps", "5",
          "--out", "", "--npy", str(npy)])
    got = np.load(npy)
    with torch.no_grad():
        runs = {p: features.to_uint8(sample(model, schedule, (4, 1, 28, 28), sampler="ddim", steps=5,
                                            prediction=p, generator=torch.Generator().manual_seed(0)))[:, 0]
                for p in ("v", "x0")}
    assert np.array_equal(got, runs["v"]) and not np.array_equal(got, runs["x0"])
    rc, out = cli("train", "--checkpoint", str(tmp_path / "e.pt"), "--zero-terminal-snr", *TINY)
    assert rc == 2 and "prediction='v'" in out, out          # eps cannot be learned at alpha_bar = 0


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
    bench.main(["--nets", "small", "--variants", "ddpm_lib eager fp32,ddpm_lib eager bf16", "--steps", "1",
                "--warmup", "1", "--batch-size", "4", "--fp16", "--json", str(out)])
    result = json.loads(out.read_text())
    row, half = result["throughput"]
    assert half["variant"] == "ddpm_lib eager fp16" and half["images_per_s"] > 0    # --fp16 renames it
    assert row["variant"] == "ddpm_lib eager fp32" and row["params"] == 1_112_801
    assert row["images_per_s"] > 0 and row["ms_per_eval"] > 0 and row["tflops_per_s"] > 0
    assert result["environment"]["device"] == "cpu"


@pytest.mark.parametrize("capability, expected", [((9, 0), ("ddpm_lib fast", "bf16")),
                                                  ((7, 5), ("ddpm_lib fast (fp16)", "fp16"))])
def test_benchmark_variants_without_bf16(monkeypatch, capability, expected):
    """On a T4 (no bf16) the bf16 variants run in fp16 with loss scaling, and say so."""
    from ddpm_lib import bench
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    name, kind, fast = bench.variant("ddpm_lib fast", torch.device("cuda", 0))
    assert (name, fast["precision"]) == expected and kind == "ddpm_lib"
    name, _, fast = bench.variant("diffusers eager bf16", torch.device("cuda", 0))
    assert name == ("diffusers eager fp16" if capability < (8, 0) else "diffusers eager bf16")
    assert bench.variant("ddpm_lib eager fp32", torch.device("cuda", 0))[0] == "ddpm_lib eager fp32"
    assert bench.variant("ddpm_lib fast", torch.device("cpu"))[2]["precision"] == "bf16"  # CPUs compute bf16
    # --fp16: the T4's configuration on any device
    name, _, fast = bench.variant("ddpm_lib eager bf16", torch.device("cpu"), fp16=True)
    assert name == "ddpm_lib eager fp16" and fast["precision"] == "fp16"


def test_save_weights_round_trip(tmp_path):
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.pretrained import save_weights, sha256
    model = tiny_unet(base_channels=16)
    schedule = NoiseSchedule.cosine(T=40)
    path = tmp_path / "w.pt"
    digest = save_weights(model, schedule, path, {"step": 7})
    assert digest == sha256(path)
    loaded, loaded_schedule, meta = load_weights(path)
    assert meta == {"step": 7} and torch.equal(loaded_schedule.betas, schedule.betas)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="UNet"):
        save_weights(torch.nn.Linear(2, 2), schedule, tmp_path / "x.pt")


def test_cifar10_recipe_end_to_end_on_fake_data(tmp_path, fake_cifar10):
    """Chapter 11's CIFAR-10 command (3 channels, 32x32, --hflip), scaled down, on data in
    CIFAR-10's format: train, resume, export, sample."""
    ckpt, weights, npy = tmp_path / "cifar.pt", tmp_path / "w.pt", tmp_path / "s.npy"
    recipe = ["train", "--data", "cifar10", "--checkpoint", str(ckpt), "--base-channels", "16",
              "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "16",
              "--dropout", "0.1", "--batch-size", "4", "--lr", "2e-4", "--warmup-steps", "5", "--ema-decay", "0.9999",
              "--hflip", "--T", "50", "--log-every", "1", "--no-progress"]
    rc, out = cli(*recipe, "--steps", "2")
    assert rc == 0 and "cifar10: 10 images" in out, out
    rc, out = cli(*recipe, "--steps", "3")
    assert rc == 0 and "resumed from step 2, trained to step 3" in out, out
    rc, out = cli("export", str(ckpt), str(weights))
    assert rc == 0, out
    rc, out = cli("sample", "--weights", str(weights), "--n", "2", "--sampler", "ddim", "--steps", "3",
                  "--out", "", "--npy", str(npy))
    assert rc == 0, out
    assert np.load(npy).shape == (2, 32, 32, 3)


# ----------------------------------------------------------------------------------------
# Bad input and faults: a usage error or a message that says what to do, never a traceback
# ----------------------------------------------------------------------------------------
def run_main(capsys, *args):
    """``python -m ddpm_lib ARGS`` in this process (faster than a subprocess):
    (exit code, output)."""
    from ddpm_lib.__main__ import main
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_train_takes_attention_and_classes_from_the_dataset(tmp_path, fake_cifar10, capsys):
    """Without --attention-resolutions the U-Net attends where the dataset's registry entry
    says (16x16 for CIFAR-10, as Ho et al.), and --conditional gets its number of classes."""
    ckpt = tmp_path / "c.pt"
    code, out = run_main(capsys, "train", "--data", "cifar10", "--checkpoint", ckpt, "--base-channels", "8",
                         "--channel-mults", "1,2", "--num-res-blocks", "1", "--conditional", "--steps", "1",
                         "--batch-size", "2", "--T", "10", "--no-progress")
    assert code == 0, out
    config = torch.load(ckpt, weights_only=True)["model_config"]
    assert tuple(config["attention_resolutions"]) == DATASETS["cifar10"].attention_resolutions == (16,)
    assert config["num_classes"] == DATASETS["cifar10"].num_classes == 10


@pytest.mark.parametrize("args, flag", [
    (["train", "--checkpoint", "x.pt", "--device", "nonsense"], "--device"),
    (["train", "--checkpoint", "x.pt", "--threads", "-1"], "--threads"),
    (["export", "a.pt", "b.pt", "--meta", "{not json"], "--meta"),
    (["export", "a.pt", "b.pt", "--meta", "[1, 2]"], "--meta"),
    (["sample", "--weights", "w.pt", "--out", "x.txt"], "--out"),
    (["sample", "--weights", "w.pt", "--npy", "x.png"], "--npy"),
    (["sample", "--weights", "w.pt", "--steps", "5"], "--steps"),
    (["sample", "--weights", "w.pt", "--sampler", "ddpm", "--eta", "0.5"], "--eta"),
    (["sample", "--weights", "w.pt", "--n", "0"], "--n"),
    (["sample", "--weights", "w.pt", "--device", "cuda:99"], "--device"),
    (["sample", "--weights", "w.pt", "--sampler", "ddim", "--order", "1"], "--order"),
    (["sample", "--weights", "w.pt", "--guidance", "2"], "--guidance"),
    (["sample", "--weights", "w.pt", "--label", "shoe"], "--label"),
    (["sample", "--weights", "w.pt", "--label", "1", "--guidance", "-1"], "--guidance"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_flags_are_usage_errors(capsys, args, flag):
    code, out = run_main(capsys, *args)
    assert code == 2 and flag in out and "Traceback" not in out, out


def test_wrong_or_unreadable_files_are_named(tmp_path, capsys):
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.io import save_checkpoint
    from ddpm_lib.pretrained import save_weights
    weights, checkpoint = tmp_path / "w.pt", tmp_path / "run.pt"
    net = tiny_unet()
    save_weights(net, NoiseSchedule.linear(T=10), weights)
    save_checkpoint({"model": {}, "ema": {}, "optimizer": {}, "step": 1, "config": {}}, checkpoint)
    bad = tmp_path / "bad.pt"
    for content in (b"", np.random.default_rng(0).bytes(4096), weights.read_bytes()[:3000]):
        bad.write_bytes(content)
        code, out = run_main(capsys, "sample", "--weights", bad)
        assert code == 2 and f"{bad} is not a readable ddpm_lib weights file" in out, out
    code, out = run_main(capsys, "sample", "--weights", checkpoint)
    assert code == 2 and (f"training checkpoint (written by ddpm_lib.train); export its EMA "
                          f"weights first: python -m ddpm_lib export {checkpoint}") in out, out
    code, out = run_main(capsys, "export", weights, tmp_path / "again.pt")
    assert code == 2 and (f"already an exported weights file: sample from it with "
                          f"`python -m ddpm_lib sample --weights {weights}`") in out, out
    code, out = run_main(capsys, "train", "--checkpoint", weights, "--steps", "1", *TINY)
    assert code == 2 and "is an exported weights file" in out and "new checkpoint path" in out, out


def test_divergence_resume_settings_and_a_busy_checkpoint(tmp_path, capsys):
    """The run of the bug report: lr 1e6 with a checkpoint every step."""
    ckpt = tmp_path / "run.pt"
    train_args = ["train", "--checkpoint", ckpt, "--log-every", "1", "--checkpoint-every", "1",
                  *TINY]
    code, out = run_main(capsys, *train_args, "--steps", "4", "--lr", "1e6")
    assert code == 1 and "not overwritten; no checkpoint of this run was written" in out, out
    assert not ckpt.exists()
    code, out = run_main(capsys, *train_args, "--steps", "2", "--lr", "2e-4")
    assert code == 0 and ckpt.exists(), out
    # a resume with another schedule or other flips is refused, naming what differs
    code, out = run_main(capsys, *train_args, "--steps", "3", "--schedule", "cosine", "--hflip")
    assert code == 2 and "schedule: checkpoint T=50, betas 0.0001 .. 0.02, this run T=50" in out, \
        out
    assert "hflip: checkpoint False, this run True" in out and "resumed" not in out, out
    code, out = run_main(capsys, *train_args, "--steps", "3", "--lr", "1e6")
    assert code == 1 and f"the last good checkpoint is step 2 in {ckpt}" in out, out
    # another live run holds the checkpoint
    import socket
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.pt.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        code, out = run_main(capsys, *train_args, "--steps", "3")
        assert code == 1 and f"in use by another run (process {holder.pid}" in out, out
    finally:
        holder.kill()
        holder.wait()
    code, out = run_main(capsys, *train_args, "--steps", "3")
    assert code == 0 and "resumed from step 2, trained to step 3" in out, out


# ----------------------------------------------------------------------------------------
# Issue #18: help on every flag, --version, shipped models by name, --label/--guidance,
# the latent model decoded through its VAE, every sampler of the registry
# ----------------------------------------------------------------------------------------
def _parsers():
    """(name, parser) for the main parser and each sub-command's."""
    from ddpm_lib.__main__ import build_parser
    main_parser = build_parser()
    sub = next(a for a in main_parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("main", main_parser), *sub.choices.items()]


def test_every_flag_and_positional_has_help_and_defaults_show():
    from ddpm_lib.__main__ import HelpFormatter
    assert issubclass(HelpFormatter, argparse.ArgumentDefaultsHelpFormatter)
    parsers = _parsers()
    assert [name for name, _ in parsers] == ["main", "train", "export", "sample"]
    for name, parser in parsers:
        assert parser.formatter_class is HelpFormatter, name
        missing = [a.option_strings or a.dest for a in parser._actions
                   if not a.help or a.help == argparse.SUPPRESS or len(a.help) < 10]
        assert not missing, f"{name}: no help for {missing}"
        text = parser.format_help()                    # every help string formats (no stray %)
        if name != "main":                             # 2 to 4 examples, one to a line
            examples = [line for line in parser.epilog.splitlines() if line.startswith("  ")]
            assert 2 <= len(examples) <= 4 and "\n  python -m ddpm_lib " + name in text, name
    train_help, sample_help = parsers[1][1].format_help(), parsers[3][1].format_help()
    # --batch-size: the default depends on the device (recipes.train_defaults)
    assert "(default: 128 on a GPU, 32 on a CPU)" in " ".join(train_help.split())
    assert "(default: None)" not in train_help + sample_help            # None: the help says it
    for shipped in PRETRAINED:
        assert shipped in sample_help


def test_version(capsys):
    import ddpm_lib
    code, out = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"ddpm_lib {ddpm_lib.__version__}"


def test_main_is_a_console_entry_point(monkeypatch, capsys):
    """``ddpm = "ddpm_lib.__main__:main"``: main() reads sys.argv and names itself ddpm."""
    from ddpm_lib.__main__ import main
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/ddpm", "sample", "--help"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "usage: ddpm sample" in capsys.readouterr().out


def test_sample_a_shipped_model_by_name_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out = run_main(capsys, "sample", "--weights", "fashion_mnist_ddpm", "--n", 2, "--steps", 2,
                         "--sampler", "ddim")
    assert code == 0 and "wrote samples.png" in out, out
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_and_guidance_on_the_conditional_model(tmp_path, capsys):
    common = ["sample", "--weights", "fashion_mnist_cfg", "--n", 2, "--steps", 2, "--sampler", "ddim",
              "--out", ""]

    def images(*extra):
        npy = tmp_path / "s.npy"
        code, out = run_main(capsys, *common, "--npy", npy, *extra)
        assert code == 0, out
        return np.load(npy)

    unconditional, w0 = images(), images("--label", 3, "--guidance", 0)
    assert unconditional.shape == (2, 28, 28) and np.array_equal(unconditional, w0)  # w = 0: null label
    w1, w3 = images("--label", 3, "--guidance", 1), images("--label", 3)        # default w = 2
    assert not np.array_equal(w0, w1) and not np.array_equal(w1, w3)
    png = tmp_path / "all.png"
    code, out = run_main(capsys, *common[:-2], "--out", png, "--label", "all", "--n", 1, "--guidance", 3)
    assert code == 0 and "one row per class, 1 each" in out and png.stat().st_size > 100, out


def test_the_latent_model_is_decoded_through_its_vae(tmp_path, capsys):
    from ddpm_lib.features import to_uint8
    from ddpm_lib.pretrained import PRETRAINED, WEIGHTS_DIR, load_pretrained_vae
    from ddpm_lib.samplers import sample
    shipped = WEIGHTS_DIR / PRETRAINED["fashion_mnist_latent"]["file"]
    outputs = []
    for weights in ("fashion_mnist_latent", shipped):       # by name, or the shipped file's path
        png, npy = tmp_path / "l.png", tmp_path / "l.npy"
        code, out = run_main(capsys, "sample", "--weights", weights, "--n", 2, "--steps", 2,
                             "--sampler", "ddim", "--out", png, "--npy", npy)
        assert code == 0 and png.stat().st_size > 100, out
        outputs.append(np.load(npy))
    assert outputs[0].shape == (2, 28, 28) and np.array_equal(*outputs)          # 1-channel images
    model, schedule, _ = load_pretrained("fashion_mnist_latent")
    with torch.no_grad():
        z = sample(model, schedule, (2, 4, 7, 7), sampler="ddim", steps=2, clip_x0=False,
                   generator=torch.Generator().manual_seed(0))
        expected = to_uint8(load_pretrained_vae().decode_latents(z))[:, 0]
    assert np.array_equal(outputs[0], expected)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registry_sampler_is_offered_and_runs(tmp_path, capsys, name):
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.__main__ import build_parser
    from ddpm_lib.pretrained import save_weights
    sample_parser = dict(_parsers())["sample"]
    sampler_flag = next(a for a in sample_parser._actions if "--sampler" in a.option_strings)
    assert sorted(sampler_flag.choices) == sorted(SAMPLERS)
    for option in SAMPLERS[name].options:                       # each option has its flag
        assert f"--{option.replace('_', '-')}" in build_parser().format_help() + sample_parser.format_help()
    weights, npy = tmp_path / "w.pt", tmp_path / "s.npy"
    save_weights(tiny_unet(), NoiseSchedule.linear(T=10), weights)
    steps = [] if SAMPLERS[name].steps is None else ["--steps", 2]     # ddpm: all T = 10
    code, out = run_main(capsys, "sample", "--weights", weights, "--sampler", name, *steps, "--n", 2,
                         "--out", "", "--npy", npy)
    assert code == 0, out
    assert np.load(npy).shape == (2, 28, 28)


def test_sample_errors_name_what_to_do(tmp_path, capsys):
    code, out = run_main(capsys, "sample", "--weights", "fashion_mnist_dpm")
    assert code == 2 and "no shipped model of that name" in out, out
    assert all(name in out for name in PRETRAINED)
    code, out = run_main(capsys, "sample", "--weights", "fashion_mnist_ddpm", "--label", 1, "--sampler",
                         "ddim", "--steps", 2, "--out", "")
    assert code == 2 and "fashion_mnist_ddpm is unconditional" in out and "drop --label" in out, out
    code, out = run_main(capsys, "sample", "--weights", "fashion_mnist_cfg", "--label", 10, "--sampler",
                         "ddim", "--steps", 2, "--out", "")
    assert code == 2 and "--label 10: fashion_mnist_cfg has classes 0..9" in out, out
    # a network whose samples are not images (4 channels) and that no VAE decodes
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.pretrained import save_weights
    weights = tmp_path / "four.pt"
    save_weights(tiny_unet(in_channels=4), NoiseSchedule.linear(T=10), weights)
    code, out = run_main(capsys, "sample", "--weights", weights, "--sampler", "ddim", "--steps", 2)
    assert code == 2 and "4-channel samples, not images" in out and "Traceback" not in out, out


# ----------------------------------------------------------------------------------------
# Issue #20: sample a text-conditioned model (chapter 12) with --caption and --guidance
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_weights(tmp_path_factory):
    """A tiny TextConditionedUNet, untrained, saved as `export` would (any file works)."""
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.pretrained import save_weights
    from ddpm_lib.text import TextConditionedUNet
    torch.manual_seed(0)
    model = TextConditionedUNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                attention_resolutions=(), dropout=0.0, text_dim=8, text_layers=1,
                                text_heads=2, num_heads=2)
    path = tmp_path_factory.mktemp("text") / "text.pt"
    save_weights(model, NoiseSchedule.linear(T=10), path)
    return path


def test_sample_a_caption(tmp_path, capsys, text_weights):
    def images(*extra, n=3):
        npy = tmp_path / "s.npy"
        code, out = run_main(capsys, "sample", "--weights", text_weights, "--n", n, "--sampler", "ddim",
                             "--steps", 2, "--out", "", "--npy", npy, *extra)
        assert code == 0, out
        return np.load(npy)

    trouser = images("--caption", "a dark trouser")
    assert trouser.shape == (3, 28, 28) and trouser.dtype == np.uint8
    assert np.array_equal(trouser, images("--caption", "a dark trouser"))      # same seed and caption
    assert not np.array_equal(trouser, images("--caption", "a dark trouser", "--seed", 1))
    bag = images("--caption", "a small bag")
    assert not np.array_equal(trouser, bag)
    assert not np.array_equal(trouser, images("--caption", "a dark trouser", "--guidance", 1))  # default 3
    # w = 0 is the empty caption's prediction: the caption no longer matters, and no caption is w = 0
    w0 = images("--caption", "a dark trouser", "--guidance", 0)
    assert np.array_equal(w0, images("--caption", "a small bag", "--guidance", 0))
    assert np.array_equal(w0, images())
    png = tmp_path / "t.png"
    code, out = run_main(capsys, "sample", "--weights", text_weights, "--n", 4, "--sampler", "ddim",
                         "--steps", 2, "--out", png, "--caption", "A Dark Trouser", "--guidance", 2)
    assert code == 0 and f"wrote {png}" in out and png.read_bytes()[:4] == b"\x89PNG", out


def test_caption_errors_name_what_to_do(tmp_path, capsys, text_weights):
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.pretrained import save_weights
    fast = ["--sampler", "ddim", "--steps", 2, "--n", 1, "--out", ""]
    plain, cfg = tmp_path / "plain.pt", tmp_path / "cfg.pt"
    save_weights(tiny_unet(), NoiseSchedule.linear(T=10), plain)
    save_weights(tiny_unet(num_classes=10), NoiseSchedule.linear(T=10), cfg)
    cases = [  # (arguments, what the message must say)
        (["--weights", plain, "--caption", "a bag"],
         [f"--caption: {plain} is not text-conditioned", "unconditional", "drop --caption"]),
        (["--weights", cfg, "--caption", "a bag"],
         [f"--caption: {cfg} is not text-conditioned", "class-conditional", "use --label instead"]),
        (["--weights", text_weights, "--label", 1],
         [f"--label: {text_weights} is text-conditioned", "use --caption instead"]),
        (["--weights", text_weights, "--label", "all", "--guidance", 2], ["use --caption instead"]),
        (["--weights", text_weights, "--caption", "a bag", "--label", 8],
         ["--caption and --label together", "text-conditioned", "class-conditional"]),
        (["--weights", text_weights, "--caption", "a red bag"],
         ["--caption 'a red bag': unknown word 'red'", "'dark'", "'trouser'"]),     # the vocabulary
        (["--weights", text_weights, "--caption", "a small dark bag, a small dark bag"],
         ["--caption 'a small dark bag, a small dark bag': ", "9 words, more than max_len=8"]),
        (["--weights", text_weights, "--guidance", 2], ["--guidance needs --label or --caption"]),
    ]
    for args, says in cases:
        code, out = run_main(capsys, "sample", *args, *fast)
        assert code == 2 and "error: " in out and "Traceback" not in out, out
        assert all(part in out for part in says), (says, out)


def test_the_help_documents_caption():
    sample_help = " ".join(dict(_parsers())["sample"].format_help().split())
    assert "--caption TEXT" in sample_help and "one caption for all --n images" in sample_help
    assert '--caption "a dark trouser" --guidance 3' in sample_help                 # an example
