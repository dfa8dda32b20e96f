"""Command line: train, export and sample without notebooks (``python -m ddpm_lib`` or
``ddpm``; ``COMMAND --help`` lists the flags, with examples). ``train`` resumes from
``--checkpoint``; ``export`` keeps the EMA weights (a ``.pt`` file, or a safetensors folder
for the Hub); ``sample`` takes such a file or a shipped model's name and writes images.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, data, features, recipes
from .accel import COMPILE_MODES, PRECISIONS, distributed_info, init_distributed
from .cli_args import (DEVICE_HELP, IMAGE_SUFFIXES, OPTION_HELP, HelpFormatter, _at_least, _device, _image_path,
                       _ints, _json_object, _label, _npy_path, _switch)
from .guidance import guided_model, guided_text_model
from .hub import CONFIG_FILE, WEIGHTS_FILE, export_safetensors
from .io import FILE_KINDS, CheckpointBusy, file_kind, load_checkpoint, sha256
from .objectives import WEIGHTINGS, check_schedule
from .pretrained import (PRETRAINED, build_model, load_pretrained, load_pretrained_vae, load_weights,
                         prediction_of, save_weights)
from .samplers import SAMPLERS, sample
from .schedules import NoiseSchedule
from .text import TextConditionedUNet
from .train import TrainConfig, train
from .unet import UNet, count_parameters
from .viz import save_grid

LATENT_MODELS = sorted(name for name, entry in PRETRAINED.items() if entry.get("latent"))
BEST_GUIDANCE = 2.0             # chapter 9: the lowest FID-style score of the shipped cfg model
BEST_TEXT_GUIDANCE = 3.0        # for --caption; chapter 12: from w = 2 on, seen captions come out as asked
OPTIONS = sorted({name for entry in SAMPLERS.values() for name in entry.options})  # each: a flag


def cmd_train(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = data.dataset_info(args.data)
    images, labels = data.load(info.name, "train", limit=args.limit)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:   # started by torchrun
        device = init_distributed()
    else:
        device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for flag, value in recipes.train_defaults(device.type).items():   # flags not given
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    schedule = recipes.schedule(args.schedule, args.zero_terminal_snr, args.T)
    check_schedule(schedule, args.prediction)     # eps cannot be learned where alpha_bar = 0
    torch.manual_seed(args.seed)
    model = UNet(in_channels=images.shape[1], base_channels=args.base_channels,
                 channel_mults=_ints(args.channel_mults), num_res_blocks=args.num_res_blocks,
                 attention_resolutions=(info.attention_resolutions if args.attention_resolutions is None
                                        else _ints(args.attention_resolutions)), dropout=args.dropout,
                 num_classes=info.num_classes if args.conditional else None, image_size=images.shape[-1])
    main_process = distributed_info()[0] == 0
    if main_process:
        print(f"{args.data}: {len(images)} images | UNet {count_parameters(model):,} parameters | {device}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         hflip=args.hflip, precision=args.precision, prediction=args.prediction,
                         weighting=args.weighting, snr_gamma=args.snr_gamma,
                         channels_last=_switch(args.channels_last),
                         compile={"auto": None, "off": False}.get(args.compile, args.compile))
    start = time.time()
    result = train(model, schedule, images, config, labels=labels if args.conditional else None,
                   checkpoint=args.checkpoint, device=device, progress=not args.no_progress)
    if main_process:
        resumed = f"resumed from step {result.resumed_from}, " if result.resumed_from is not None else ""
        losses = result.history["loss"]
        last = (f"last loss {losses[-1]:.4f}" if losses
                else f"no loss logged yet (every {args.log_every} steps)")
        print(f"{resumed}trained to step {result.step} in {time.time() - start:.0f} s this run; "
              f"{last}; checkpoint {args.checkpoint}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _training_checkpoint(path) -> dict:
    """Load ``path``, a checkpoint of ``python -m ddpm_lib train``; any other file is refused
    with what it is and what to pass instead."""
    state = load_checkpoint(path, what="training checkpoint",
                            remedy="pass the checkpoint `train` wrote")
    kind = file_kind(state)
    if kind == "weights":
        raise ValueError(f"{path} is already an exported weights file: sample from it with "
                         f"`python -m ddpm_lib sample --weights {path}`")
    if kind != "checkpoint":
        raise ValueError(f"{path} is {FILE_KINDS[kind]}, not a training checkpoint; pass the file "
                         "`python -m ddpm_lib train --checkpoint` wrote")
    if state.get("model_config") is None:
        raise ValueError(f"{path} has no model configuration; it was not made by ddpm_lib.train "
                         "with a UNet")
    return state


def _check_finite_output(model: UNet, schedule: NoiseSchedule, source) -> None:
    """Refuse weights that give NaN on pure noise: what a diverged run leaves."""
    g = torch.Generator().manual_seed(0)
    size, channels = model.config["image_size"], model.config["in_channels"]
    x = torch.randn((2, channels, size, size), generator=g)
    t = torch.tensor([0, schedule.T - 1])
    y = torch.full((2,), model.num_classes) if model.num_classes else None
    with torch.no_grad():
        out = model(x, t) if y is None else model(x, t, y)
    if not torch.isfinite(out).all():
        raise ValueError(f"the EMA weights in {source} give NaN or infinite output: the run "
                         "diverged. Export an earlier checkpoint, or train again with a lower --lr")


def cmd_export(args) -> None:
    if args.format == "safetensors":          # a weights file -> a Hub-style folder
        folder = export_safetensors(args.checkpoint, args.out)
        return print(f"wrote {folder / WEIGHTS_FILE} and {folder / CONFIG_FILE}")
    state = _training_checkpoint(args.checkpoint)
    meta = {"step": state["step"], "train_config": state["config"], "source": Path(args.checkpoint).name,
            "prediction": state["config"].get("prediction", "eps")}          # what `sample` converts
    meta.update(args.meta or {})
    ema_model = build_model(state["model_config"])
    ema_model.load_state_dict(state["ema"]["model"])
    _check_finite_output(ema_model.eval(), NoiseSchedule(state["betas"]), args.checkpoint)
    digest = save_weights(ema_model, NoiseSchedule(state["betas"]), args.out, meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB), sha256 {digest}")


def _check_output_folder(path: str, flag: str) -> None:
    """Say before sampling, not after, that an output cannot be written."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable; pick another path")


