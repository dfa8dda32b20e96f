"""Files that must not be lost: atomic checkpoints, clear load errors, sha256, a lock.

* :func:`save_checkpoint` writes with ``torch.save`` into a temporary file beside the target,
  then renames it over the target: a crash mid-write never leaves half a checkpoint. The
  temporary is named ``<name>.<pid>.<random>.tmp``; the next save beside it removes the ones a
  killed writer left (older than that save, whose process is gone). The file gets the mode the
  umask implies (``0o666 & ~umask``), like any file Python opens for writing.
* :func:`load_checkpoint` reads with ``torch.load(..., weights_only=True)`` (no pickled code is
  run) and turns every way a file can be unreadable (empty, truncated, random bytes, a pickle of
  other objects) into one ``ValueError`` that names the file and says what to do.
* :func:`load_verified` checks a file's :func:`sha256` first, then loads it.
* :func:`checkpoint_lock` keeps two runs from training into the same checkpoint: it creates
  ``<checkpoint>.lock`` (holding ``pid host``) with ``O_EXCL``, takes over a lock whose
  process is dead, and refuses a live one with :class:`CheckpointBusy`.
* :func:`file_kind` tells the files ``ddpm_lib`` writes apart by their keys.

This module imports nothing from the rest of ``ddpm_lib``: every other module may use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

# A lock file that holds no readable "pid host" is being written right now, or was left by a
# process killed between creating and writing it: the latter once it is older than this.
UNREADABLE_LOCK_GRACE_S = 10.0


class CheckpointBusy(RuntimeError):
    """Another live process holds the lock of the checkpoint this run would write.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""


# ----------------------------------------------------------------------------------------
# Digests and modes
# ----------------------------------------------------------------------------------------
def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file. Used in chapter 5, "The final model": ``load_pretrained`` checks
    the shipped file's digest with it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


