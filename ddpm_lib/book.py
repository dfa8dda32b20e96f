"""What a chapter's first cell calls: :func:`setup` picks the device, seeds every random
number generator, reads the profile and prints what the reader is running on.

Profiles (environment variable ``DDPM_PROFILE``) size the work of every chapter:

* ``smoke``: what CI runs; every chapter in seconds on two CPU cores;
* ``cpu``: a reader without a GPU; each chapter in a few minutes on a laptop;
* ``gpu``: the full recipe on a (Colab) GPU.

The default is ``gpu`` when CUDA is available, else ``cpu``. A chapter sizes its work with
:meth:`Setup.pick`: ``steps = book.pick(smoke=20, cpu=2000, gpu=50000)``.
"""
from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, io, viz

PROFILES = ("smoke", "cpu", "gpu")


def in_colab() -> bool:
    """Whether this runs in Google Colab. Used by :func:`setup`, and to mount Google Drive in
    chapter 5, "Train here, or load the shipped weights?"."""
    return "google.colab" in sys.modules


def get_profile(profile: str | None = None) -> str:
    """The profile: the argument, else ``$DDPM_PROFILE``, else gpu/cpu by CUDA availability.
    Used by every chapter's first cell (:func:`setup`); the profiles are explained in
    "How to use this book" (how_to_use.md), "Profiles: how much work a chapter does"."""
    if profile is None:
        profile = os.environ.get("DDPM_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    profile = profile.strip().lower()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; DDPM_PROFILE must be one of {', '.join(PROFILES)}")
    return profile


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA). Used by every chapter's first cell
    (:func:`setup`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """The result of :func:`setup`: ``device``, ``profile`` and ``seed`` of this run.
    Every chapter's first cell keeps it as ``cfg`` and sizes its work with ``cfg.pick``, see
    "How to use this book" (how_to_use.md), "Profiles: how much work a chapter does"."""
    device: torch.device
    profile: str
    seed: int

    @property
    def progress(self) -> bool:
        """Whether long runs show a progress bar (``progress=cfg.progress``): in the cpu and
        gpu profiles, unless ``DDPM_PROGRESS=0``. Off in smoke, whose stderr nbval compares,
        and when scripts/execute_chapter.py writes the book's outputs (no stale bars on
        the page)."""
        return self.profile != "smoke" and os.environ.get("DDPM_PROGRESS", "1") != "0"

    def pick(self, **by_profile):
        """The value for the current profile: ``pick(smoke=10, cpu=200, gpu=5000)``."""
        missing = [p for p in PROFILES if p not in by_profile]
        unknown = [p for p in by_profile if p not in PROFILES]
        if missing or unknown:
            raise ValueError(f"pick needs exactly the profiles {PROFILES}; missing {missing}, unknown {unknown}")
        return by_profile[self.profile]


DRIVE = Path("/content/drive/MyDrive")


def checkpoint_dir(name: str = "ddpm-book", local: str | os.PathLike = "checkpoints") -> Path:
    """Where a chapter keeps its checkpoints: ``MyDrive/<name>`` when Google Drive is mounted
    in Colab (``from google.colab import drive; drive.mount("/content/drive")``), so they
    survive a disconnect; otherwise the local folder ``local``. The folder is created.
    Taught in chapter 5, "Where: `book.checkpoint_dir()`" (``ch05-checkpoints``)."""
    folder = DRIVE / name if DRIVE.is_dir() else Path(local)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def setup(seed: int = 0, profile: str | None = None, device: str | None = None, quiet: bool = False) -> Setup:
    """Pick the device, seed everything, read the profile, set the book's figure style
    (:func:`ddpm_lib.viz.use_book_style`) and print a short summary.
    Called by every chapter's first cell, see "How to use this book" (how_to_use.md),
    "In Google Colab (recommended for running)"."""
    profile = get_profile(profile)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    seed_everything(seed)
    viz.use_book_style()
    if not quiet:
        where = "Colab" if in_colab() else platform.system()
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"ddpm_lib {__version__} | torch {torch.__version__} | python {platform.python_version()} | {where}")
        print(f"device: {device}{gpu} | profile: {profile} | seed: {seed}")
        if in_colab() and device.type != "cuda":
            print("WARNING: this Colab runtime has no GPU. Training will be slow. "
                  "Switch with Runtime > Change runtime type > T4 GPU, then run this cell again.")
        if profile == "gpu" and device.type != "cuda":
            print("WARNING: profile 'gpu' on a CPU will take a very long time; set DDPM_PROFILE=cpu.")
    return Setup(device=device, profile=profile, seed=seed)


