"""Weights as safetensors in a Hub-style folder (ddpm_lib/hub.py), offline: a shipped model
exported and loaded back gives the same network, schedule and metadata; a Hub download needs a
pinned revision; a folder of another kind is refused. The CLI's `export --format safetensors`."""
import json
from pathlib import Path

import pytest
import torch

from ddpm_lib.pretrained import PRETRAINED, WEIGHTS_DIR, load_pretrained

pytest.importorskip("safetensors")
from ddpm_lib.hub import CONFIG_FILE, WEIGHTS_FILE, export_safetensors, load_from_hub  # noqa: E402


def test_shipped_model_round_trips_through_safetensors(tmp_path):
    folder = export_safetensors(WEIGHTS_DIR / PRETRAINED["fashion_mnist_ddpm"]["file"], tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    model, schedule, meta = load_from_hub(folder)
    ref_model, ref_schedule, ref_meta = load_pretrained("fashion_mnist_ddpm")
    assert torch.equal(schedule.float64("betas"), ref_schedule.float64("betas"))
    assert model.config == ref_model.config and meta.keys() == ref_meta.keys()
    x, t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(model(x, t), ref_model(x, t))


def test_hub_download_needs_a_pinned_revision(tmp_path):
    with pytest.raises(ValueError, match="pin a revision"):
        load_from_hub("ddpm-book/fashion-mnist-ddpm")


def test_a_folder_of_another_kind_is_refused(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"architectures": ["UNet2DModel"]}))
    with pytest.raises(ValueError, match="not a ddpm_lib export"):
        load_from_hub(tmp_path)


def test_cli_exports_safetensors(tmp_path, capsys):
    from ddpm_lib.__main__ import main
    main(["export", "--format", "safetensors",
          str(WEIGHTS_DIR / PRETRAINED["fashion_mnist_ddpm"]["file"]), str(tmp_path / "out")])
    assert "model.safetensors" in capsys.readouterr().out
    assert load_from_hub(tmp_path / "out")[0].config == load_pretrained("fashion_mnist_ddpm")[0].config


def test_tensors_that_do_not_fit_the_config_are_refused(tmp_path):
    folder = export_safetensors(WEIGHTS_DIR / PRETRAINED["fashion_mnist_ddpm"]["file"], tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["unet"]["base_channels"] = 2 * config["unet"]["base_channels"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the network"):
        load_from_hub(folder)


def test_push_to_hub_uploads_an_export_and_returns_the_commit(tmp_path, monkeypatch):
    """Offline: huggingface_hub's HfApi is replaced by a recorder; what would be uploaded is
    the export's two files, and the returned commit is what load_from_hub pins."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from ddpm_lib.hub import push_to_hub
    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["exist_ok"]))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir()),
                          repo_id, kw["allow_patterns"]))
            return type("Commit", (), {"oid": "0123abcd"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    with pytest.raises(ValueError, match="lacks model.safetensors, config.json"):
        push_to_hub(tmp_path, "me/model")
    folder = export_safetensors(WEIGHTS_DIR / PRETRAINED["fashion_mnist_ddpm"]["file"], tmp_path / "m")
    assert push_to_hub(folder, "me/model", token="hf_x") == "0123abcd"
    assert calls == [("token", "hf_x"), ("create", "me/model", True),
                     ("upload", [CONFIG_FILE, WEIGHTS_FILE], "me/model", [WEIGHTS_FILE, CONFIG_FILE])]
    (folder / CONFIG_FILE).write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a ddpm_lib export"):
        push_to_hub(folder, "me/model")