def _load_model(weights: str, device):
    """``(model, schedule, what it predicts, shipped name or None)`` from a weights file or a
    shipped model's name; a file whose bytes are a shipped model's is that model (so it is
    decoded alike)."""
    path = Path(weights)
    if path.is_file():
        digest = sha256(path)
        name = next((n for n, entry in PRETRAINED.items() if entry["sha256"] == digest), None)
        model, schedule, meta = load_weights(path, device)
    elif weights in PRETRAINED:
        (model, schedule, meta), name = load_pretrained(weights, device), weights
    else:
        raise FileNotFoundError(f"--weights {weights}: no weights file at {path}, and no shipped "
                                f"model of that name; the shipped models are {', '.join(sorted(PRETRAINED))}")
    if (prediction := prediction_of(meta)) == "flow":
        raise ValueError(f"--weights {weights} predicts a flow-matching velocity, which these "
                         "samplers do not take; sample it with ddpm_lib.flow.flow_sample (chapter 15)")
    return model, schedule, prediction, name
    raise FileNotFoundError(f"--weights {weights}: no weights file at {path}, and no shipped model "
                            f"of that name; the shipped models are {', '.join(sorted(PRETRAINED))}")


def _captioned(model, args):
    """The model function of a text model, guided towards --caption (without: the empty caption)."""
    if not isinstance(model, TextConditionedUNet):
        kind = ("class-conditional (it takes a class, not a caption): use --label instead" if model.num_classes
                else "unconditional (it takes no caption): drop --caption")
        raise ValueError(f"--caption: {args.weights} is not text-conditioned; it is {kind}, or sample a "
                         "text-conditioned model (a TextConditionedUNet, chapter 12)")
    if args.label is not None:
        raise ValueError(f"--label: {args.weights} is text-conditioned (it reads a caption, not a class "
                         "number); use --caption instead, e.g. --caption \"a dark trouser\"")
    if args.caption is None:
        return model
    try:
        tokens = model.tokenize(args.caption)
    except ValueError as err:               # an unknown word (the vocabulary listed), too many words
        raise ValueError(f"--caption {args.caption!r}: {err}") from None
    return guided_text_model(model, tokens, BEST_TEXT_GUIDANCE if args.guidance is None else args.guidance)


