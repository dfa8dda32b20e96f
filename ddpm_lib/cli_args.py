"""The command line's argument types and help (``python -m ddpm_lib``, :mod:`ddpm_lib.__main__`):
each type turns a flag's text into its value, and a bad value into a usage error (exit code 2)
that names the flag and says what to give instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# what --out may end with: formats that viz.save_grid (matplotlib, through PIL) writes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tiff", ".webp", ".pdf", ".svg")
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cuda if there is one)"
OPTION_HELP = {"eta": "noise of each step: 0 deterministic, 1 as much as DDPM",
               "sigma": "reverse-step variance: beta (Ho et al.'s choice) or beta_tilde",
               "order": "1 (first order, as DDIM) or 2 (reuses the previous prediction)"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help (not None or False: the help says those), the epilog's lines kept."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


# ----------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error (exit code 2) that names the flag
# ----------------------------------------------------------------------------------------
def _at_least(low, kind=int):
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:                                    # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {value}")
        return value
    return parse


def _label(text: str):
    if text == "all" or text.isdigit():
        return text if text == "all" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a class number (0, 1, ...) or 'all'")


def _device(text: str) -> torch.device:
    """A torch device this machine has: cpu, cuda, cuda:1, mps."""
    bad = argparse.ArgumentTypeError
    try:
        device = torch.device(text)
    except RuntimeError:
        raise bad(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise bad(f"{text}: ddpm_lib runs on cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bad(f"{text}: this machine has no CUDA GPU (torch sees none); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise bad(f"{text}: there are only {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise bad(f"{text}: MPS is not available on this machine; use cpu")
    return device


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); pass an object such as "
                                         "'{\"note\": \"first run\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), "
                                         f"got {type(value).__name__} {text}")
    return value


def _image_path(text: str) -> str:
    """An image file name save_grid can write, or "" for none."""
    if text and Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in an image suffix; use one of "
                                         f"{', '.join(IMAGE_SUFFIXES)} (or '' for no image)")
    return text


def _npy_path(text: str) -> str:
    if Path(text).suffix != ".npy":       # numpy would append .npy and write another file
        raise argparse.ArgumentTypeError(f"{text!r} must end in .npy")
    return text


def _switch(text: str):
    """auto -> None (on on a GPU), on -> True, off -> False."""
    return {"auto": None, "on": True, "off": False}[text]
