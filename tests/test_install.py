"""The book away from its repository, as a reader in Colab, Kaggle or Binder has it: ddpm_lib
installed from a copy of the repository (not editable, with the `book` extra), used from
another folder with the network closed. Every chapter's first cells, up to and including its
first plot, run; every shipped result and model loads; the `ddpm` command samples.

The virtual environment sees this machine's packages (--system-site-packages), so torch and
the extras are not downloaded; pip runs with --no-index, so nothing can be."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
DEAD = "http://127.0.0.1:9"          # a closed port: any download fails at once
OFFLINE = {"HTTP_PROXY": DEAD, "HTTPS_PROXY": DEAD, "http_proxy": DEAD, "https_proxy": DEAD,
           "no_proxy": "", "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1",
           "DDPM_PROFILE": "smoke", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}


def _tracked_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, or new and not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a venv with ddpm_lib[book] installed from a copy, a folder elsewhere).
    The venv has no pip of its own (whose old setuptools would hide this machine's): this
    machine's pip installs into it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git checkout to copy it")
    base = tmp_path_factory.mktemp("install")
    source = _tracked_copy(base / "clone")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation",
                           "--disable-pip-version-check", f"{source}[book]"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(source)                      # nothing may be read from the copy any more
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere, env


def _run(installed, code: str, timeout=600) -> subprocess.CompletedProcess:
    python, elsewhere, env = installed
    return subprocess.run([str(python), "-c", code], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_not_the_repository(installed):
    proc = _run(installed, "import ddpm_lib, sys; print(ddpm_lib.__file__); print(sys.prefix)")
    assert proc.returncode == 0, proc.stderr
    module, prefix = proc.stdout.split()
    assert module.startswith(prefix) and "site-packages" in module and str(ROOT) not in module


def test_every_result_and_shipped_model_loads_offline(installed):
    proc = _run(installed, textwrap.dedent("""
        from ddpm_lib import book, pretrained
        for name in sorted(book.RESULTS_SHA256):
            book.result_path(name)                        # present, sha256 checked
            if name.endswith(".json"):
                book.load_result(name)
        for name in pretrained.PRETRAINED:
            pretrained.load_pretrained(name)
        pretrained.load_pretrained_vae()
        print("ok", len(book.RESULTS_SHA256), len(pretrained.PRETRAINED))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def _first_cells(nb_path: Path) -> list[str]:
    """The chapter's code cells up to and including the first one that draws a figure."""
    code = [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]
    cells = []
    for cell in code:
        cells.append("".join(cell["source"]))
        if any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
            return cells
    raise AssertionError(f"{nb_path.name} draws no figure")


RUN_CELLS = """
import json, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
for i, source in enumerate(json.load(sys.stdin)):
    result = shell.run_cell(source)
    if not result.success:
        sys.exit(f"cell {i} failed: {result.error_in_exec or result.error_before_exec!r}")
import ddpm_lib
print("ran", i + 1, "cells with", ddpm_lib.__file__)
"""


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_first_cells_run_where_ddpm_lib_is_installed(installed, nb_path):
    python, elsewhere, env = installed
    folder = elsewhere / nb_path.stem                # a fresh folder per chapter, like Colab's
    folder.mkdir()
    proc = subprocess.run([str(python), "-c", RUN_CELLS], input=json.dumps(_first_cells(nb_path)),
                          cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "site-packages" in proc.stdout.splitlines()[-1]


def test_the_ddpm_command_samples_a_shipped_model_from_any_folder(installed):
    python, elsewhere, env = installed
    ddpm = python.parent / "ddpm"
    proc = subprocess.run([str(ddpm), "sample", "--weights", "fashion_mnist_ddpm", "--n", "16",
                           "--sampler", "ddim", "--steps", "10", "--out", "grid.png"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "grid.png").stat().st_size > 1000