def _conditioned(model, args, device):
    """The model function to sample (guided towards --label's classes or --caption) and the labels,
    or None."""
    if args.caption is not None or isinstance(model, TextConditionedUNet):
        return _captioned(model, args), None
    if args.label is None:
        return model, None
    if not (classes := model.num_classes):
        raise ValueError(f"--label: {args.weights} is unconditional (it takes no class); drop "
                         "--label, or sample a class-conditional model such as fashion_mnist_cfg")
    if args.label != "all" and args.label >= classes:
        raise ValueError(f"--label {args.label}: {args.weights} has classes 0..{classes - 1}")
    y = (torch.arange(classes).repeat_interleave(args.n) if args.label == "all"
         else torch.full((args.n,), args.label)).to(device)
    w = BEST_GUIDANCE if args.guidance is None else args.guidance
    return guided_model(model, y, w), y


def cmd_sample(args) -> None:
    for path, flag in ((args.out, "--out"), (args.npy, "--npy")):
        if path:
            _check_output_folder(path, flag)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, schedule, prediction, name = _load_model(args.weights, device)
    c, s = model.config["in_channels"], model.config["image_size"]
    vae = load_pretrained_vae(device) if name in LATENT_MODELS else None
    if vae is None and c not in (1, 3):
        raise ValueError(f"{args.weights} makes {c}-channel samples, not images (1 or 3 channels); "
                         f"only the shipped latent models ({', '.join(LATENT_MODELS)}) are decoded")
    net, y = _conditioned(model, args, device)
    g = torch.Generator(device).manual_seed(args.seed)
    shape = (args.n if y is None else len(y), c, s, s)
    options = {o: getattr(args, o) for o in OPTIONS if getattr(args, o) is not None}  # main() checked
    with torch.no_grad():                       # latents are not in [-1, 1]: no clipping (chapter 10)
        x = sample(net, schedule, shape, sampler=args.sampler, steps=args.steps, generator=g,
                   prediction=prediction, progress=True, clip_x0=vae is None, **options)
        x = x if vae is None else vae.decode_latents(x)
    if args.out:
        save_grid(x, args.out, nrow=args.n if args.label == "all" else int(np.ceil(np.sqrt(args.n))))
        print(f"wrote {args.out}" + (f" (one row per class, {args.n} each)" if args.label == "all" else ""))
    if args.npy:
        u8 = features.to_uint8(x)
        u8 = u8[:, 0] if x.shape[1] == 1 else u8.transpose(0, 2, 3, 1)
        np.save(args.npy, u8)
        print(f"wrote {args.npy} {u8.shape} {u8.dtype}")


EXAMPLES = {  # each sub-command's epilog
    "train": """examples:
  %(prog)s --checkpoint runs/fashion.pt --steps 20000
  %(prog)s --checkpoint runs/cfg.pt --conditional   # then sample --label
  %(prog)s --checkpoint runs/v.pt --prediction v --zero-terminal-snr
  torchrun --nproc_per_node=4 -m ddpm_lib train --checkpoint runs/fashion.pt""",
    "export": """examples:
  %(prog)s runs/fashion.pt weights.pt
  %(prog)s runs/fashion.pt weights.pt --meta '{"note": "first run"}'""",
    "sample": """examples:
  %(prog)s --weights runs/weights.pt --n 16 --sampler dpm_solver --npy s.npy
  %(prog)s --weights fashion_mnist_cfg --label all --n 4 --guidance 3
  %(prog)s --weights fashion_mnist_text --caption "a dark trouser" --guidance 3
  %(prog)s --weights fashion_mnist_latent --sampler ddim --out latent.png"""}