# The measured results that chapters plot and quote ship inside the package, in
# ddpm_lib/results/, so a chapter finds them wherever ddpm_lib is installed, with no
# download. Each is checked against its digest when read, as the weights are
# (tests/test_data_and_book.py keeps this table equal to the folder).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_SHA256 = {
    "ablation_best_s1_10min.pt": "78dc566b203a8ed8edc0de3eba1456916b74eab7e16cb1d19fb5d69fda6a1f55",
    "ablation_cpu.json": "505fb7441fa004c3c1fafc785b526289296222c2d471345a945aeece6f363751",
    "ablation_shipped_s1_10min.pt": "a1e738ff1a491cea31cb9f4a5a8b715c361445a84b98359c616bcea7238421ce",
    "bench_cpu.json": "b5bb18522ec1ead114cdcdefc1689a8794d19536a464630e5d504f08a0d7f122",
    "bench_h200.log": "52192d1268952fee9d2496a60b7480a18103e9dfe9605bec892e73a6a7bd13ec",
    "fashion_mnist_eps_equal_steps.pt": "f8d8e84137adeadce68c2d824fe178794b2f0ae74411cabd430f23eb5a4fc950",
    "fashion_mnist_flow_equal_steps.pt": "97ec254a9ca7363a142b54ebc9ba0f3217987377769cc6efb7dfc0090903cb9b",
    "fashion_mnist_latent_equal_time.pt": "59e92e7bcdc29c41a75cc0c2d86002df7a909ee4e768be1685c46e03326c4717",
    "fashion_mnist_pixel_equal_time.pt": "e4a05c17f5eff3978877165ba716220eebac7c35ceca97ec2ca9fc5f8c6d8934",
    "flow_noise_cpu.json": "48bb79022681be3bc6898504b752a505b7ce6b624cd862e92ce87fffd93bf8e1",
    "flow_vs_ddpm_cpu.json": "277eb1cabdfc165280b66af17ddef9f81a31b9682cbbc0e1205179642affaa2c",
    "grid_sweep_cpu.json": "976934331f7a4aa3f3963a9d2aa25dc1f311e3563be2140723a7e5f553696807",
    "latent_vs_pixel_cpu.json": "9839a6316aac40121d8b53ed47aedfc1841c701f81075454562ddec4d698c001",
    "nll_bound_cpu.json": "3594498a99a3fb684a2d45943b00e73aa118aa7f76e7f0cef9fb1c921c360102",
    "sde_sweep_cpu.json": "c77f4f81ca25d39b5649c141fcf85e25b00aa244292ef339bfc7670715f4f156",
    "sweep_h200.json": "1708b70f59e9fd32d3cbe575f2b24f18a497f98a3b81cd884c2dd77524387ba1",
    "train_cfg_h200.json": "c2db9a60c455845058c42151c3ff822b4f438efd26470a7bee6c8aaf9b519e37",
    "train_text_cpu.json": "5044af9b6ff1e9daa82ea8cb63e0e88e830fd0622c423142e38e22aaefaadd9e",
    "train_latent_shipped_cpu.json": "dc36ce36aad52fbc090315f746cb4e5255ad381a689ca5a09e6fc3259045c4a3",
}


def result_path(name: str) -> Path:
    """The path of the shipped result ``name`` (in ``ddpm_lib/results/``), after checking
    that its sha256 is the one in :data:`RESULTS_SHA256`.
    Used in chapter 10, "Quality at equal training time", and chapter 11, "The benchmark"."""
    if name not in RESULTS_SHA256:
        raise FileNotFoundError(f"{name} is not one of the book's results "
                                f"({', '.join(sorted(RESULTS_SHA256))})")
    path = RESULTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this ddpm_lib was installed without its "
                                "results; reinstall it (pip install ddpm_lib from the repository)")
    digest = io.sha256(path)
    if digest != RESULTS_SHA256[name]:
        raise ValueError(f"{path} has sha256 {digest}, not the book's {RESULTS_SHA256[name]}: "
                         "a changed or damaged file; reinstall ddpm_lib, or if you regenerated "
                         "it on purpose, update book.RESULTS_SHA256")
    return path


def load_result(name: str) -> dict:
    """the shipped result ``name`` (a JSON file) as a dict; see :func:`result_path`.
    Used where a chapter shows a stored measurement, as in chapters 7 to 10 and chapter 3,
    "The bound of the book's model, in bits per dimension" (``ch03-l0``)."""
    import json
    return json.loads(result_path(name).read_text())
