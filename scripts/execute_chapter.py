"""Execute chapter notebooks in place, saving outputs and widget state, and time them.

    python scripts/execute_chapter.py chapters/02_forward_process.ipynb [--profile cpu]

The committed outputs are made with this script (profile ``cpu`` unless said otherwise), so
the rendered book shows them. It prints the wall-clock time, which the chapter's header
reports per profile.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, profile: str, timeout: int, write: bool = True) -> float:
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("DDPM_PROFILE")
    os.environ["DDPM_PROFILE"] = profile
    os.environ["DDPM_PROGRESS"] = "0"      # no progress bars in the committed outputs
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.time()
        client.execute()
        elapsed = time.time() - start
    finally:
        if env_before is None:
            os.environ.pop("DDPM_PROFILE", None)
        else:
            os.environ["DDPM_PROFILE"] = env_before
    if write:
        nbformat.write(nb, path)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--no-write", action="store_true", help="run only (to time a profile)")
    args = p.parse_args()
    for path in args.notebooks:
        elapsed = execute(path, args.profile, args.timeout, write=not args.no_write)
        print(f"{path}: {elapsed:.1f} s in profile {args.profile}")


if __name__ == "__main__":
    main()
