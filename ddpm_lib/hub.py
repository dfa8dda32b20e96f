"""Weights as a folder others can use: ``model.safetensors`` (the U-Net's tensors and the
schedule's betas, no pickle) and ``config.json`` (the U-Net's configuration and the metadata),
the layout of a Hugging Face Hub model repository. :func:`push_to_hub` uploads such a folder
and returns the commit to pin; :func:`load_from_hub` reads a folder, or downloads one from the
Hub at a pinned revision. Needs the ``hub`` extra
(``pip install "ddpm_lib[hub]"``: safetensors, huggingface_hub).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .pretrained import build_model, load_weights
from .schedules import NoiseSchedule
from .unet import UNet

FORMAT = "ddpm_lib/safetensors-v1"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def export_safetensors(weights_path, folder) -> Path:
    """Write the weights file ``weights_path`` (what ``export`` writes, or a shipped model's
    file) as ``folder``/model.safetensors + config.json. Returns the folder."""
    from safetensors.torch import save_file
    model, schedule, meta = load_weights(weights_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["schedule.betas"] = schedule.float64("betas").contiguous()
    # each file is written under a temporary name and renamed: never half a file
    parts = {name: folder / f".{name}.part" for name in (WEIGHTS_FILE, CONFIG_FILE)}
    save_file(tensors, str(parts[WEIGHTS_FILE]), metadata={"format": FORMAT})
    config = {"format": FORMAT, "unet": model.config, "meta": meta}
    parts[CONFIG_FILE].write_text(json.dumps(config, indent=1, default=str))
    for name, part in parts.items():
        os.replace(part, folder / name)
    return folder


def push_to_hub(folder, repo_id: str, *, token: str | None = None, private: bool = False,
                message: str = "Upload ddpm_lib weights") -> str:
    """Upload ``folder`` (written by :func:`export_safetensors`) to the Hub model repository
    ``repo_id`` ("owner/name", created if missing) with ``token`` (default: the one
    ``huggingface-cli login`` saved). Returns the commit hash: pass it to
    :func:`load_from_hub` as ``revision``."""
    folder = Path(folder)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: write it first with "
                         "python -m ddpm_lib export WEIGHTS FOLDER --format safetensors")
    if json.loads((folder / CONFIG_FILE).read_text()).get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a ddpm_lib export ({FORMAT})")
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               allow_patterns=[WEIGHTS_FILE, CONFIG_FILE],
                               commit_message=message)
    return commit.oid


def load_from_hub(repo: str | os.PathLike, revision: str | None = None,
                  device="cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """``(model in eval mode, schedule, metadata)`` from a folder written by
    :func:`export_safetensors`, or from the Hub repository ``repo`` ("owner/name") at
    ``revision`` (a commit hash or tag: required, so a course's model cannot change
    under it)."""
    from safetensors.torch import load_file
    folder = Path(repo)
    if not folder.is_dir():
        if not revision:
            raise ValueError(f"{repo} is not a folder; to download it from the Hugging Face Hub "
                             "pin a revision (a commit hash or a tag): revision=...")
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(str(repo), revision=revision,
                                        allow_patterns=[WEIGHTS_FILE, CONFIG_FILE]))
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a ddpm_lib export "
                         f"(format {config.get('format')!r}, expected {FORMAT!r})")
    tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    betas = tensors.pop("schedule.betas")
    model = build_model(config["unet"]).to(device)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE}: its tensors do not fit the network "
                         f"{CONFIG_FILE} describes ({e})") from e
    return model.eval(), NoiseSchedule(betas.cpu(), device=device), config.get("meta", {})
