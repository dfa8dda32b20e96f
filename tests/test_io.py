"""ddpm_lib.io: atomic saves, clear load errors, sha256, the checkpoint lock."""
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_unet
from ddpm_lib import NoiseSchedule
from ddpm_lib.io import (CheckpointBusy, acquire_lock, checkpoint_lock, file_kind, load_checkpoint,
                         load_verified, lock_path, release_lock, save_checkpoint, sha256)
from ddpm_lib.pretrained import load_weights, save_weights


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)
    yield set_mask
    os.umask(old)


def test_checkpoints_get_the_mode_the_umask_implies(tmp_path, umask):
    path = tmp_path / "run.pt"
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        umask(mask)
        save_checkpoint({"step": 1}, path)
        assert path.stat().st_mode & 0o777 == mode, (oct(mask), oct(path.stat().st_mode))


def test_a_save_removes_the_temporaries_killed_saves_left(tmp_path):
    path = tmp_path / "run.pt"
    past = time.time() - 60
    orphans = [tmp_path / f"run.pt.{dead_pid()}.k1ll3d.tmp",     # its writer is gone
               tmp_path / "run.pt.abc123xy.tmp"]                 # an older ddpm_lib's name, no pid
    kept = [tmp_path / f"run.pt.{os.getpid()}.writing.tmp",     # a live writer's
            tmp_path / "other.pt.1.abc.tmp",                     # another checkpoint's
            tmp_path / "run.pt.lock"]
    for f in orphans + kept:
        f.write_bytes(b"half a checkpoint")
        os.utime(f, (past, past))
    fresh = tmp_path / f"run.pt.{dead_pid()}.fresh.tmp"          # newer than the save: left alone
    fresh.write_bytes(b"x")
    future = time.time() + 60
    os.utime(fresh, (future, future))

    save_checkpoint({"step": 1}, path)
    assert not any(f.exists() for f in orphans)
    assert all(f.exists() for f in kept + [fresh])
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 50, random.Random(0).randbytes(4096), "truncated"],
                         ids=["empty", "pickle-like", "random", "truncated"])
def test_unreadable_files_give_one_clear_error(tmp_path, content):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:2000] if content == "truncated" else content)
    with pytest.raises(ValueError, match=r"bad\.pt is not a readable ddpm_lib checkpoint.*delete"):
        load_checkpoint(bad)
    # sample --weights reads through load_weights: the same kind of error, with its own advice
    unreadable_weights = r"bad\.pt is not a readable ddpm_lib weights file.*export it again"
    with pytest.raises(ValueError, match=unreadable_weights):
        load_weights(bad)
    if content == b"":
        with pytest.raises(ValueError, match="empty"):
            load_checkpoint(bad)


def test_load_verified_checks_the_digest_first(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint({"a": torch.arange(3)}, path)
    assert torch.equal(load_verified(path, sha256(path))["a"], torch.arange(3))
    assert torch.equal(load_verified(path)["a"], torch.arange(3))
    with pytest.raises(ValueError, match=f"has sha256 {sha256(path)}, expected 0000"):
        load_verified(path, "0" * 64, remedy="reinstall")
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        load_verified(tmp_path / "none.pt", what="weights file")


def test_file_kinds_and_what_load_weights_says_of_the_wrong_one(tmp_path):
    model = tiny_unet()
    weights = tmp_path / "w.pt"
    save_weights(model, NoiseSchedule.linear(T=10), weights)
    checkpoint = tmp_path / "run.pt"
    save_checkpoint({"model": {}, "ema": {}, "optimizer": {}, "step": 3}, checkpoint)
    assert file_kind(load_checkpoint(weights)) == "weights"
    assert file_kind(load_checkpoint(checkpoint)) == "checkpoint"
    assert file_kind({"format": "ddpm_lib.autoencoder.VAE/1"}) == "vae"
    assert file_kind([1, 2]) == file_kind({"x": 1}) == "unknown"
    with pytest.raises(ValueError, match=r"training checkpoint.*ddpm_lib export .*run\.pt"):
        load_weights(checkpoint)


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    ckpt = tmp_path / "runs" / "run.pt"
    with checkpoint_lock(ckpt) as lock:
        assert lock == lock_path(ckpt) == tmp_path / "runs" / "run.pt.lock"
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(CheckpointBusy, match=rf"process {os.getpid()} .*lock file .*run\.pt\."):
            acquire_lock(ckpt)
    assert not lock.exists()                                    # released

    lock.write_text(f"{dead_pid()} {socket.gethostname()}\n")   # left by a killed run
    assert acquire_lock(ckpt) == lock and lock.read_text().split()[0] == str(os.getpid())
    release_lock(lock)
    assert not lock.exists()

    lock.write_text(f"{os.getpid()} some-other-machine\n")      # its pid cannot be checked here
    with pytest.raises(CheckpointBusy, match="some-other-machine.*If no such process is running"):
        acquire_lock(ckpt)
    release_lock(lock)                                          # not ours: left in place
    assert lock.exists()


def test_the_lock_checks_the_folder_can_be_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match=r"a_file is a file, so no checkpoint can be"):
        acquire_lock(a_file / "run.pt")
    with pytest.raises(ValueError, match="is a folder"):
        acquire_lock(tmp_path)


def test_the_lock_says_when_the_folder_is_not_writable(tmp_path, monkeypatch):
    """As root every folder is writable, so the refusals are simulated."""
    def refuse(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=r"cannot create the folder .*new for the checkpoint "
                                              r"\(Permission denied\)"):
        acquire_lock(tmp_path / "new" / "run.pt")
    monkeypatch.undo()
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match=r"cannot write in .* \(Permission denied\), so no"):
        acquire_lock(tmp_path / "run.pt")