file_sha256 = sha256        # for the functions whose argument ``sha256`` is a digest


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it is set and put back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask``. Used by
    :func:`save_checkpoint`, chapter 5, "What a checkpoint holds, and how it is written"."""
    return 0o666 & ~_umask()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine. Where that cannot be told (Windows, where
    signal 0 would be Ctrl-C), assume it does: a live writer's file is never touched."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # PermissionError: it exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------------------
# Atomic save, and the temporaries a killed save leaves
# ----------------------------------------------------------------------------------------
def _temporary_prefix(path: Path) -> str:
    return path.name + "."


def _temporary_owner(name: str, path: Path) -> int | None:
    """The pid in a temporary's name ``<name>.<pid>.<random>.tmp``; None for one without."""
    middle = name[len(_temporary_prefix(path)):-len(".tmp")]
    pid = middle.split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def remove_stale_temporaries(path: str | os.PathLike, older_than: float) -> list[Path]:
    """Delete the ``<name>.*.tmp`` files beside ``path`` that a killed :func:`save_checkpoint`
    left: modified before ``older_than`` (a ``time.time()``) and written by a process that is
    gone (or by an older ddpm_lib, whose names carry no pid). Returns the files removed. Used
    by :func:`save_checkpoint`, chapter 5, "What a checkpoint holds, and how it is written"."""
    path = Path(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(_temporary_prefix(path)) and name.endswith(".tmp")):
            continue
        tmp = path.parent / name
        owner = _temporary_owner(name, path)
        try:
            if tmp.stat().st_mtime >= older_than or (owner is not None and _pid_alive(owner)):
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:         # gone already, or not ours to delete: leave it
            continue
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` with torch.save to a temporary file beside ``path``, then rename it
    over ``path``: a crash mid-write never leaves a half-written checkpoint. Temporaries that
    earlier, killed saves left beside ``path`` are removed first.
    Taught in chapter 5, "What a checkpoint holds, and how it is written" (``ch05-checkpoints``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, older_than=time.time())
    prefix = f"{_temporary_prefix(path)}{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())        # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


# ----------------------------------------------------------------------------------------
# Loading, with errors that say what is wrong
# ----------------------------------------------------------------------------------------
def _why_unreadable(path: Path, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes; a write was interrupted?)"
    first_line = (str(error).strip().splitlines() or [""])[0]
    first_sentence = first_line.split(". ")[0][:160]
    detail = f"{type(error).__name__}: {first_sentence}" if first_sentence else type(error).__name__
    return f"torch.load(weights_only=True) cannot read its {size} bytes ({detail})"


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, what: str = "checkpoint",
                    remedy: str = "delete it to start afresh") -> dict:
    """Read a file written by :func:`save_checkpoint` (tensors and plain Python only).

    A missing file raises ``FileNotFoundError``; an empty, truncated or foreign one a
    ``ValueError`` that names the file, says what is wrong and ends with ``remedy``.
    ``what`` names the kind of file in those messages ("checkpoint", "weights file", ...).
    Taught in chapter 5, "What a checkpoint holds, and how it is written" (``ch05-checkpoints``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable ddpm_lib {what}: {_why_unreadable(path, e)}; "
                         f"{remedy}") from e


def load_verified(path: str | os.PathLike, sha256: str | None = None, map_location="cpu", *,
                  what: str = "file", remedy: str = "fetch or make the file again") -> dict:
    """:func:`load_checkpoint`, after checking that the file's sha256 is ``sha256`` (skipped
    when it is None). A mismatch raises ``ValueError`` naming both digests and ``remedy``.
    Used in chapter 5, "The final model" (``load_pretrained`` checks the shipped file's sha256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            raise ValueError(f"{path} has sha256 {digest}, expected {sha256}: the file is "
                             f"damaged or not the expected one; {remedy}")
    return load_checkpoint(path, map_location, what=what, remedy=remedy)


FILE_KINDS = {
    "checkpoint": "a training checkpoint (written by ddpm_lib.train)",
    "vae_checkpoint": "a VAE training checkpoint (ddpm_lib.autoencoder.train_autoencoder)",
    "weights": "an exported weights file (python -m ddpm_lib export, or save_weights)",
    "vae": "a VAE file (ddpm_lib.autoencoder.save_vae)",
    "classifier": "a classifier file (scripts/train_classifier.py)",
    "unknown": "not a file ddpm_lib writes",
}


def file_kind(blob) -> str:
    """Which of the files ``ddpm_lib`` writes ``blob`` (a loaded file) is: a key of
    :data:`FILE_KINDS`, told apart by the keys each kind holds. ``export`` and ``load_weights``
    use it to refuse a file of another kind (chapter 5, "A simulated disconnect")."""
    if not isinstance(blob, dict):
        return "unknown"
    if str(blob.get("format", "")).startswith("ddpm_lib.autoencoder.train_autoencoder"):
        return "vae_checkpoint"
    if {"model", "ema", "optimizer", "step"} <= blob.keys():
        return "checkpoint"
    if {"state_dict", "model_config", "betas"} <= blob.keys():
        return "weights"
    if str(blob.get("format", "")).startswith("ddpm_lib.autoencoder.VAE"):
        return "vae"
    if {"state_dict", "config"} <= blob.keys():
        return "classifier"
    return "unknown"


# ----------------------------------------------------------------------------------------
# One run per checkpoint
# ----------------------------------------------------------------------------------------
def lock_path(checkpoint: str | os.PathLike) -> Path:
    """The lock file of ``checkpoint``: ``run.pt`` -> ``run.pt.lock``.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".lock")


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file, or None where it holds nothing readable."""
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _lock_is_stale(lock: Path) -> bool:
    owner = _lock_owner(lock)
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    pid, host = owner
    return host == socket.gethostname() and not _pid_alive(pid)


def _check_writable_folder(checkpoint: Path) -> None:
    """Fail now, not after hours of training, when checkpoints cannot be written."""
    if checkpoint.is_dir():
        raise ValueError(f"the checkpoint path {checkpoint} is a folder; pass a file path such as "
                         f"{checkpoint / 'run.pt'}")
    existing = next(p for p in (checkpoint.parent, *checkpoint.parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, so no checkpoint can be written at "
                                 f"{checkpoint}; pass a checkpoint path in a folder")
    try:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"cannot create the folder {checkpoint.parent} for the checkpoint "
                      f"({e.strerror}); pass a checkpoint path in a folder you can write to") from e


def acquire_lock(checkpoint: str | os.PathLike) -> Path:
    """Create the lock file of ``checkpoint`` (see :func:`lock_path`) holding ``pid host``.

    Creating it is also the check that the checkpoint's folder can be written (an
    ``OSError`` that says so). A lock whose process has died on this machine is taken over;
    a live one raises :class:`CheckpointBusy` naming the lock file and the pid.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``): ``train``
    holds the lock while it writes a checkpoint.
    """
    checkpoint = Path(checkpoint)
    _check_writable_folder(checkpoint)
    lock = lock_path(checkpoint)
    for _ in range(2):          # a second try after taking over a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if not _lock_is_stale(lock):
                break
            lock.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise type(e)(f"cannot write in {lock.parent} ({e.strerror}), so no checkpoint could "
                          "be saved there; pass a checkpoint path in a folder you can write "
                          "to") from e
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lock
    pid, host = _lock_owner(lock) or ("unknown", "unknown")
    raise CheckpointBusy(f"{checkpoint} is in use by another run (process {pid} on {host}, "
                         f"lock file {lock}): wait for that run to end, or pass another checkpoint "
                         f"path. If no such process is running, delete {lock}.")


def release_lock(lock: Path) -> None:
    """Delete ``lock`` if this process still holds it.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    owner = _lock_owner(lock)
    if owner is not None and owner == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def checkpoint_lock(checkpoint: str | os.PathLike):
    """``with checkpoint_lock(path):`` holds the lock of ``path`` (see :func:`acquire_lock`)
    for the block and releases it however the block ends. Yields the lock file's path.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    lock = acquire_lock(checkpoint)
    try:
        yield lock
    finally:
        release_lock(lock)