def by_device(flag: str) -> str:
    """' (default: GPU value on a GPU, CPU value on a CPU)' for a flag of `train`."""
    gpu, cpu = (recipes.train_defaults(kind)[flag] for kind in ("cuda", "cpu"))
    return f" (default: {gpu} on a GPU, {cpu} on a CPU)" if gpu != cpu else f" (default: {gpu})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m ddpm_lib`` (``ddpm`` when installed as a command)."""
    prog = "ddpm" if Path(sys.argv[0]).stem == "ddpm" else "python -m ddpm_lib"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                                epilog=f"run `{prog} COMMAND --help` for a command's flags and examples")
    p.add_argument("--version", action="version", version=f"ddpm_lib {__version__}",
                   help="print ddpm_lib's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do:")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                              formatter_class=HelpFormatter)

    t = command("train", "train a U-Net, with L_simple unless --prediction or --weighting say otherwise "
                "(resumes from --checkpoint when it exists)")
    t.add_argument("--data", default="fashion_mnist", choices=sorted(data.DATASETS), help="training images")
    t.add_argument("--limit", type=_at_least(1), help="use only the first N training images (default: all)")
    t.add_argument("--checkpoint", required=True, help="checkpoint file, resumed from when it exists")
    t.add_argument("--steps", type=int, default=20000, help="total optimiser steps, a resumed run's included")
    t.add_argument("--batch-size", type=int, help="images per optimiser step (all processes)" + by_device("batch_size"))
    t.add_argument("--lr", type=float, help="AdamW learning rate (after the warm-up)" + by_device("lr"))
    t.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up from 0"
                   + by_device("warmup_steps"))
    t.add_argument("--ema-decay", type=float, help="EMA decay (export keeps the EMA)" + by_device("ema_decay"))
    t.add_argument("--grad-clip", type=float, default=1.0, help="largest global gradient norm")
    t.add_argument("--T", type=_at_least(1), default=1000, help="number of diffusion timesteps T")
    t.add_argument("--schedule", choices=["linear", "cosine"], help="noise schedule: betas 1e-4 .. 0.02 "
                   "(Ho et al.) or cosine (Nichol & Dhariwal)" + by_device("schedule"))
    t.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, help="rescale the schedule "
                   "so that alpha_bar_{T-1} = 0 (Lin et al. 2024; needs --prediction v or x0)"
                   + by_device("zero_terminal_snr"))
    t.add_argument("--prediction", choices=["eps", "x0", "v"], help="what the network predicts (recorded in "
                   "the exported weights; `sample` converts it)" + by_device("prediction"))
    t.add_argument("--weighting", choices=WEIGHTINGS, help="loss weight per timestep: uniform (L_simple), "
                   "min_snr (Hang et al. 2023, --snr-gamma) or elbo" + by_device("weighting"))
    t.add_argument("--snr-gamma", type=_at_least(0.0, float), default=5.0, help="gamma of min_snr")
    t.add_argument("--base-channels", type=int, help="U-Net channels at full resolution" + by_device("base_channels"))
    t.add_argument("--channel-mults", default="1,2,2", help="channel multiplier of each resolution level")
    t.add_argument("--num-res-blocks", type=int, help="residual blocks per resolution level"
                   + by_device("num_res_blocks"))
    t.add_argument("--attention-resolutions", help="comma-separated resolutions with self-attention, '' "
                   "for none (default: the dataset's, 7 for 28x28 images, 16 for CIFAR-10)")
    t.add_argument("--dropout", type=float, help="dropout probability in the residual blocks" + by_device("dropout"))
    t.add_argument("--conditional", action="store_true",
                   help="class-conditional: labels as input, 10%% of them dropped (for guidance)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise")
    t.add_argument("--checkpoint-every", type=int, default=500, help="write the checkpoint every N steps")
    t.add_argument("--log-every", type=int, default=50, help="record the mean loss every N steps")
    t.add_argument("--device", type=_device, help=DEVICE_HELP)
    t.add_argument("--threads", type=_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips (CIFAR-10; not for digits)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto", help="arithmetic of the training step "
                   "(auto: bf16 on GPUs of compute capability 8+, fp16 on older ones (T4), fp32 on a CPU)")
    t.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="NHWC memory layout (auto: on on a GPU, off on a CPU)")
    t.add_argument("--compile", choices=["auto", "off", *(m for m in COMPILE_MODES if isinstance(m, str))],
                   default="auto", help="torch.compile mode (auto: reduce-overhead on a GPU, off on a CPU)")
    t.set_defaults(func=cmd_train)

    e = command("export", "keep the EMA weights of a checkpoint for sampling")
    e.add_argument("checkpoint", help="training checkpoint (--format safetensors: weights file)")
    e.add_argument("out", help="weights file to write (EMA weights, U-Net configuration, schedule)")
    e.add_argument("--meta", type=_json_object, help="JSON object of extra metadata to store")
    e.add_argument("--format", choices=["pt", "safetensors"], default="pt", help="pt: from a "
                   "checkpoint, one file; safetensors: from a weights file, a folder for the Hub")
    e.set_defaults(func=cmd_export)

    s = command("sample", "sample images: a PNG grid and/or a .npy of uint8")
    s.add_argument("--weights", required=True, help="a file `export` wrote, or a shipped model: "
                   + ", ".join(sorted(PRETRAINED)) + " (the latent one is decoded by the shipped VAE)")
    s.add_argument("--n", type=_at_least(1), default=64, help="number of images (--label all: per class)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm",
                   help=", ".join(f"{name} ({entry.label})" for name, entry in sorted(SAMPLERS.items())))
    s.add_argument("--steps", type=_at_least(1), help="timesteps (1 network call each, heun 2) (default: " + ", ".join(
        f"{name} {entry.steps or 'all T'}" for name, entry in sorted(SAMPLERS.items())) + ")")
    for name in OPTIONS:            # a flag for each option of the registry's samplers
        takers = {n: entry.options[name] for n, entry in sorted(SAMPLERS.items()) if name in entry.options}
        s.add_argument(f"--{name.replace('_', '-')}", type=type(next(iter(takers.values()))),
                       help=f"{OPTION_HELP.get(name, 'an option of the sampler')} (" + ", ".join(
                           f"{n} default {v}" for n, v in takers.items()) + ")")
    s.add_argument("--label", type=_label, metavar="{K,all}", help="class K of all images, or 'all': --n "
                   "of each; none: unconditional (class-conditional models; fashion_mnist_cfg: " + ", ".join(
                       f"{i} {c}" for i, c in enumerate(data.DATASETS["fashion_mnist"].classes)) + ")")
    s.add_argument("--caption", metavar="TEXT", help="one caption for all --n images, in the model's "
                   "vocabulary, e.g. \"a dark trouser\"; none: the empty caption (text-conditioned models)")
    s.add_argument("--guidance", type=_at_least(0.0, float), metavar="W", help="classifier-free guidance "
                   "weight, with --label or --caption: 0 unconditional, 1 conditional, above 1 sharper and "
                   f"less varied (default: {BEST_GUIDANCE:g} with --label, the best FID in chapter 9; "
                   f"{BEST_TEXT_GUIDANCE:g} with --caption)")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise and the sampler's noise")
    s.add_argument("--out", type=_image_path, default="samples.png",
                   help=f"image grid ({', '.join(IMAGE_SUFFIXES)}; '' for none)")
    s.add_argument("--npy", type=_npy_path, help="uint8 images (N, H, W) or (N, H, W, 3): a .npy file")
    s.add_argument("--device", type=_device, help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample, parser=s)
    return p


def _takes(entry, option: str) -> bool:
    return entry.steps is not None if option == "steps" else option in entry.options


def main(argv=None) -> None:
    """``python -m ddpm_lib`` and the ``ddpm`` command: ``argv`` (default: ``sys.argv[1:]``)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "sample":       # a flag the sampler does not take is a usage error
        given = [o for o in ("steps", *OPTIONS) if getattr(args, o) is not None
                 and not _takes(SAMPLERS[args.sampler], o)]
        if given:
            flags = " or ".join("--" + o.replace("_", "-") for o in given)
            others = sorted(n for n, e in SAMPLERS.items() if all(_takes(e, o) for o in given))
            why = " (it always takes all T steps)" if "steps" in given else ""
            add = f"add --sampler {' or '.join(others)}, or " if others else ""
            args.parser.error(f"the {args.sampler} sampler takes no {flags}{why}: {add}leave "
                              f"{'it' if len(given) == 1 else 'them'} out")
        if args.caption is not None and args.label is not None:
            args.parser.error("--caption and --label together: give --caption to a text-conditioned "
                              "model, --label to a class-conditional one")
        if args.guidance is not None and args.label is None and args.caption is None:
            args.parser.error("--guidance needs --label or --caption: the class or caption to guide towards")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:      # bad input: what was wrong, what to do
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, CheckpointBusy, OSError) as err:    # the run could not go on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
